"""The live statistics stream behind ``GET /api/stream``.

One sampler task per app reads ``runtime.statistics()`` every ``interval`` seconds,
computes rates against the snapshots of the last second, renders the ``stats`` event
once, and publishes it as *the latest* event with a sequence number. Clients never get a
queue of their own: each SSE client remembers the last sequence number it sent and, when
it is ready to send again, takes whatever is latest (waiting only if it has seen it
already). A slow client therefore skips intermediate events (it coalesces) and costs O(1)
memory; the sampler never waits for any client, so no client can slow the dataplane. This
is the "latest value" broadcast of trio's memory channels with a buffer of one, without a
per-client buffer at all.

A client that connects late sends the current event at once (its last-seen number is 0).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any

import trio

from ..dataplane._stats import RuntimeCommands, RuntimeStatistics
from ._metrics import IngressStats

logger = logging.getLogger("alto.control")

# Rates are the change over the snapshots of the last second (at least two snapshots):
# consecutive snapshots 0.25 s apart make rates that jump with every batch of frames.
RATE_WINDOW_S = 1.0


def _rate(new: float, old: float, dt: float) -> float:
    return round((new - old) / dt, 3) if dt > 0 else 0.0


class StatsHub:
    """Samples the runtime and holds the latest rendered ``stats`` event."""

    def __init__(self, runtime: RuntimeCommands, ingress: IngressStats, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"stream_interval must be positive, not {interval!r}")
        self.interval = interval
        self._runtime = runtime
        self._ingress = ingress
        self._history: deque[RuntimeStatistics] = deque()
        self._seq = 0
        self._latest = b""
        self._changed = trio.Event()

    @property
    def seq(self) -> int:
        return self._seq

    def sample(self) -> None:
        """Take one snapshot and publish it as the latest event."""
        stats = self._runtime.statistics()
        # Keep one snapshot older than the window, so rates span at least the window.
        history = self._history
        history.append(stats)
        while len(history) > 2 and history[1].time <= stats.time - RATE_WINDOW_S:
            history.popleft()
        data = self.render(stats, history[0])
        self._seq += 1
        self._latest = json.dumps({"seq": self._seq, **data}, separators=(",", ":")).encode()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def render(self, stats: RuntimeStatistics, old: RuntimeStatistics) -> dict[str, Any]:
        dt = stats.time - old.time
        old_instances = {i.instance_id: i for i in old.instances}
        old_stages = {s.name: s for s in old.stages}
        instances = []
        for inst in stats.instances:
            prev = old_instances.get(inst.instance_id, inst)
            instances.append(
                {
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
                    "frames_in_per_s": _rate(inst.frames_in, prev.frames_in, dt),
                    "frames_out_per_s": _rate(inst.frames_out, prev.frames_out, dt),
                    "pid": inst.pid,
                    "last_error": inst.last_error,
                }
            )
        stages = []
        for stage in stats.stages:
            prev_stage = old_stages.get(stage.name, stage)
            stages.append(
                {
                    "name": stage.name,
                    "instances": list(stage.instances),
                    "target_instances": stage.target_instances,
                    "frames_processed": stage.frames_processed,
                    "frames_per_s": _rate(stage.frames_processed, prev_stage.frames_processed, dt),
                    "errors": stage.errors,
                }
            )
        now = trio.current_time()
        return {
            "pipeline": stats.pipeline,
            "time": stats.time,
            "interval": self.interval,
            "requests": {
                "in_flight": stats.requests_in_flight,
                "max_in_flight": stats.max_inflight_requests,
                "submitted": stats.requests_submitted,
                "completed": stats.requests_completed,
                "failed": stats.requests_failed,
                "refused": stats.requests_refused,
            },
            "rates": {
                "window_s": round(dt, 3),
                "frames_per_s": _rate(stats.frames_relayed, old.frames_relayed, dt),
                "requests_per_s": _rate(stats.requests_completed, old.requests_completed, dt),
                "failed_per_s": _rate(stats.requests_failed, old.requests_failed, dt),
                "submitted_per_s": _rate(stats.requests_submitted, old.requests_submitted, dt),
            },
            "latency": self._ingress.summary(now),
            "frames_relayed": stats.frames_relayed,
            "scale_events": stats.scale_events,
            "stages": stages,
            "instances": instances,
            "recent_errors": [
                {
                    "time": e.time,
                    "age_s": round(now - e.time, 1),
                    "request_id": e.request_id,
                    "message": e.message,
                }
                for e in self._ingress.recent_errors()
            ],
        }

    def latest(self) -> tuple[int, bytes]:
        """The latest event (sampling once if nothing was sampled yet)."""
        if self._seq == 0:
            self.sample()
        return self._seq, self._latest

    async def wait_newer(self, seen: int) -> tuple[int, bytes]:
        """The latest event once it is newer than ``seen``; intermediate ones are skipped."""
        if self._seq == 0:
            self.sample()
        while self._seq <= seen:
            await self._changed.wait()
        return self._seq, self._latest

    async def run(self) -> None:
        """Sample every ``interval`` seconds until cancelled.

        A failing ``statistics()`` is logged and retried on the next tick: the stream shows
        the last good state rather than ending.
        """
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("statistics() failed; the live stream keeps the last snapshot")
            await trio.sleep(self.interval)
