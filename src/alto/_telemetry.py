"""What stage instances measure and report: per-input timings, metrics, trace spans.

An instance knows what the runtime cannot see: how long an input waited inside the
instance for a free slot, how long ``process()`` ran, when its first output left, how many
tokens an LM generated and how fast. The worker measures that for every input (a few
clock reads per input, never per frame) and reports it to the runtime in two ways:

* metrics, for every input: fixed-bucket histograms aggregated in the instance and sent
  as deltas in a STATS frame about once a second (JSON, :meth:`MetricDeltas.take`); the
  runtime adds them up per stage and the control plane exports them. The same frame
  carries the stage object's own *gauges* when they changed (an optional
  ``statistics()`` method: an LM engine's token counters, an emulated device's busy
  seconds), kept per instance;
* spans, for the inputs of *traced* requests only (frames flagged TRACED): one SPAN frame
  per input, sent before the input's ACK so that the runtime has the whole trace when the
  request completes (JSON, :meth:`InputRecord.span`).

Metric names follow OpenTelemetry's semantic conventions where one exists (the
``gen_ai.server.*`` metrics of GenAI servers) and alto's own names otherwise:

====================================  =======  ==========================================
name                                  unit     what
====================================  =======  ==========================================
``alto.stage.queue_wait``             s        received by the instance -> processing starts
``alto.stage.processing``             s        ``process()`` (or ``group_closed()``) ran
``alto.stage.time_to_first_output``   s        processing starts -> first output written
``alto.stage.outputs``                outputs  outputs written per input
``gen_ai.server.time_to_first_token`` s        generation asked -> first token (LM stages)
``gen_ai.server.time_per_output_token`` s      mean time per token after the first
``gen_ai.client.token.usage``         tokens   tokens per generation (``input``/``output``)
====================================  =======  ==========================================

The last three come from :meth:`alto.Context.tokens`, which LM stages wrap their engine's
stream in.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import Sequence
from typing import Any

import anyio
import sniffio

__all__ = ["BUCKETS", "InputRecord", "MetricDeltas", "merge_histogram", "now", "wall_clock"]

GAUGES = "gauges"  # the key of a STATS payload holding current values, not histograms

# (the event loop run it was taken in, offset): each run has its own clock (trio's starts
# at a random offset), so an offset is only good within the run that took it.
_wall_offset: tuple[object, float] | None = None


def now() -> float:
    """The event loop's clock (trio's or asyncio's; trio's MockClock in tests), the clock
    of every duration measured here."""
    return anyio.current_time()


def _current_run() -> object:
    """An object that identifies the running event loop run (trio's token, or asyncio's
    loop)."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    return asyncio.get_running_loop()


def wall_clock(t: float | None = None) -> float:
    """Event-loop time ``t`` (default: now) as wall-clock seconds, what spans and hops
    carry so that the runtime and the instances (other processes) can line them up. The
    offset is taken once per event loop run (a process may run several one after
    another, each with its own clock)."""
    global _wall_offset
    loop_now = anyio.current_time()
    run = _current_run()
    if _wall_offset is None or _wall_offset[0] is not run:
        _wall_offset = (run, time.time() - loop_now)
    return (loop_now if t is None else t) + _wall_offset[1]


_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
_COUNTS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
# Bucket upper bounds per metric (the last, +Inf, bucket is implied). Fixed and shared by
# every instance and the runtime, so that deltas from different instances add up.
BUCKETS: dict[str, tuple[float, ...]] = {
    "alto.stage.queue_wait": _SECONDS,
    "alto.stage.processing": _SECONDS,
    "alto.stage.time_to_first_output": _SECONDS,
    "alto.stage.outputs": _COUNTS,
    "gen_ai.server.time_to_first_token": _SECONDS,
    "gen_ai.server.time_per_output_token": _PER_TOKEN,
    "gen_ai.client.token.usage.input": _TOKENS,
    "gen_ai.client.token.usage.output": _TOKENS,
}


class MetricDeltas:
    """Histogram observations since the last :meth:`take`, per metric name."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, name: str, value: float) -> None:
        bounds = BUCKETS[name]
        counts = self._counts.get(name)
        if counts is None:
            counts = self._counts[name] = [0] * (len(bounds) + 1)
            self._sums[name] = 0.0
        counts[bisect.bisect_left(bounds, value)] += 1
        self._sums[name] += value

    def take(self, gauges: dict[str, float] | None = None) -> bytes | None:
        """The deltas (and the stage's ``gauges``, current values, when given) as a STATS
        payload (JSON), or None when there is nothing to say; resets the deltas."""
        if not self._counts and not gauges:
            return None
        body: dict[str, Any] = {
            name: {"buckets": counts, "sum": self._sums[name]}
            for name, counts in self._counts.items()
        }
        if gauges:
            body[GAUGES] = gauges
        self._counts, self._sums = {}, {}
        return json.dumps(body, separators=(",", ":")).encode()


def merge_histogram(into: dict[str, Any], delta: Any, name: str) -> None:
    """Add a STATS delta for ``name`` to the cumulative histogram ``into`` (``buckets``,
    ``sum``, ``count``). Raises ValueError when the delta does not fit the metric."""
    bounds = BUCKETS.get(name)
    if bounds is None:
        raise ValueError(f"unknown metric {name!r}")
    if not isinstance(delta, dict):
        raise ValueError(f"metric {name!r}: expected an object")
    counts = delta.get("buckets")
    total = delta.get("sum")
    if (
        not isinstance(counts, list)
        or len(counts) != len(bounds) + 1
        or not all(isinstance(c, int) and c >= 0 for c in counts)
        or not isinstance(total, (int, float))
    ):
        raise ValueError(f"metric {name!r}: malformed buckets or sum")
    cur = into.setdefault(name, {"buckets": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0})
    for i, c in enumerate(counts):
        cur["buckets"][i] += c
    cur["sum"] += float(total)
    cur["count"] += sum(counts)


class InputRecord:
    """The timings of one input in an instance (the event loop's clock, :func:`now`; the
    span of a traced input converts them to wall-clock times, which is what the runtime of
    another process can line up)."""

    __slots__ = (
        "attributes",
        "first_output",
        "last_output",
        "outputs",
        "received",
        "started",
        "token_times",
        "traced",
    )

    def __init__(self, received: float, traced: bool) -> None:
        self.received = received  # now() when the frame was read
        self.started = received
        self.first_output: float | None = None
        self.last_output: float | None = None
        self.outputs = 0
        self.traced = traced
        self.attributes: dict[str, Any] = {}
        self.token_times: list[float] = []  # traced LM inputs: when each token arrived

    def output(self) -> None:
        """One output was written (called by the context, per write)."""
        self.outputs += 1
        if self.first_output is None:
            self.first_output = now()
        if self.traced:
            self.last_output = now()

    def observe(self, metrics: MetricDeltas, ended: float) -> None:
        metrics.observe("alto.stage.queue_wait", self.started - self.received)
        metrics.observe("alto.stage.processing", ended - self.started)
        metrics.observe("alto.stage.outputs", self.outputs)
        if self.first_output is not None:
            metrics.observe("alto.stage.time_to_first_output", self.first_output - self.started)

    def span(
        self,
        stage: str,
        instance: int,
        key_path: Sequence[int],
        kind: str,
        ended: float,
        status: str,
    ) -> bytes:
        """The SPAN payload (JSON) of this input, times as wall-clock seconds."""
        shift = wall_clock(0.0)
        body: dict[str, Any] = {
            "stage": stage,
            "instance": instance,
            "key_path": list(key_path),
            "kind": kind,  # "process" or "group_closed"
            "status": status,  # "ok", "error" or "cancelled"
            "received": self.received + shift,
            "started": self.started + shift,
            "ended": ended + shift,
            "outputs": self.outputs,
        }
        if self.first_output is not None:
            body["first_output"] = self.first_output + shift
        if self.last_output is not None:
            body["last_output"] = self.last_output + shift
        if self.attributes:
            body["attributes"] = self.attributes
        if self.token_times:
            body["token_times"] = [round(t + shift, 6) for t in self.token_times[:4096]]
        return json.dumps(body, separators=(",", ":")).encode()
