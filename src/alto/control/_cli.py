"""Command-line helpers that talk to a running control plane over HTTP.

``alto status``, ``alto scale``, ``alto drain`` and ``alto top`` (dispatched from
``alto._cli``) call these. Each returns the process exit code:

- 0: done;
- 1: the server answered with an HTTP error (its ``{"error": ...}`` message is printed);
- 2: no control plane answered at the URL (connection refused, timeout, broken stream).

With ``json_output``, ``status`` prints the ``GET /api/pipeline`` object and ``top`` one
``stats`` event per refresh, each as one line of JSON (JSON Lines: ``jq`` reads them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import httpx
from httpx_sse import connect_sse

__all__ = ["EXIT_HTTP_ERROR", "EXIT_OK", "EXIT_UNREACHABLE", "drain", "scale", "status", "top"]

EXIT_OK = 0
EXIT_HTTP_ERROR = 1
EXIT_UNREACHABLE = 2

# Commands answer at once; only the live stream waits, and it gets an event every
# stream interval (0.25 s by default), so 30 s without one means the server is gone.
_TIMEOUT = httpx.Timeout(10.0)
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=30.0)


class _HTTPFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")


def _base(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()  # a streamed response (the SSE stream) has not read its body yet
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    raise _HTTPFailure(response.status_code, message)


def _run(url: str, err: TextIO | None, action: Callable[[], None]) -> int:
    err = err if err is not None else sys.stderr
    try:
        action()
    except _HTTPFailure as exc:
        print(f"alto: error: {exc}", file=err)
        return EXIT_HTTP_ERROR
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        print(f"alto: cannot reach the control plane at {_base(url)}: {reason}", file=err)
        return EXIT_UNREACHABLE
    return EXIT_OK


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _json_line(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def status(
    url: str,
    token: str | None = None,
    *,
    json_output: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the pipeline's stages and instances as tables (or, with ``json_output``, the
    ``GET /api/pipeline`` object as one line of JSON)."""
    out = out if out is not None else sys.stdout

    def action() -> None:
        with httpx.Client(timeout=_TIMEOUT, headers=_headers(token)) as client:
            response = client.get(f"{_base(url)}/api/pipeline")
            _check(response)
            data = response.json()
        if json_output:
            print(_json_line(data), file=out)
            return
        req = data["requests"]
        print(
            f"pipeline {data['pipeline']}: {req['in_flight']} in flight "
            f"(max {req['max_in_flight']}), {req['submitted']} submitted, "
            f"{req['completed']} completed, {req['failed']} failed, {req['refused']} refused",
            file=out,
        )
        routing = {e["to"]: e["routing"] for e in data["edges"]}
        stages = [
            [
                s["name"],
                routing.get(s["name"], s["scheduler"]),
                f"level {s['aggregate_level']}" if s["stateful"] else "stateless",
                len(s["instances"]),
                s["target_instances"],
                s["frames_processed"],
                s["errors"],
            ]
            for s in data["stages"]
        ]
        print(file=out)
        print(
            _table(
                ["STAGE", "ROUTING", "STATE", "INSTANCES", "TARGET", "FRAMES", "ERRORS"], stages
            ),
            file=out,
        )
        instances = [
            [
                i["id"],
                i["stage"],
                i["state"],
                i["queue_depth"],
                i["credits"],
                i["backlog"],
                i["open_groups"],
                i["frames_in"],
                i["frames_out"],
                i["pid"],
                i["last_error"],
            ]
            for i in data["instances"]
            if i["state"] != "stopped"
        ]
        print(file=out)
        print(
            _table(
                [
                    "INSTANCE",
                    "STAGE",
                    "STATE",
                    "DEPTH",
                    "CREDITS",
                    "BACKLOG",
                    "GROUPS",
                    "FRAMES_IN",
                    "FRAMES_OUT",
                    "PID",
                    "LAST_ERROR",
                ],
                instances,
            ),
            file=out,
        )

    return _run(url, err, action)


def scale(
    url: str,
    stage: str,
    n: int,
    token: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Scale ``stage`` to ``n`` instances."""
    out = out if out is not None else sys.stdout

    def action() -> None:
        with httpx.Client(timeout=_TIMEOUT, headers=_headers(token)) as client:
            response = client.post(f"{_base(url)}/api/stages/{stage}/scale", json={"instances": n})
            _check(response)
            data = response.json()
        ids = ", ".join(str(i) for i in data["instances"]) or "none"
        target = data["target_instances"]
        print(
            f"stage {data['name']}: scaling to {target} instance{'s' if target != 1 else ''} "
            f"(instances now: {ids})",
            file=out,
        )

    return _run(url, err, action)


def drain(
    url: str,
    instance_id: int,
    token: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Drain one instance: no new groups, finish pinned work, then stop."""
    out = out if out is not None else sys.stdout

    def action() -> None:
        with httpx.Client(timeout=_TIMEOUT, headers=_headers(token)) as client:
            response = client.post(f"{_base(url)}/api/instances/{instance_id}/drain")
            _check(response)
            data = response.json()
        print(f"instance {data['instance']}: {data['state']}", file=out)

    return _run(url, err, action)


def render_top(data: dict[str, Any], url: str = "") -> str:
    """One screen of ``alto top`` from a ``stats`` event."""
    req, rates, lat = data["requests"], data["rates"], data["latency"]
    lines = [
        f"alto top  pipeline {data['pipeline']}  {url}  (event {data.get('seq', '-')})",
        f"requests: {req['in_flight']} in flight / {req['max_in_flight']} max   "
        f"{rates['requests_per_s']:.1f} req/s   {rates['frames_per_s']:.1f} frames/s   "
        f"latency p50 {_ms(lat['p50'])}  p99 {_ms(lat['p99'])}   "
        f"completed {req['completed']}  failed {req['failed']}  refused {req['refused']}",
        "",
    ]
    stage_rows = [
        [
            s["name"],
            len(s["instances"]),
            s["target_instances"],
            f"{s['frames_per_s']:.1f}",
            s["errors"],
        ]
        for s in data["stages"]
    ]
    lines.append(_table(["STAGE", "INSTANCES", "TARGET", "FRAMES/S", "ERRORS"], stage_rows))
    lines.append("")
    inst_rows = []
    for i in data["instances"]:
        if i["state"] == "stopped":
            continue
        bar = "#" * min(i["queue_depth"], 30) + ("+" if i["queue_depth"] > 30 else "")
        inst_rows.append(
            [
                i["id"],
                i["stage"],
                i["state"],
                i["queue_depth"],
                f"{i['credits']}",
                i["backlog"],
                i["open_groups"],
                f"{i['frames_out_per_s']:.1f}",
                bar,
            ]
        )
    lines.append(
        _table(
            ["ID", "STAGE", "STATE", "DEPTH", "CREDITS", "BACKLOG", "GROUPS", "IN/S", "QUEUE"],
            inst_rows,
        )
    )
    errors = [i for i in data["instances"] if i.get("last_error")]
    if errors:
        lines.append("")
        lines.extend(f"instance {i['id']} ({i['stage']}): {i['last_error']}" for i in errors)
    return "\n".join(lines)


def top(
    url: str,
    token: str | None = None,
    iterations: int | None = None,
    *,
    json_output: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """A live terminal view of ``GET /api/stream``, redrawn at every event (with
    ``json_output``: each event's data as one line of JSON instead).

    ``iterations`` stops after that many events (tests); ``None`` runs until interrupted.
    """
    out = out if out is not None else sys.stdout
    clear = "\x1b[H\x1b[2J" if out.isatty() and not json_output else ""
    base = _base(url)

    def action() -> None:
        shown = 0
        with (
            httpx.Client(timeout=_STREAM_TIMEOUT, headers=_headers(token)) as client,
            connect_sse(client, "GET", f"{base}/api/stream") as source,
        ):
            _check(source.response)
            for event in source.iter_sse():
                if event.event != "stats":
                    continue
                data = json.loads(event.data)
                if json_output:
                    out.write(_json_line(data) + "\n")
                else:
                    screen = render_top(data, base)
                    out.write(f"{clear}{screen}\n" if clear else f"{screen}\n\n")
                out.flush()
                shown += 1
                if iterations is not None and shown >= iterations:
                    return
        raise httpx.RemoteProtocolError("the server ended the stream")

    try:
        return _run(url, err, action)
    except KeyboardInterrupt:
        return EXIT_OK
