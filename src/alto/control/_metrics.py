"""What the control plane measures itself, and the Prometheus view of the runtime.

Two sources feed ``GET /metrics``:

- :class:`RuntimeCollector` reads ``runtime.statistics()`` at scrape time and turns the
  frozen snapshot into gauges (queue depth, credits, open groups, requests in flight,
  instances per stage and their states) and counters (frames relayed, requests by status,
  scale events, stage errors), plus ``alto_build_info``. The runtime keeps the counts; we
  only translate, so a scrape never disturbs the dataplane beyond one snapshot.
- :class:`IngressStats` is measured here, at the HTTP ingress: end-to-end latency and time
  to first result, as Prometheus histograms and as a bounded window of recent samples from
  which the live stream reports p50/p99.

Each app gets its own :class:`prometheus_client.CollectorRegistry`, so two apps in one
process (tests do this) never collide on metric names; it also carries prometheus_client's
process and platform collectors (``process_*``, ``python_info``) of the serving process.
The Grafana dashboard in ``docs/grafana/alto.json`` queries only these names (a test keeps
it so).
"""

from __future__ import annotations

import math
import platform
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..dataplane._stats import InstanceState, RuntimeCommands, RuntimeStatistics

# Buckets for whole-pipeline latencies: compound AI requests take from tens of
# milliseconds (cached, small models) to minutes (long generations); prometheus_client's
# default buckets stop at 10 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# p50/p99 on the live stream cover the last minute, at most this many requests: enough for
# a stable p99 (about 40 samples above it) and cheap to sort four times a second.
LATENCY_WINDOW_S = 60.0
LATENCY_WINDOW_MAX = 4096

# The ingress remembers this many recent request errors for the dashboard.
RECENT_ERRORS_MAX = 20


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


class IngressStats:
    """Latencies and errors measured at the HTTP ingress.

    Called from request handlers (one Trio thread) and read by the scrape and the stream;
    the lock is only for prometheus_client's own threads, which may scrape concurrently.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "alto_request_latency_seconds",
            "End-to-end latency of completed requests, measured at the HTTP ingress.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_result = Histogram(
            "alto_request_first_result_seconds",
            "Time from a request's arrival at the ingress to its first result.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW_MAX)
        self._first: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW_MAX)
        self._errors: deque[RequestError] = deque(maxlen=RECENT_ERRORS_MAX)

    def observe_first_result(self, now: float, seconds: float) -> None:
        self.first_result.observe(seconds)
        with self._lock:
            self._first.append((now, seconds))

    def observe_done(self, now: float, seconds: float) -> None:
        self.latency.observe(seconds)
        with self._lock:
            self._latencies.append((now, seconds))

    def observe_error(self, now: float, request_id: int, message: str) -> None:
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

    def __init__(self, runtime: RuntimeCommands) -> None:
        self._runtime = runtime

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
        yield from _instance_metrics(stats)
        yield from _stage_metrics(stats)
        yield from _runtime_metrics(stats)


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
    ready_count = Counter(i.stage for i in stats.instances if i.state is InstanceState.READY)
    for stage in stats.stages:
        instances.add_metric([stage.name], len(stage.instances))
        ready.add_metric([stage.name], ready_count[stage.name])
        target.add_metric([stage.name], stage.target_instances)
        if stage.max_instances > 0:  # 0: a runtime that does not report it
            most.add_metric([stage.name], stage.max_instances)
        errors.add_metric([stage.name], stage.errors)
        processed.add_metric([stage.name], stage.frames_processed)
    yield from (instances, ready, target, most, errors, processed)


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


def open_registry(runtime: RuntimeCommands) -> tuple[CollectorRegistry, IngressStats]:
    """A private registry with the runtime collector, the ingress histograms, and the
    standard ``process_*`` and ``python_info`` collectors (what prometheus_client's default
    registry carries, which a private registry does not get on its own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, IngressStats(registry)
