"""The HTTP control plane: a quart-trio app served by hypercorn's Trio worker.

It runs in the runtime's own process and nursery (``alto serve`` starts
:func:`serve_control` next to the runtime) and sees the dataplane only through
:class:`~alto.control._api.ControlRuntime`: frozen ``statistics()`` snapshots, request
outcomes and timelines to read, and ``scale``/``drain``/``submit``/``cancel`` to act.

Endpoints (``GET /openapi.json`` describes them):

- ``GET /api/pipeline``, ``GET /api/instances``: JSON status.
- ``GET /api/stream``: Server-Sent Events, one ``stats`` event per ``stream_interval``
  (see :mod:`alto.control._stream` for how slow clients coalesce). Both SSE streams send a
  ``: keepalive`` comment after ``sse_keepalive`` seconds without an event.
- ``POST /api/stages/{stage}/scale``, ``POST /api/instances/{id}/drain``: commands.
- ``POST /v1/pipelines/{name}/requests``: request ingress, results streamed back as SSE
  (or collected into one JSON answer with ``?stream=false``); a deadline (``?timeout=S``
  or ``X-Alto-Timeout: S``) and a W3C ``traceparent`` header are optional.
- ``DELETE /v1/requests/{id}``: cancel a running request.
- ``GET /api/requests`` (recent or slowest finished requests), ``GET /api/requests/{id}``
  (one request's timeline: its state and, when traced, every hop and span).
- ``GET /metrics``: Prometheus text format.
- ``GET /healthz``, ``GET /readyz``: liveness and readiness probes (see
  :mod:`alto.control._probes`); never behind the token.
- ``GET /``: the dashboard (static files from ``dashboard/``, assets under ``/dashboard/``).

Mutating endpoints need ``Authorization: Bearer <token>`` when a token is configured.
Every refusal is a 4xx with a JSON body ``{"error": message}``; bad input never becomes a
500. Which status means what (a scale request past ``max_instances`` is a 409, as is one
that a runtime without a launcher cannot carry out) is listed in
:mod:`alto.control._openapi`. ``tests/test_http_fuzz.py`` fuzzes every endpoint from the
served ``/openapi.json``.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any

import trio
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request, send_from_directory
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .._errors import AltoError, OverloadedError, truncate_error
from ..dataplane._runtime import check_timeout
from ..dataplane._stats import (
    InstanceStatistics,
    RequestEvent,
    RequestOutcome,
    RuntimeStatistics,
    StageStatistics,
)
from ..dataplane._tracing import parse_traceparent
from ._api import ControlRuntime
from ._metrics import ControlStats, open_registry
from ._openapi import (
    JSON_MEDIA_TYPES,
    MAX_REQUESTS_LISTED,
    REQUEST_ORDERS,
    STREAM_FLAGS,
    TIMEOUT_HEADER,
    openapi_document,
)
from ._probes import readiness
from ._stream import (
    DEFAULT_KEEPALIVE_S,
    KeepaliveBody,
    StatsHub,
    autoscale_dict,
    check_keepalive,
    finished_dict,
    scale_event_dict,
    stats_events,
)

__all__ = ["DEFAULT_HTTP_PORT", "create_app", "default_dashboard_dir", "serve_control"]

logger = logging.getLogger("alto.control")

DEFAULT_HTTP_PORT = 8470

# Request bodies are one input message; 16 MiB is Quart's own default, made explicit so
# that a client streaming an endless body gets a 413 rather than filling memory.
MAX_REQUEST_BODY = 16 * 1024 * 1024

_SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies buffer responses unless told not to; SSE needs each event
    # to leave at once.
    "X-Accel-Buffering": "no",
}


def default_dashboard_dir() -> Path:
    """``dashboard/`` at the repository root (``src/alto/control/`` is three levels down)."""
    return Path(__file__).resolve().parents[3] / "dashboard"


class _Refusal(Exception):
    """An HTTP 4xx answer with a JSON error body, raised from inside a handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        # Bounded: a parse error may quote the offending input, which may be megabytes.
        message = truncate_error(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, headers=headers, mimetype="application/json")


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _instance_dict(inst: InstanceStatistics) -> dict[str, Any]:
    return {
        "id": inst.instance_id,
        "stage": inst.stage,
        "state": str(inst.state),
        "queue_depth": inst.queue_depth,
        "credits": inst.credits,
        "credits_in_use": inst.credits_in_use,
        "backlog": inst.backlog,
        "open_groups": inst.open_groups,
        "frames_in": inst.frames_in,
        "frames_out": inst.frames_out,
        "pid": inst.pid,
        "last_error": inst.last_error,
        "gauges": dict(inst.gauges),
    }


def _stage_dict(stage: StageStatistics) -> dict[str, Any]:
    return {
        "name": stage.name,
        "scheduler": stage.scheduler,
        "stateful": stage.stateful,
        "aggregate_level": stage.aggregate_level,
        "fanout": stage.fanout,
        "inputs": list(stage.inputs),
        "outputs": list(stage.outputs),
        "instances": list(stage.instances),
        "target_instances": stage.target_instances,
        "max_instances": stage.max_instances,
        "frames_processed": stage.frames_processed,
        "errors": stage.errors,
        "autoscale": autoscale_dict(stage.autoscale),
    }


def _edges(stats: RuntimeStatistics) -> list[tuple[str, str, str]]:
    """The runtime's edges, or, if it reports none, edges derived from stage inputs/outputs."""
    if stats.edges:
        return list(stats.edges)
    producers: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = {}
    for stage in stats.stages:
        for queue in stage.outputs:
            producers.setdefault(queue, []).append(stage.name)
        for queue in stage.inputs:
            consumers.setdefault(queue, []).append(stage.name)
    edges = []
    for queue in dict.fromkeys([*producers, *consumers]):
        for src in producers.get(queue, ["ingress"]):
            for dst in consumers.get(queue, ["sink"]):
                edges.append((src, queue, dst))
    return edges


def _pipeline_dict(stats: RuntimeStatistics) -> dict[str, Any]:
    schedulers = {s.name: s for s in stats.stages}
    edges = []
    queues: dict[str, dict[str, Any]] = {}
    for src, queue, dst in _edges(stats):
        target = schedulers.get(dst)
        routing = target.scheduler if target is not None else "sink"
        edges.append(
            {
                "from": src,
                "queue": queue,
                "to": dst,
                "routing": routing,
                "aggregate_level": target.aggregate_level if target is not None else None,
            }
        )
        q = queues.setdefault(queue, {"name": queue, "producers": [], "consumers": []})
        if src not in q["producers"]:
            q["producers"].append(src)
        if dst not in q["consumers"]:
            q["consumers"].append(dst)
    return {
        "pipeline": stats.pipeline,
        "stages": [_stage_dict(s) for s in stats.stages],
        "queues": list(queues.values()),
        "edges": edges,
        "instances": [_instance_dict(i) for i in stats.instances],
        "requests": {
            "in_flight": stats.requests_in_flight,
            "max_in_flight": stats.max_inflight_requests,
            "submitted": stats.requests_submitted,
            "completed": stats.requests_completed,
            "failed": stats.requests_failed,
            "refused": stats.requests_refused,
        },
        "finished": finished_dict(stats),
        "frames_relayed": stats.frames_relayed,
        "scale_events": stats.scale_events,
        "scale_log": [scale_event_dict(e, stats.time) for e in stats.scale_log],
        "max_instances": stats.max_instances,
    }


def _outcome_dict(outcome: RequestOutcome, now: float) -> dict[str, Any]:
    """A finished request as ``GET /api/requests`` lists it (times in seconds)."""
    ttfr = outcome.time_to_first_result
    return {
        "request_id": outcome.request_id,
        "status": outcome.status,
        "latency_s": round(outcome.latency, 6),
        "time_to_first_result_s": round(ttfr, 6) if ttfr is not None else None,
        "results": outcome.results,
        "error": outcome.error or None,
        "traced": outcome.traced,
        "age_s": round(max(0.0, now - outcome.finished_at), 3),
    }


def _timeline(raw: dict[str, Any]) -> dict[str, Any]:
    """``Runtime.request_timeline``'s answer, with a ``state`` even for a request known
    only by its trace (its outcome already forgotten)."""
    body = dict(raw)
    trace = body.get("trace")
    if "state" not in body and isinstance(trace, dict):
        body["state"] = trace.get("status", "unknown")
        body.setdefault("latency_s", trace.get("latency_s"))
    body.setdefault("state", "unknown")
    return body


def _check_json_media_type() -> None:
    """A body declared as something other than JSON is refused (415) before it is read."""
    declared = request.headers.get("Content-Type")
    if declared is None:
        return
    media = declared.partition(";")[0].strip().lower()
    if media in JSON_MEDIA_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise _Refusal(
        415,
        f"Content-Type {declared[:100]!r} is not JSON; send the body as application/json",
    )


async def _read_json() -> Any:
    _check_json_media_type()
    raw = await request.get_data(cache=False, as_text=False)
    try:
        return json.loads(raw)
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and the ValueError of an integer literal
        # past Python's int_max_str_digits (4300 digits).
        raise _Refusal(400, f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        # json's C scanner refuses nesting past the interpreter's recursion limit this way.
        raise _Refusal(400, "malformed JSON body: nested too deeply") from exc


def _instance_count(body: Any) -> int:
    """N from a scale body ``{"instances": N}``; anything else is a 400 saying what is
    expected. An integral float (``4.0``) counts, as JSON Schema's integers do; the upper
    bound is the runtime's to check (a 409 naming the limit)."""
    expected = 'expected a JSON object {"instances": N} with an integer N >= 1'
    if not isinstance(body, dict):
        raise _Refusal(400, f"{expected}, got {type(body).__name__}")
    unknown = [key for key in body if key != "instances"]
    if unknown:
        raise _Refusal(400, f"{expected}; unknown key {unknown[0][:100]!r} (allowed: instances)")
    count = body.get("instances")
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int):
        raise _Refusal(400, f"{expected}; instances is {json.dumps(count)[:100]}")
    if count < 1:
        raise _Refusal(400, f"{expected}; a stage needs at least 1 instance, not {count}")
    return count


# What a deadline may look like as text: a plain decimal number (float() would also take
# "1_000", " 5", "nan" and "inf").
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# W3C Trace Context, version 00: lowercase hex only (the standard's HEXDIGLC).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _single_arg(name: str) -> str | None:
    """A query parameter given at most once (twice is ambiguous: refused)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise _Refusal(
            400, f"the query parameter {name} is given {len(values)} times; give it once"
        )
    return values[0] if values else None


def _timeout_option() -> float | None:
    """The request's deadline in seconds from ``?timeout=`` or ``X-Alto-Timeout``, or None.
    The runtime's rules bound it (``check_timeout``: more than 0, at most a day)."""
    query = _single_arg("timeout")
    headers = request.headers.getlist(TIMEOUT_HEADER)
    if len(headers) > 1:
        raise _Refusal(400, f"one {TIMEOUT_HEADER} header, not {len(headers)}")
    header = headers[0] if headers else None
    if query is not None and header is not None:
        raise _Refusal(
            400,
            f"give the deadline once: the timeout query parameter or the {TIMEOUT_HEADER} "
            "header, not both",
        )
    where, text = ("timeout", query) if query is not None else (TIMEOUT_HEADER, header)
    if text is None:
        return None
    try:
        if len(text) > 64 or not _SECONDS.fullmatch(text.strip()):
            raise ValueError(f"timeout must be a number of seconds, got {text[:64]!r}")
        return check_timeout(float(text))
    except ValueError as exc:
        raise _Refusal(400, f"{where}: {exc}") from exc


def _traceparent_option() -> str | None:
    """The W3C ``traceparent`` header, checked, or None when the request has none."""
    values = request.headers.getlist("traceparent")
    if not values:
        return None
    if len(values) > 1:
        raise _Refusal(400, f"one traceparent header, not {len(values)}")
    value = values[0].strip()
    expected = (
        "the W3C format is 00-<32 lowercase hex trace id>-<16 lowercase hex parent span id>-"
        "<2 hex flags>, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )
    if not _TRACEPARENT.fullmatch(value):
        raise _Refusal(400, f"malformed traceparent header {value[:80]!r}: {expected}")
    try:
        parse_traceparent(value)
    except ValueError as exc:
        raise _Refusal(400, f"{exc}: {expected}, ids not all zeros") from exc
    return value


def _response_traceparent(
    runtime: ControlRuntime, request_id: int, traceparent: str | None
) -> str | None:
    """The ``traceparent`` the ingress answers a traced request with: its trace id and the
    id of alto's own span for the request (``alto.request``, a child of the caller's span
    when it sent one), as exported later."""
    timeline = runtime.request_timeline(request_id)
    trace = timeline.get("trace") if timeline is not None else None
    if not isinstance(trace, dict) or not trace.get("trace_id") or not trace.get("span_id"):
        return None
    return f"00-{trace['trace_id']}-{trace['span_id']}-01"


def _bounded_int(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter in ``low..high``; anything else is a 400 naming it."""
    text = _single_arg(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 12) or not (
        low <= int(text) <= high
    ):
        raise _Refusal(400, f"{name} must be an integer in {low}..{high}, not {text[:100]!r}")
    return int(text)


def _wants_stream() -> bool:
    flag = request.args.get("stream")
    if flag is not None:
        # Exactly the values /openapi.json lists: a flag that is not one is a typo.
        if flag in STREAM_FLAGS[:3]:
            return True
        if flag in STREAM_FLAGS[3:]:
            return False
        raise _Refusal(400, f"stream must be true or false (also 1/0, yes/no), not {flag[:100]!r}")
    best = request.accept_mimetypes.best_match(["text/event-stream", "application/json"])
    return best != "application/json"


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class _RequestRun:
    """One request through the ingress: turns its events into JSON. (Its latency is
    measured by the runtime's request observer, as every door's is: not here, so it
    counts once.)"""

    def __init__(
        self, ingress: ControlStats, decode: Callable[[str, bytes], dict[str, Any]]
    ) -> None:
        self.started = trio.current_time()
        self.request_id = 0
        self.results = 0
        self._ingress = ingress
        self._decode = decode

    def render(self, event: RequestEvent) -> tuple[str, dict[str, Any]]:
        now = trio.current_time()
        if event.request_id:
            self.request_id = event.request_id
        rid = self.request_id
        if event.kind == "result":
            self.results += 1
            return "result", {
                "request_id": rid,
                "queue": event.queue,
                "key_path": list(event.key_path),
                **self._decode(event.queue, event.payload),
            }
        if event.kind == "done":
            latency = now - self.started
            return "done", {"request_id": rid, "results": self.results, "latency_s": latency}
        if event.kind == "error":
            return "error", {"request_id": rid, "message": event.message}
        return event.kind, {"request_id": rid}

    async def events(
        self, first: RequestEvent, rest: AsyncIterator[RequestEvent]
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Rendered events through ``done`` or ``error``; never ends without one of them."""
        yield self.render(first)
        if first.kind in ("done", "error"):
            return
        try:
            async for event in rest:
                yield self.render(event)
                if event.kind in ("done", "error"):
                    return
        except Exception as exc:
            # Invariant 4 of the design: a request ends in results or an explicit error.
            logger.exception("request %d: the runtime's result stream raised", self.request_id)
            message = f"result stream failed: {type(exc).__name__}: {exc}"
        else:
            message = "the runtime ended the result stream without done or error"
        # The runtime never saw this error: it goes to the recent errors from here.
        self._ingress.observe_error(trio.current_time(), self.request_id, message)
        yield self.render(RequestEvent("error", self.request_id, message=message))


class _CloseAfterEarlyAnswer:
    """ASGI middleware: an answer that starts before the request body has been received
    in full says ``Connection: close`` (RFC 9112 9.6), so the client does not reuse that
    connection.

    Why: a 401, 404, 405, 413 or 429 is often decided before the body is read. hypercorn's
    h11 layer then cannot recycle the connection, and the close it starts instead runs in
    the app's task, which quart-trio cancels as soon as its message reader sees the
    ``http.disconnect`` that hypercorn's close sends first. The connection stays open and
    is never recycled: hypercorn reads and drops the rest of the body, then leaves the
    client's next request unread, and the client waits until its timeout. With
    ``Connection: close`` the client sends its next request on a new connection and closes
    this one, which ends it on the server side too. (Draining the unread rest instead would
    hold every refusal until the whole body, up to ``MAX_REQUEST_BODY``, had arrived.)

    Requests without a body (no ``Content-Length``, or 0, and no ``Transfer-Encoding``)
    pass through untouched, so keep-alive for GETs never depends on timing.
    """

    def __init__(
        self, app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
    ) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        # HTTP/2 forbids the header (RFC 9113 8.2.2) and needs none: one stream ending
        # early does not block the next.
        if (
            scope["type"] != "http"
            or scope["http_version"] not in ("1.0", "1.1")
            or not _declares_body(scope["headers"])
        ):
            await self._app(scope, receive, send)
            return
        body_received = False

        async def tracking_receive() -> ASGIReceiveEvent:
            nonlocal body_received
            message = await receive()
            # hypercorn passes the last piece only after h11 has seen the body's end.
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_received = True
            return message

        async def closing_send(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and not body_received:
                kept = message.get("headers", [])
                headers = [(k, v) for k, v in kept if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self._app(scope, tracking_receive, closing_send)


# How long the last piece of a response may take to leave once the app is being cancelled
# (the client went away, or quart-trio's response timeout): it is written to a socket
# buffer, so only a peer that stopped reading makes it wait.
_LAST_SEND_GRACE_S = 10.0


class _ShieldLastSend:
    """ASGI middleware: the last ``send`` of a response runs shielded from cancellation.

    Why: hypercorn finishes a response inside that ``send``: it ends the message, tells
    the app the stream closed (``http.disconnect``) and then, when the connection must not
    be reused (``Connection: close``, HTTP/1.0), closes it. quart-trio cancels the app's
    task as soon as its message reader sees that ``http.disconnect``, which cancels the
    close half-way: the socket then stays open until hypercorn's keep-alive timeout, and a
    client that reads until EOF waits that long for an answer it already has. The shield
    lets the close finish; its own deadline bounds it.
    """

    def __init__(
        self, app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
    ) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def finishing_send(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True) as shield:
                    shield.relative_deadline = _LAST_SEND_GRACE_S
                    await send(message)
            else:
                await send(message)

        await self._app(scope, receive, finishing_send)


def _declares_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _ClosingBody:
    """A response body that closes the runtime's result iterator with itself.

    Quart closes the body when the response ends or the client goes away; closing an async
    generator that never started would skip its ``finally``, so the runtime's iterator is
    closed here explicitly.
    """

    def __init__(self, body: AsyncGenerator[bytes, None], source: AsyncIterator[Any]) -> None:
        self._body = body
        self._source = source

    def __aiter__(self) -> _ClosingBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._body.__anext__()

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            await _aclose(self._source)


def create_app(
    runtime: ControlRuntime,
    *,
    token: str | None = None,
    dashboard_dir: Path | None = None,
    stream_interval: float = 0.25,
    sse_keepalive: float = DEFAULT_KEEPALIVE_S,
) -> QuartTrio:
    """Build the control plane app for ``runtime``.

    ``token``, when given, is required as ``Authorization: Bearer <token>`` on the mutating
    endpoints. ``dashboard_dir`` overrides where the dashboard's static files are found.
    ``sse_keepalive``: seconds of silence after which an SSE stream sends a comment line.
    The app starts its statistics sampler when it starts serving (ASGI lifespan).

    Raises ValueError for an empty token, or a ``stream_interval`` or ``sse_keepalive``
    outside its range (the message names it).
    """
    if token is not None and not token:
        raise ValueError("token must not be empty (pass None for no authentication)")
    keepalive = check_keepalive(sse_keepalive)
    static_dir = (dashboard_dir if dashboard_dir is not None else default_dashboard_dir()).resolve()
    app = QuartTrio("alto.control")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BODY
    # No redirects from `//` to `/`: /dashboard//etc/passwd names an absolute path, which
    # is refused (404) like every name outside the dashboard directory.
    app.url_map.merge_slashes = False
    # Quart's documented place for ASGI middleware (Quart.asgi_app's docstring).
    app.asgi_app = _ShieldLastSend(_CloseAfterEarlyAnswer(app.asgi_app))  # type: ignore[method-assign]
    registry, ingress = open_registry(runtime)
    hub = StatsHub(runtime, ingress, stream_interval)
    types: dict[str, Any] = {}

    @app.before_serving
    async def _start_sampler() -> None:
        app.nursery.start_soon(hub.run)

    @app.errorhandler(_Refusal)
    async def _refused(exc: _Refusal) -> Response:
        return _json_response({"error": exc.message}, exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        # Keep what the exception says besides its body: a 405's Allow above all.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        path = request.path[:200]
        if isinstance(exc, NotFound):
            message = f"no endpoint or file at {path!r}; the endpoints are listed at /openapi.json"
        elif isinstance(exc, MethodNotAllowed):
            allowed = ", ".join(exc.valid_methods or ())
            message = f"{request.method} is not allowed on {path!r}; allowed: {allowed}"
        else:
            message = f"{exc.name}: {exc.description}"
        return _json_response({"error": message}, status, headers)

    @app.errorhandler(Exception)
    async def _internal_error(exc: Exception) -> Response:
        logger.exception("control plane: unhandled error in %s %s", request.method, request.path)
        return _json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    def check_token() -> None:
        if token is None:
            return
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="alto"'}
        if scheme.lower() != "bearer" or not credentials.strip():
            raise _Refusal(401, "this endpoint needs Authorization: Bearer <token>", challenge)
        if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise _Refusal(401, "wrong token", challenge)

    def find_stage(stats: RuntimeStatistics, name: str) -> StageStatistics:
        for stage in stats.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in stats.stages)
        raise _Refusal(404, f"unknown stage {name!r}; stages: {known}")

    def decode(queue: str, payload: bytes) -> dict[str, Any]:
        try:
            if queue not in types:
                types[queue] = runtime.queue_type(queue)
            message = types[queue].FromString(payload)
            return {"output": json_format.MessageToDict(message)}
        except (KeyError, DecodeError, TypeError, ValueError, AttributeError) as exc:
            # The payload is still the client's: hand it over undecoded rather than drop it.
            return {
                "output": None,
                "payload_base64": base64.b64encode(payload).decode("ascii"),
                "decode_error": f"{type(exc).__name__}: {exc}",
            }

    # -- status ---------------------------------------------------------------------

    @app.get("/api/pipeline")
    async def pipeline() -> Response:
        return _json_response(_pipeline_dict(runtime.statistics()))

    @app.get("/api/instances")
    async def instances() -> Response:
        stats = runtime.statistics()
        return _json_response({"instances": [_instance_dict(i) for i in stats.instances]})

    @app.get("/api/stream")
    async def stream() -> Response:
        if request.method == "HEAD":
            # No body will be sent: an endless generator would hold the connection forever.
            return Response(b"", mimetype="text/event-stream", headers=_SSE_HEADERS)
        response = Response(
            stats_events(hub, keepalive), mimetype="text/event-stream", headers=_SSE_HEADERS
        )
        response.timeout = None  # an endless stream: no RESPONSE_TIMEOUT
        return response

    # -- probes: never behind the token (a load balancer or kubelet has none) ------------

    @app.get("/healthz")
    async def healthz() -> Response:
        # Liveness only: answering at all is the proof; the pipeline is /readyz's business.
        return _json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            state = readiness(runtime.statistics())
        except Exception as exc:
            logger.exception("readiness: statistics() failed")
            message = f"statistics failed: {type(exc).__name__}: {exc}"
            return _json_response({"status": "not ready", "error": message}, 503)
        return _json_response(state.to_json(), 200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.get("/openapi.json")
    async def openapi() -> Response:
        document = openapi_document(
            runtime.statistics(), runtime.input_type(), auth=token is not None
        )
        return _json_response(document)

    # -- commands -------------------------------------------------------------------

    @app.post("/api/stages/<stage>/scale")
    async def scale(stage: str) -> Response:
        check_token()
        find_stage(runtime.statistics(), stage)
        count = _instance_count(await _read_json())
        try:
            await runtime.scale(stage, count)
        except KeyError as exc:
            raise _Refusal(404, f"unknown stage {stage!r}") from exc
        except (ValueError, AltoError) as exc:
            # Well-formed, but refused by the runtime's limits (the message names the
            # limit), its state (no launcher) or its autoscaler (ScaleConflict, a
            # ValueError naming the stage's autoscale range): a conflict, as draining a
            # last instance is.
            raise _Refusal(409, str(exc)) from exc
        return _json_response(_stage_dict(find_stage(runtime.statistics(), stage)))

    @app.post("/api/instances/<int:instance_id>/drain")
    async def drain(instance_id: int) -> Response:
        check_token()
        try:
            await runtime.drain(instance_id)
        except KeyError as exc:
            raise _Refusal(404, f"unknown instance {instance_id}") from exc
        except ValueError as exc:  # e.g. the stage's last instance
            raise _Refusal(409, str(exc)) from exc
        states = {i.instance_id: str(i.state) for i in runtime.statistics().instances}
        return _json_response(
            {"instance": instance_id, "state": states.get(instance_id, "stopped")}, 202
        )

    # -- ingress --------------------------------------------------------------------

    @app.post("/v1/pipelines/<name>/requests")
    async def submit(name: str) -> Response:
        check_token()
        served = runtime.statistics().pipeline
        if name != served:
            raise _Refusal(404, f"unknown pipeline {name!r}; this runtime serves {served!r}")
        streaming = _wants_stream()
        timeout = _timeout_option()
        traceparent = _traceparent_option()
        body = await _read_json()
        input_type = runtime.input_type()
        try:
            message = json_format.ParseDict(body, input_type())
        except (
            json_format.ParseError,
            TypeError,
            ValueError,
            AttributeError,
            KeyError,
            RecursionError,
        ) as exc:
            raise _Refusal(
                400, f"input does not fit {input_type.DESCRIPTOR.full_name}: {exc}"
            ) from exc

        run = _RequestRun(ingress, decode)
        try:
            source = runtime.submit(
                message.SerializeToString(), timeout=timeout, traceparent=traceparent
            )
            first = await source.__anext__()
        except OverloadedError as exc:
            retry_after = max(1, math.ceil(exc.retry_after))
            raise _Refusal(429, str(exc), {"Retry-After": str(retry_after)}) from exc
        except ValueError as exc:  # the input cannot travel as one frame
            raise _Refusal(413, str(exc)) from exc
        except StopAsyncIteration:
            first = RequestEvent("error", 0, message="the runtime ended the request at once")
            source = _empty()

        answer_headers: dict[str, str] = {}
        if first.request_id:
            answer_headers["X-Request-Id"] = str(first.request_id)
            traced = _response_traceparent(runtime, first.request_id, traceparent)
            if traced is not None:
                answer_headers["traceparent"] = traced

        if streaming:

            async def body_events() -> AsyncGenerator[bytes, None]:
                async with aclosing(run.events(first, source)) as events:
                    async for kind, data in events:
                        yield _sse(kind, data)

            headers = {**_SSE_HEADERS, **answer_headers}
            body = KeepaliveBody(_ClosingBody(body_events(), source), keepalive, app.nursery)
            response = Response(body, mimetype="text/event-stream", headers=headers)
            response.timeout = None  # results of a long pipeline may take minutes
            return response

        results: list[dict[str, Any]] = []
        answer: dict[str, Any] = {"request_id": first.request_id, "status": "error"}
        try:
            async with aclosing(run.events(first, source)) as events:
                async for kind, data in events:
                    if kind == "result":
                        data.pop("request_id", None)
                        results.append(data)
                    elif kind == "done":
                        answer.update(status="done", latency_s=data["latency_s"])
                    elif kind == "error":
                        answer.update(status="error", error=data["message"])
        finally:
            await _aclose(source)
        answer["request_id"] = run.request_id
        answer["results"] = results
        return _json_response(answer, headers=answer_headers)

    @app.delete("/v1/requests/<int:request_id>")
    async def cancel(request_id: int) -> Response:
        check_token()
        if not runtime.cancel(request_id, "cancelled through the control plane"):
            known = runtime.request_timeline(request_id)
            if known is None:
                why = "unknown (never admitted, or forgotten)"
            else:
                why = f"already ended ({_timeline(known)['state']})"
            raise _Refusal(404, f"no running request {request_id}: {why}")
        timeline = runtime.request_timeline(request_id)
        state = _timeline(timeline)["state"] if timeline is not None else "cancelled"
        return _json_response({"request_id": request_id, "state": state}, 202)

    # -- requests: recent, slowest, timelines ----------------------------------------

    @app.get("/api/requests")
    async def requests() -> Response:
        order = _single_arg("order")
        if order is None:
            order = REQUEST_ORDERS[0]
        if order not in REQUEST_ORDERS:
            raise _Refusal(
                400, f"order must be one of {', '.join(REQUEST_ORDERS)}, not {order[:100]!r}"
            )
        limit = _bounded_int("limit", 50, 1, MAX_REQUESTS_LISTED)
        if order == "slowest":
            outcomes = runtime.slowest_requests(limit)
        else:
            outcomes = runtime.recent_requests(limit)
        now = trio.current_time()
        return _json_response(
            {"order": order, "requests": [_outcome_dict(o, now) for o in outcomes[:limit]]}
        )

    @app.get("/api/requests/<int:request_id>")
    async def request_timeline(request_id: int) -> Response:
        timeline = runtime.request_timeline(request_id)
        if timeline is None:
            raise _Refusal(
                404,
                f"unknown request {request_id}: never admitted, or forgotten (the runtime "
                "keeps the most recent and the slowest requests)",
            )
        return _json_response(_timeline(timeline))

    # -- dashboard ------------------------------------------------------------------

    @app.get("/")
    async def index() -> Response:
        return await dashboard_file("index.html")

    # Assets live under /dashboard/ so that no catch-all route turns a POST to an unknown
    # path into a 405.
    @app.get("/dashboard/<path:filename>")
    async def dashboard_file(filename: str) -> Response:
        if not static_dir.is_dir():
            raise _Refusal(404, f"no dashboard at {static_dir}")
        try:
            response = await send_from_directory(static_dir, filename)
        except NotFound as exc:
            raise _Refusal(
                404,
                f"no dashboard file {filename[:100]!r}: only files inside the dashboard "
                "directory are served",
            ) from exc
        except OSError as exc:
            # A name the file system refuses (too long, say) names no dashboard file.
            raise _Refusal(404, f"no dashboard file {filename[:100]!r}: {exc.strerror}") from exc
        response.cache_control.no_cache = True
        return response

    return app


async def _empty() -> AsyncGenerator[RequestEvent, None]:
    return
    yield  # pragma: no cover


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve_control(
    runtime: ControlRuntime,
    host: str,
    port: int,
    *,
    token: str | None = None,
    stream_interval: float = 0.25,
    sse_keepalive: float = DEFAULT_KEEPALIVE_S,
    dashboard_dir: Path | None = None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control plane on ``host:port`` until cancelled.

    ``sock``: a listening socket already bound to ``host:port`` (``alto serve`` binds it
    first, so that a port in use ends start-up before any instance is spawned); this
    function then owns it.

    Start it with ``await nursery.start(serve_control, runtime, host, port)``: that returns
    the bound port, which is the chosen free port when ``port`` is 0. Cancellation shuts the
    server down.

    Raises ValueError when ``host`` is not a loopback address and no ``token`` is given:
    without one, anyone who can reach the port could scale stages and submit requests.
    Raises OSError when the address cannot be bound.
    """
    if token is None and not _is_loopback(host):
        raise ValueError(
            f"refusing to serve the control plane on non-loopback host {host!r} without a "
            "token: anyone who can reach it could scale stages and submit requests. Pass a "
            "token (alto serve --token ...) or bind 127.0.0.1."
        )
    app = create_app(
        runtime,
        token=token,
        dashboard_dir=dashboard_dir,
        stream_interval=stream_interval,
        sse_keepalive=sse_keepalive,
    )
    config = Config()
    bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if sock is not None:
        # hypercorn adopts the descriptor: hand it a duplicate and close ours.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        sock.close()
    else:
        config.bind = [f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("alto.control.http")
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config, mode="asgi"))
        bound = int(binds[0].rsplit(":", 1)[1])
        logger.info("control plane on http://%s:%d", bind_host, bound)
        task_status.started(bound)
