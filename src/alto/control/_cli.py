"""Command-line helpers that talk to a running control plane over HTTP.

``alto status``, ``alto scale``, ``alto drain``, ``alto top``, ``alto trace`` and ``alto
cancel`` (dispatched from ``alto._cli``) call these. Each returns the process exit code:

- 0: done;
- 1: the server answered with an HTTP error (its ``{"error": ...}`` message is printed);
- 2: no control plane answered at the URL (connection refused, timeout, broken stream).

With ``json_output``, ``status`` prints the ``GET /api/pipeline`` object, ``top`` one
``stats`` event per refresh and ``trace`` the ``GET /api/requests/{id}`` timeline, each as
one line of JSON (JSON Lines: ``jq`` reads them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import httpx
from httpx_sse import connect_sse

__all__ = [
    "EXIT_HTTP_ERROR",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "cancel",
    "drain",
    "render_trace",
    "scale",
    "status",
    "top",
    "trace",
]

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

    def show(data: dict[str, Any]) -> str:
        ids = ", ".join(str(i) for i in data["instances"]) or "none"
        target = data["target_instances"]
        return (
            f"stage {data['name']}: scaling to {target} instance{'s' if target != 1 else ''} "
            f"(instances now: {ids})"
        )

    path = f"/api/stages/{stage}/scale"
    return _command(url, token, "POST", path, show, body={"instances": n}, out=out, err=err)


def drain(
    url: str,
    instance_id: int,
    token: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Drain one instance: no new groups, finish pinned work, then stop."""

    def show(data: dict[str, Any]) -> str:
        return f"instance {data['instance']}: {data['state']}"

    path = f"/api/instances/{instance_id}/drain"
    return _command(url, token, "POST", path, show, out=out, err=err)


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


def cancel(
    url: str,
    request_id: int,
    token: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Cancel a running request (``DELETE /v1/requests/{id}``)."""

    def show(data: dict[str, Any]) -> str:
        return f"request {data['request_id']}: {data['state']}"

    return _command(url, token, "DELETE", f"/v1/requests/{request_id}", show, out=out, err=err)


def _command(
    url: str,
    token: str | None,
    method: str,
    path: str,
    show: Callable[[dict[str, Any]], str],
    *,
    body: dict[str, Any] | None = None,
    out: TextIO | None,
    err: TextIO | None,
) -> int:
    """One request to the control plane; ``show`` turns its JSON answer into the line
    printed (refusals and connection errors are reported by ``_run``)."""
    out = out if out is not None else sys.stdout

    def action() -> None:
        with httpx.Client(timeout=_TIMEOUT, headers=_headers(token)) as client:
            response = client.request(method, f"{_base(url)}{path}", json=body)
            _check(response)
            data = response.json()
        print(show(data), file=out)

    return _run(url, err, action)


# Span rows `alto trace` prints before it says how many it left out (--json has all).
MAX_SPAN_ROWS = 200


def _s(seconds: Any) -> str:
    """Seconds, to the millisecond; ``-`` when unknown."""
    return "-" if not isinstance(seconds, (int, float)) else f"{seconds:.3f}"


def _usage(attributes: Any) -> str:
    if not isinstance(attributes, dict):
        return ""
    parts = []
    for key, label in (("gen_ai.usage.input_tokens", "in"), ("gen_ai.usage.output_tokens", "out")):
        if isinstance(attributes.get(key), int):
            parts.append(f"{attributes[key]} {label}")
    return " / ".join(parts)


def render_trace(data: dict[str, Any]) -> str:
    """``alto trace``'s text for a ``GET /api/requests/{id}`` timeline: the request's state
    and timings, each stage's spans (when the input reached the instance, how long it
    waited, processed, and when its first and last output left, all in seconds since the
    request was admitted), the partial outputs that passed the runtime, and LM usage."""
    state = data.get("state", "unknown")
    rid = data.get("request_id")
    head = f"request {rid}: {state}"
    if state == "running":
        head += f" for {_s(data.get('elapsed_s'))} s so far"
        if data.get("deadline_in_s") is not None:
            head += f" (deadline in {_s(data['deadline_in_s'])} s)"
    elif data.get("latency_s") is not None:
        head += f" after {_s(data['latency_s'])} s"
    if data.get("results") is not None:
        head += f", {data['results']} result{'s' if data['results'] != 1 else ''}"
    if data.get("time_to_first_result_s") is not None:
        head += f", the first after {_s(data['time_to_first_result_s'])} s"
    lines = [head]
    if data.get("error"):
        lines.append(f"error: {data['error']}")
    trace = data.get("trace")
    if not isinstance(trace, dict):
        lines.append(
            "not traced (not sampled: [runtime] trace_sample_rate, or an unsampled traceparent)"
        )
        return "\n".join(lines)
    parent = trace.get("parent_span_id")
    lines.append(
        f"trace {trace.get('trace_id')}"
        + (f", continuing the caller's span {parent}" if parent else "")
    )
    spans = sorted(trace.get("spans") or [], key=lambda s: (s.get("received", 0), s["stage"]))
    hops = trace.get("hops") or []

    # Per stage, in the order inputs first reached it.
    order: dict[str, None] = {}
    for s in spans:
        order.setdefault(s["stage"], None)
    for h in hops:
        if h.get("from") not in ("ingress", "runtime"):
            order.setdefault(h["from"], None)
    if order:
        rows = []
        for stage in order:
            mine = [s for s in spans if s["stage"] == stage]
            outs = [h["t"] for h in hops if h.get("from") == stage]
            waits = [s["started"] - s["received"] for s in mine if "started" in s]
            busy = [s["ended"] - s["started"] for s in mine if "ended" in s and "started" in s]
            rows.append(
                [
                    stage,
                    len(mine),
                    len({s.get("instance") for s in mine}),
                    _s(min((s["received"] for s in mine), default=None)),
                    _s(max(waits, default=None)),
                    _s(sum(busy) if busy else None),
                    len(outs),
                    _s(min(outs, default=None)),
                    _s(max(outs, default=None)),
                ]
            )
        lines += [
            "",
            "stages (seconds since admission; WAIT the longest queue wait, BUSY processing summed):",
            _table(
                [
                    "STAGE",
                    "SPANS",
                    "INSTANCES",
                    "FIRST_IN",
                    "WAIT",
                    "BUSY",
                    "OUTPUTS",
                    "FIRST_OUT",
                    "LAST_OUT",
                ],
                rows,
            ),
        ]
    if spans:
        rows = [
            [
                s["stage"],
                s.get("instance"),
                json.dumps(s.get("key_path", []), separators=(",", ":")),
                s.get("kind", "process"),
                _s(s.get("received")),
                _s(s["started"] - s["received"] if "started" in s and "received" in s else None),
                _s(s["ended"] - s["started"] if "ended" in s and "started" in s else None),
                _s(s.get("first_output")),
                _s(s.get("last_output")),
                s.get("outputs"),
                s.get("status", ""),
                _usage(s.get("attributes")),
            ]
            for s in spans[:MAX_SPAN_ROWS]
        ]
        lines += [
            "",
            "spans (one per input an instance processed):",
            _table(
                [
                    "STAGE",
                    "INSTANCE",
                    "KEY_PATH",
                    "KIND",
                    "RECEIVED",
                    "WAIT",
                    "PROCESSING",
                    "FIRST_OUT",
                    "LAST_OUT",
                    "OUTPUTS",
                    "STATUS",
                    "TOKENS",
                ],
                rows,
            ),
        ]
        if len(spans) > MAX_SPAN_ROWS:
            lines.append(f"... {len(spans) - MAX_SPAN_ROWS} more spans (--json shows all)")
    if hops:
        routes: dict[tuple[str, str, str], list[float]] = {}
        for h in hops:
            routes.setdefault((h["from"], h.get("queue") or "-", h["to"]), []).append(h["t"])
        rows = [
            [src, queue, dst, len(ts), _s(min(ts)), _s(max(ts))]
            for (src, queue, dst), ts in sorted(routes.items(), key=lambda kv: min(kv[1]))
        ]
        lines += [
            "",
            f"hops ({len(hops)} partial outputs and group closes passed the runtime):",
            _table(["FROM", "QUEUE", "TO", "COUNT", "FIRST", "LAST"], rows),
        ]
    usage: dict[str, dict[str, int]] = {}
    for s in spans:
        attributes = s.get("attributes")
        if not isinstance(attributes, dict):
            continue
        for key, label in (
            ("gen_ai.usage.input_tokens", "input"),
            ("gen_ai.usage.output_tokens", "output"),
        ):
            if isinstance(attributes.get(key), int):
                total = usage.setdefault(s["stage"], {"input": 0, "output": 0})
                total[label] += attributes[key]
    if usage:
        lines += ["", "gen_ai usage (tokens):"]
        lines += [
            f"  {stage}: {u['input']} input, {u['output']} output" for stage, u in usage.items()
        ]
    if trace.get("dropped_events"):
        lines.append(
            f"({trace['dropped_events']} hops and spans past the trace's limit were not kept)"
        )
    return "\n".join(lines)


def trace(
    url: str,
    request_id: int,
    token: str | None = None,
    *,
    json_output: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print a request's timeline (``GET /api/requests/{id}``) readably, or as one line
    of JSON with ``json_output``."""
    out = out if out is not None else sys.stdout

    def action() -> None:
        with httpx.Client(timeout=_TIMEOUT, headers=_headers(token)) as client:
            response = client.get(f"{_base(url)}/api/requests/{request_id}")
            _check(response)
            data = response.json()
        print(_json_line(data) if json_output else render_trace(data), file=out)

    return _run(url, err, action)
