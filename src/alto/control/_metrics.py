"""What the control plane measures itself, and the Prometheus view of the runtime.

Three sources feed ``GET /metrics``:

- :class:`RuntimeCollector` reads ``runtime.statistics()`` at scrape time and turns the
  frozen snapshot into gauges (queue depth, credits, open groups, requests in flight,
  instances per stage and their states, autoscale ranges), counters (frames relayed,
  requests by status, scale events, stage errors), the histograms the stages' instances
  measured (queue wait, processing, time to first output, outputs per input and, on LM
  stages, OpenTelemetry's ``gen_ai.server.*`` and token usage), plus ``alto_build_info``.
  The runtime keeps the counts; we only translate, so a scrape never disturbs the
  dataplane beyond one snapshot.
- :class:`ControlStats` is what the control plane keeps itself. It is told of every
  request that ends, whichever door it came through (the HTTP ingress, a socket client,
  an in-process ``submit``): it registers itself as the runtime's request observer.
  End-to-end latency and time to first result become Prometheus histograms and a bounded
  window of recent samples from which the live stream reports p50/p99; failed requests
  become the stream's recent errors. Its :class:`ScaleCounts` counts the runtime's scale
  events by stage, direction and who made them, from the bounded scale log of successive
  snapshots.

Each app gets its own :class:`prometheus_client.CollectorRegistry`, so two apps in one
process (tests do this) never collide on metric names; it also carries prometheus_client's
process and platform collectors (``process_*``, ``python_info``) of the serving process.
The Grafana dashboard in ``docs/grafana/alto.json`` queries only these names (a test keeps
it so).
"""

from __future__ import annotations

import logging
import math
import platform
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ..dataplane._stats import (
    HistogramSnapshot,
    InstanceState,
    RequestOutcome,
    RuntimeCommands,
    RuntimeStatistics,
    ScaleEvent,
)
from ._api import ControlRuntime

logger = logging.getLogger("alto.control")

# Buckets for whole-pipeline latencies: compound AI requests take from tens of
# milliseconds (cached, small models) to minutes (long generations); prometheus_client's
# default buckets stop at 10 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# p50/p99 on the live stream cover the last minute, at most this many requests: enough for
# a stable p99 (about 40 samples above it) and cheap to sort four times a second.
LATENCY_WINDOW_S = 60.0
LATENCY_WINDOW_MAX = 4096

# This many recent request errors are kept for the dashboard.
RECENT_ERRORS_MAX = 20

# The histograms the stages' instances report (``alto._telemetry``), as Prometheus
# families: OpenTelemetry's dotted names with the unit at the end, as the rest of
# /metrics names them (``gen_ai.server.time_to_first_token`` is
# ``alto_gen_ai_server_time_to_first_token_seconds``).
STAGE_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "alto.stage.queue_wait": (
        "alto_stage_queue_wait_seconds",
        "Time an input waited inside an instance before processing started.",
    ),
    "alto.stage.processing": (
        "alto_stage_processing_seconds",
        "Time the stage's code ran per input (process() or group_closed()).",
    ),
    "alto.stage.time_to_first_output": (
        "alto_stage_time_to_first_output_seconds",
        "Time from the start of processing an input to its first output.",
    ),
    "alto.stage.outputs": (
        "alto_stage_outputs_per_input",
        "Outputs (partial outputs) written per input.",
    ),
    "gen_ai.server.time_to_first_token": (
        "alto_gen_ai_server_time_to_first_token_seconds",
        "LM stages: time from asking the engine to its first token "
        "(OpenTelemetry gen_ai.server.time_to_first_token).",
    ),
    "gen_ai.server.time_per_output_token": (
        "alto_gen_ai_server_time_per_output_token_seconds",
        "LM stages: mean time per output token after the first "
        "(OpenTelemetry gen_ai.server.time_per_output_token).",
    ),
}
# Token usage: one family, the token type as a label (OpenTelemetry's
# gen_ai.client.token.usage with gen_ai.token.type).
TOKEN_USAGE = "alto_gen_ai_client_token_usage_tokens"
TOKEN_TYPES = {
    "gen_ai.client.token.usage.input": "input",
    "gen_ai.client.token.usage.output": "output",
}


@dataclass(frozen=True, slots=True)
class RequestError:
    time: float
    request_id: int
    message: str


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (``None`` when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def scale_direction(event: ScaleEvent) -> str:
    """``up``, ``down``, or ``none`` (the target changed back to what runs)."""
    if event.to_instances > event.from_instances:
        return "up"
    if event.to_instances < event.from_instances:
        return "down"
    return "none"


class ScaleCounts:
    """Scale events counted by (stage, direction, by), from successive scale logs.

    The runtime keeps only its most recent scale events (``statistics().scale_log``,
    oldest first, in time order); every snapshot the control plane takes (the stream's
    sampler, four times a second by default, and each scrape) passes it here, and the
    events newer than the newest counted so far are counted. Events are lost only if
    more than the log holds happen between two snapshots.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._newest = -math.inf  # time of the newest event counted
        self._at_newest = 0  # events at that time counted

    def update(self, log: Sequence[ScaleEvent]) -> None:
        with self._lock:
            at_newest = 0
            for event in log:
                if event.time < self._newest:
                    continue
                if event.time == self._newest:
                    at_newest += 1
                    if at_newest <= self._at_newest:
                        continue
                self._counts[(event.stage, scale_direction(event), event.by)] += 1
            if log and log[-1].time >= self._newest:
                newest = log[-1].time
                same = sum(1 for e in log if e.time == newest)
                self._at_newest = max(same, self._at_newest) if newest == self._newest else same
                self._newest = newest

    def counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._counts)


class ControlStats:
    """Latencies and errors of every request that ends, whichever door it came through,
    and the scale event counts (:class:`ScaleCounts`).

    :meth:`observe` is the runtime's request observer (``add_request_observer``), called
    in the runtime's Trio thread; the scrape and the stream read from the same thread, and
    the lock is only for prometheus_client's own threads, which may scrape concurrently.
    Latency counts the requests that completed (status ``done``); time to first result
    counts every request that had one, whatever its end.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "alto_request_latency_seconds",
            "End-to-end latency of completed requests (every door: HTTP, socket clients, "
            "in-process), from admission to the last result.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_result = Histogram(
            "alto_request_first_result_seconds",
            "Time from a request's admission to its first result (every door).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW_MAX)
        self._first: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW_MAX)
        self._errors: deque[RequestError] = deque(maxlen=RECENT_ERRORS_MAX)
        self.scale_counts = ScaleCounts()

    def observe(self, outcome: RequestOutcome) -> None:
        """One request ended. Never raises: it runs inside the dataplane."""
        try:
            ttfr = outcome.time_to_first_result
            if ttfr is not None:
                self.first_result.observe(ttfr)
            if outcome.status == "done":
                self.latency.observe(outcome.latency)
            with self._lock:
                if ttfr is not None:
                    self._first.append((outcome.finished_at, ttfr))
                if outcome.status == "done":
                    self._latencies.append((outcome.finished_at, outcome.latency))
                elif outcome.status in ("failed", "timed_out"):
                    self._errors.append(
                        RequestError(outcome.finished_at, outcome.request_id, outcome.error)
                    )
        except Exception:
            logger.exception("request %d: recording its outcome failed", outcome.request_id)

    def observe_error(self, now: float, request_id: int, message: str) -> None:
        """An error the control plane itself ended a request's stream with (the runtime
        did not: it never saw it)."""
        with self._lock:
            self._errors.append(RequestError(now, request_id, message))

    def recent_errors(self) -> list[RequestError]:
        with self._lock:
            return list(self._errors)

    def summary(self, now: float) -> dict[str, float | int | None]:
        """p50/p99 of the requests that completed in the last :data:`LATENCY_WINDOW_S`."""
        since = now - LATENCY_WINDOW_S
        with self._lock:
            latencies = sorted(s for t, s in self._latencies if t >= since)
            first = sorted(s for t, s in self._first if t >= since)
        return {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "first_result_p50": percentile(first, 50),
            "first_result_p99": percentile(first, 99),
            "count": len(latencies),
            "window_s": LATENCY_WINDOW_S,
        }


class RuntimeCollector:
    """A custom collector: one ``runtime.statistics()`` snapshot per scrape.

    Names follow Prometheus' conventions: a counter ends in ``_total``, a quantity says its
    unit (``_frames``, ``_seconds``, ``_bytes``) before it, and a per-instance series is
    labelled ``instance_id``, never ``instance``: Prometheus attaches ``instance`` (the
    scraped target) to every series, and a clash renames ours to ``exported_instance``.
    """

    def __init__(self, runtime: RuntimeCommands, scale_counts: ScaleCounts) -> None:
        self._runtime = runtime
        self._scale_counts = scale_counts

    def collect(self) -> Iterator[Metric]:
        from .. import __version__  # here: the package is still importing this module

        build = GaugeMetricFamily(
            "alto_build_info",
            "Always 1: the alto version and the Python that serve this pipeline.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build

        stats = self._runtime.statistics()
        self._scale_counts.update(stats.scale_log)
        yield from _instance_metrics(stats)
        yield from _stage_metrics(stats)
        yield from _stage_histograms(stats)
        yield from _runtime_metrics(stats)
        yield from _scale_metrics(self._scale_counts)


def _instance_metrics(stats: RuntimeStatistics) -> Iterator[Metric]:
    live = [i for i in stats.instances if i.state is not InstanceState.STOPPED]
    labels = ["stage", "instance_id"]

    def per_instance(
        family: GaugeMetricFamily | CounterMetricFamily, attr: str
    ) -> GaugeMetricFamily | CounterMetricFamily:
        for inst in live:
            family.add_metric([inst.stage, str(inst.instance_id)], getattr(inst, attr))
        return family

    yield per_instance(
        GaugeMetricFamily(
            "alto_instance_queue_depth_frames",
            "Frames dispatched to the instance and not yet acknowledged.",
            labels=labels,
        ),
        "queue_depth",
    )
    yield per_instance(
        GaugeMetricFamily(
            "alto_instance_credits_frames",
            "The most unacknowledged frames the instance may hold (its credits).",
            labels=labels,
        ),
        "credits",
    )
    yield per_instance(
        GaugeMetricFamily(
            "alto_instance_credits_in_use_frames",
            "Frames sent to the instance and not yet acknowledged, at most its credits.",
            labels=labels,
        ),
        "credits_in_use",
    )
    yield per_instance(
        GaugeMetricFamily(
            "alto_instance_backlog_frames",
            "Frames held in the runtime waiting for a credit of the instance.",
            labels=labels,
        ),
        "backlog",
    )
    yield per_instance(
        GaugeMetricFamily(
            "alto_instance_open_groups",
            "Aggregation groups pinned to the instance.",
            labels=labels,
        ),
        "open_groups",
    )
    yield per_instance(
        CounterMetricFamily(
            "alto_instance_received_frames",
            "Frames the runtime sent to the instance.",
            labels=labels,
        ),
        "frames_out",
    )
    yield per_instance(
        CounterMetricFamily(
            "alto_instance_sent_frames",
            "Frames the instance sent to the runtime.",
            labels=labels,
        ),
        "frames_in",
    )
    info = GaugeMetricFamily(
        "alto_instance_info",
        "Always 1: an instance that is not stopped, its stage and its state "
        "(starting, ready, draining, crashed).",
        labels=[*labels, "state"],
    )
    for inst in live:
        info.add_metric([inst.stage, str(inst.instance_id), str(inst.state)], 1)
    yield info


def _stage_metrics(stats: RuntimeStatistics) -> Iterator[Metric]:
    instances = GaugeMetricFamily(
        "alto_stage_instances", "Instances of the stage that are not stopped.", labels=["stage"]
    )
    ready = GaugeMetricFamily(
        "alto_stage_ready_instances",
        "Instances of the stage that take new work (state ready).",
        labels=["stage"],
    )
    target = GaugeMetricFamily(
        "alto_stage_target_instances", "Instances the stage is scaled to.", labels=["stage"]
    )
    most = GaugeMetricFamily(
        "alto_stage_max_instances",
        "The most instances the stage may be scaled to (its max_instances).",
        labels=["stage"],
    )
    errors = CounterMetricFamily(
        "alto_stage_errors", "Errors raised by the stage's instances.", labels=["stage"]
    )
    processed = CounterMetricFamily(
        "alto_stage_processed_frames",
        "Frames the stage's instances processed.",
        labels=["stage"],
    )
    autoscale_min = GaugeMetricFamily(
        "alto_stage_autoscale_min_instances",
        "Autoscaled stages: the fewest instances the autoscaler keeps.",
        labels=["stage"],
    )
    autoscale_max = GaugeMetricFamily(
        "alto_stage_autoscale_max_instances",
        "Autoscaled stages: the most instances the autoscaler starts.",
        labels=["stage"],
    )
    ready_count = Counter(i.stage for i in stats.instances if i.state is InstanceState.READY)
    for stage in stats.stages:
        if stage.autoscale is not None:
            autoscale_min.add_metric([stage.name], stage.autoscale[0])
            autoscale_max.add_metric([stage.name], stage.autoscale[1])
        instances.add_metric([stage.name], len(stage.instances))
        ready.add_metric([stage.name], ready_count[stage.name])
        target.add_metric([stage.name], stage.target_instances)
        if stage.max_instances > 0:  # 0: a runtime that does not report it
            most.add_metric([stage.name], stage.max_instances)
        errors.add_metric([stage.name], stage.errors)
        processed.add_metric([stage.name], stage.frames_processed)
    yield from (instances, ready, target, most, errors, processed)
    if autoscale_min.samples:  # only where a stage is autoscaled
        yield from (autoscale_min, autoscale_max)


def _buckets(snapshot: HistogramSnapshot) -> list[tuple[str, float]]:
    """Prometheus' cumulative ``le`` buckets from a snapshot's per-bucket counts."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(snapshot.bounds, snapshot.buckets, strict=False):
        total += count
        le: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
        out.append((le, total))
    out.append(("+Inf", snapshot.count))
    return out


def _stage_histograms(stats: RuntimeStatistics) -> Iterator[Metric]:
    """The histograms the stages' instances measured, cumulative since the runtime started.
    A family appears once some stage has reported it (the ``gen_ai`` ones only where an LM
    stage runs)."""
    families = {
        name: HistogramMetricFamily(prom, doc, labels=["stage"])
        for name, (prom, doc) in STAGE_HISTOGRAMS.items()
    }
    usage = HistogramMetricFamily(
        TOKEN_USAGE,
        "LM stages: tokens per generation, by type (input, output) "
        "(OpenTelemetry gen_ai.client.token.usage).",
        labels=["stage", "type"],
    )
    for stage in stats.stages:
        for snapshot in stage.metrics:
            if len(snapshot.buckets) != len(snapshot.bounds) + 1:
                continue  # not what alto._telemetry sends: nothing to translate
            family = families.get(snapshot.name)
            if family is not None:
                family.add_metric([stage.name], _buckets(snapshot), snapshot.sum)
            elif snapshot.name in TOKEN_TYPES:
                usage.add_metric(
                    [stage.name, TOKEN_TYPES[snapshot.name]], _buckets(snapshot), snapshot.sum
                )
    for family in (*families.values(), usage):
        if family.samples:
            yield family


def _runtime_metrics(stats: RuntimeStatistics) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "alto_requests_in_flight",
        "Requests admitted and not finished.",
        value=stats.requests_in_flight,
    )
    yield GaugeMetricFamily(
        "alto_max_inflight_requests",
        "In-flight requests past which the ingress refuses new ones (HTTP 429).",
        value=stats.max_inflight_requests,
    )
    if stats.max_instances > 0:  # 0: a runtime that does not report it
        yield GaugeMetricFamily(
            "alto_max_instances",
            "The most instance processes the runtime may run ([runtime] max_instances).",
            value=stats.max_instances,
        )
    requests = CounterMetricFamily(
        "alto_requests", "Requests by outcome at the runtime.", labels=["status"]
    )
    requests.add_metric(["submitted"], stats.requests_submitted)
    requests.add_metric(["completed"], stats.requests_completed)
    requests.add_metric(["failed"], stats.requests_failed)
    requests.add_metric(["refused"], stats.requests_refused)
    yield requests
    finished = CounterMetricFamily(
        "alto_requests_finished",
        "Requests that ended, by final status (done, failed, cancelled, timed_out), each "
        "once, whichever door they came through.",
        labels=["status"],
    )
    finished.add_metric(["done"], stats.requests_completed)
    finished.add_metric(["failed"], stats.requests_failed - stats.requests_timed_out)
    finished.add_metric(["cancelled"], stats.requests_cancelled)
    finished.add_metric(["timed_out"], stats.requests_timed_out)
    yield finished
    yield CounterMetricFamily(
        "alto_relayed_frames", "Frames the runtime relayed.", value=stats.frames_relayed
    )
    yield CounterMetricFamily(
        "alto_discarded_frames",
        "Frames dropped because their request had already ended.",
        value=stats.frames_discarded,
    )
    yield CounterMetricFamily(
        "alto_retried_frames",
        "Inputs of crashed instances of idempotent stages sent again.",
        value=stats.frames_retried,
    )
    yield CounterMetricFamily(
        "alto_instance_restarts",
        "Crashed instances replaced by the runtime.",
        value=stats.restarts,
    )
    yield CounterMetricFamily(
        "alto_scale_events", "Scale and drain commands carried out.", value=stats.scale_events
    )


def _scale_metrics(counts: ScaleCounts) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "alto_stage_scale_events",
        "Changes of a stage's target instances, by direction (up, down) and by whom "
        "(operator: the API, CLI or dashboard; autoscaler).",
        labels=["stage", "direction", "by"],
    )
    for (stage, direction, by), n in sorted(counts.counts().items()):
        family.add_metric([stage, direction, by], n)
    if family.samples:  # a labelled counter appears with its first event
        yield family


def open_registry(runtime: ControlRuntime) -> tuple[CollectorRegistry, ControlStats]:
    """A private registry with the runtime collector, the request histograms (fed by the
    runtime: this registers a request observer) and the standard ``process_*`` and
    ``python_info`` collectors (what prometheus_client's default registry carries, which a
    private registry does not get on its own)."""
    registry = CollectorRegistry(auto_describe=False)
    stats = ControlStats(registry)
    registry.register(RuntimeCollector(runtime, stats.scale_counts))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    runtime.add_request_observer(stats.observe)
    return registry, stats
