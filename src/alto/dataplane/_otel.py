"""Finished traces out through OpenTelemetry's SDK: OTLP, or a JSON-lines file.

Nothing is exported by default. ``alto serve --otlp-endpoint URL`` (or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variables) sends
spans over OTLP/HTTP (protobuf) through a batching processor, off the event loop;
``--trace-file PATH`` (or ``ALTO_TRACE_FILE``) appends one JSON object per span, which is
what the tests read.

One trace per request: an ``alto.request`` span (child of the caller's span when the
request came with a W3C ``traceparent``: the trace id is the caller's) and, under it,
one span per stage per key path from the instances' SPAN reports, named ``STAGE
process`` (or ``STAGE group_closed``), from the moment the input reached the instance to
the moment it was done, with events for processing start and the first and last output,
and attributes: ``alto.stage``, ``alto.instance``, ``alto.key_path``, the queue wait, the
output count and, on LM stages, the ``gen_ai.*`` usage attributes. The spans are created
after the fact with explicit timestamps, so exporting costs the dataplane nothing while
the request runs.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace as ot
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from ._tracing import TraceRecord

__all__ = ["JsonLinesSpanExporter", "OTelExport", "exporter_from_options"]

_next_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "alto_next_trace_id", default=None
)
_next_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "alto_next_span_id", default=None
)


class _RecordIds(IdGenerator):
    """The trace and span ids alto chose at admission for a request's span; random ones
    for its children."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        chosen = _next_span_id.get()
        return chosen if chosen is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        chosen = _next_trace_id.get()
        return chosen if chosen is not None else self._random.generate_trace_id()


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span as one JSON line (OpenTelemetry's own JSON form of a span)."""

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                self._file.write(json.dumps(json.loads(span.to_json())) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _ns(t: float) -> int:
    return int(t * 1e9)


class OTelExport:
    """Turns finished :class:`TraceRecord` s into OpenTelemetry spans."""

    def __init__(
        self, exporter: SpanExporter, *, batch: bool = True, service: str = "alto"
    ) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service}), id_generator=_RecordIds()
        )
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("alto")

    def export(self, record: TraceRecord, pipeline: str) -> None:
        if record.parent_span_id:
            parent = ot.set_span_in_context(
                NonRecordingSpan(
                    SpanContext(
                        int(record.trace_id, 16),
                        int(record.parent_span_id, 16),
                        is_remote=True,
                        trace_flags=TraceFlags(TraceFlags.SAMPLED),
                    )
                )
            )
        else:
            parent = None
        token = _next_trace_id.set(int(record.trace_id, 16))
        span_token = _next_span_id.set(int(record.span_id, 16))
        try:
            root = self.tracer.start_span(
                "alto.request",
                context=parent,
                kind=SpanKind.SERVER,
                start_time=_ns(record.admitted),
                attributes={
                    "alto.pipeline": pipeline,
                    "alto.request.id": record.request_id,
                    "alto.request.status": record.status,
                },
            )
        finally:
            _next_trace_id.reset(token)
            _next_span_id.reset(span_token)
        if record.status != "done":
            root.set_status(Status(StatusCode.ERROR, record.error or record.status))
        ctx = ot.set_span_in_context(root)
        for s in record.spans:
            attrs: dict[str, Any] = {
                "alto.stage": s["stage"],
                "alto.instance": int(s.get("instance", 0)),
                "alto.key_path": str(s.get("key_path", [])),
                "alto.queue_wait_s": float(s.get("started", 0)) - float(s.get("received", 0)),
                "alto.outputs": int(s.get("outputs", 0)),
            }
            for k, v in (s.get("attributes") or {}).items():
                if isinstance(v, (str, bool, int, float)):
                    attrs[str(k)] = v
            span = self.tracer.start_span(
                f"{s['stage']} {s.get('kind', 'process')}",
                context=ctx,
                start_time=_ns(float(s["received"])),
                attributes=attrs,
            )
            span.add_event("processing started", timestamp=_ns(float(s["started"])))
            if "first_output" in s:
                span.add_event("first output", timestamp=_ns(float(s["first_output"])))
            if "last_output" in s:
                span.add_event("last output", timestamp=_ns(float(s["last_output"])))
            if s.get("status") == "error":
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=_ns(float(s["ended"])))
        root.end(end_time=_ns(record.finished or record.admitted))

    def shutdown(self) -> None:
        self.provider.shutdown()


def exporter_from_options(
    otlp_endpoint: str | None = None, trace_file: str | None = None
) -> OTelExport | None:
    """The exporter ``alto serve`` configures from its flags and the environment, or None
    (the default: nothing leaves the process)."""
    trace_file = trace_file or os.environ.get("ALTO_TRACE_FILE")
    if trace_file:
        return OTelExport(JsonLinesSpanExporter(trace_file), batch=False)
    endpoint = (
        otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if not endpoint.rstrip("/").endswith("/v1/traces") and not os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return OTelExport(OTLPSpanExporter(endpoint=endpoint))
    return None
