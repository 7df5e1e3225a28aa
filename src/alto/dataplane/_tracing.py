"""Request traces: when every partial output left and reached every stage.

A request is *traced* when the sampler says so (``[runtime] trace_sample_rate``, default
1.0) or when its W3C ``traceparent`` says it is sampled. Its frames carry the TRACED flag
from the ingress on: the relay sends them through its general path (the fast path never
sees them, so untraced traffic pays nothing), which records a *hop* per frame: the wall
clock time the runtime received it from its stage instance and sent it on to the next
(or to the client), with queues, instances and key paths. The instances report a *span*
per traced input (SPAN frames, see :mod:`alto._telemetry`): when it arrived, waited,
started, wrote its first and last output and ended, with LM usage attributes.

When the request ends, its :class:`TraceRecord` joins a bounded list of recent traces
(plus the slowest ones, kept longer), served by the control plane
(``GET /api/requests/{id}``, ``alto trace ID``, the dashboard's timeline), and is
exported through OpenTelemetry's SDK when an exporter is configured (OTLP, or a JSON-lines
file for tests): one ``alto.request`` span with one child span per stage per key path.

Memory is bounded: at most ``MAX_EVENTS`` hops and spans per trace (the rest counted as
dropped), ``keep`` recent traces and ``keep_slowest`` slow ones.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import re
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._telemetry import wall_clock

log = logging.getLogger("alto.runtime")

__all__ = ["TraceRecord", "Tracer", "parse_traceparent"]

MAX_EVENTS = 4096  # hops plus spans kept per trace
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: str) -> tuple[str, str, bool]:
    """``(trace_id, parent_span_id, sampled)`` of a W3C ``traceparent`` header.

    Raises ValueError for a malformed value (the W3C format: ``00-<32 hex>-<16 hex>-<2
    hex>``, ids not all zeros, version ``ff`` forbidden).
    """
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        raise ValueError(
            f"malformed traceparent {value[:80]!r}: expected 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>"
        )
    version, trace_id, span_id, flags = m.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        raise ValueError(f"invalid traceparent {value[:80]!r}")
    return trace_id, span_id, bool(int(flags, 16) & 1)


@dataclass(eq=False)
class TraceRecord:
    """Everything recorded about one traced request."""

    request_id: int
    trace_id: str  # 32 hex digits
    parent_span_id: str  # 16 hex digits, or "" when the request started the trace
    # alto's own span for the request (``alto.request``), chosen at admission so that the
    # ingress can answer with a ``traceparent`` naming it before the trace is exported
    span_id: str
    admitted: float  # wall clock (alto._telemetry.wall_clock())
    hops: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0  # events past MAX_EVENTS
    status: str = "running"
    finished: float | None = None
    error: str = ""

    def hop(
        self,
        src: str,
        src_instance: int | None,
        queue: str,
        dst: str,
        dst_instance: int | None,
        key_path: tuple[int, ...],
        kind: str = "data",
    ) -> None:
        """A traced frame passed the runtime now: from ``src`` (a stage, ``ingress`` or
        ``runtime``) to ``dst`` (a stage or ``sink``)."""
        if len(self.hops) + len(self.spans) >= MAX_EVENTS:
            self.dropped += 1
            return
        self.hops.append(
            {
                "t": wall_clock(),
                "from": src,
                "from_instance": src_instance,
                "queue": queue,
                "to": dst,
                "to_instance": dst_instance,
                "key_path": list(key_path),
                "kind": kind,
            }
        )

    def span(self, payload: bytes) -> None:
        """An instance's SPAN (JSON) for one traced input. Raises ValueError if malformed."""
        if len(self.hops) + len(self.spans) >= MAX_EVENTS:
            self.dropped += 1
            return
        body = json.loads(payload)
        if not isinstance(body, dict) or not isinstance(body.get("stage"), str):
            raise ValueError("SPAN payload is not a span object")
        self.spans.append(body)

    @property
    def latency(self) -> float:
        return (self.finished or wall_clock()) - self.admitted

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the request's timeline (times in seconds since admission, plus the
        admission's wall clock time)."""
        t0 = self.admitted

        def rel(t: Any) -> Any:
            return round(t - t0, 6) if isinstance(t, (int, float)) else t

        spans = []
        for s in self.spans:
            out = dict(s)
            for k in ("received", "started", "first_output", "last_output", "ended"):
                if k in out:
                    out[k] = rel(out[k])
            if "token_times" in out:
                out["token_times"] = [rel(t) for t in out["token_times"]]
            spans.append(out)
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id or None,
            "status": self.status,
            "error": self.error or None,
            "admitted_at": t0,
            "latency_s": round(self.latency, 6) if self.finished else None,
            "hops": [{**h, "t": rel(h["t"])} for h in self.hops],
            "spans": spans,
            "dropped_events": self.dropped,
        }


class SpanExport(Protocol):
    """Where finished traces go (an OpenTelemetry exporter behind ``_otel``)."""

    def export(self, record: TraceRecord, pipeline: str) -> None: ...


class Tracer:
    """Decides which requests are traced, and keeps the recent and the slowest traces."""

    def __init__(
        self,
        pipeline: str,
        sample_rate: float = 1.0,
        *,
        keep: int = 256,
        keep_slowest: int = 32,
        exporter: SpanExport | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"trace sample rate must be in [0, 1], got {sample_rate}")
        self.pipeline = pipeline
        self.sample_rate = sample_rate
        self.keep = keep
        self.keep_slowest = keep_slowest
        self.exporter = exporter
        self._random = random.Random(seed)
        self.running: dict[int, TraceRecord] = {}
        self.recent: OrderedDict[int, TraceRecord] = OrderedDict()
        self._slowest: list[tuple[float, int, TraceRecord]] = []  # a min-heap by latency
        self.traced = 0

    def start(self, request_id: int, traceparent: str | None) -> TraceRecord | None:
        """The trace of a new request, or None when it is not sampled. A ``traceparent``
        continues the caller's trace and its sampled flag decides. Raises ValueError for
        a malformed ``traceparent``."""
        if traceparent is not None:
            trace_id, parent, sampled = parse_traceparent(traceparent)
        else:
            trace_id, parent = secrets.token_hex(16), ""
            sampled = self.sample_rate >= 1.0 or (
                self.sample_rate > 0.0 and self._random.random() < self.sample_rate
            )
        if not sampled:
            return None
        rec = TraceRecord(request_id, trace_id, parent, secrets.token_hex(8), wall_clock())
        self.running[request_id] = rec
        self.traced += 1
        return rec

    def finish(self, record: TraceRecord, status: str, error: str = "") -> None:
        """The request ended: keep its trace among the recent (and maybe the slowest) ones
        and export it."""
        self.running.pop(record.request_id, None)
        record.status = status
        record.error = error
        record.finished = wall_clock()
        self.recent[record.request_id] = record
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        entry = (record.latency, record.request_id, record)
        if len(self._slowest) < self.keep_slowest:
            heapq.heappush(self._slowest, entry)
        elif entry[0] > self._slowest[0][0]:
            heapq.heapreplace(self._slowest, entry)
        if self.exporter is not None:
            try:
                self.exporter.export(record, self.pipeline)
            except Exception:  # an exporter must never break the dataplane
                log.exception("exporting the trace of request %d failed", record.request_id)

    def get(self, request_id: int) -> TraceRecord | None:
        """The trace of a running, recent or slow request, or None."""
        rec = self.running.get(request_id) or self.recent.get(request_id)
        if rec is None:
            for _, rid, r in self._slowest:
                if rid == request_id:
                    return r
        return rec

    def slowest(self) -> list[TraceRecord]:
        return [r for _, _, r in sorted(self._slowest, reverse=True)]


def path_of(frame: bytes | bytearray | memoryview, off: int, depth: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{depth}Q", frame, off + 10)
