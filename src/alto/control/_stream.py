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

Keepalive: proxies and load balancers close a connection that carries nothing for a while
(nginx's ``proxy_read_timeout`` and AWS ALB's idle timeout default to 60 s), and an SSE
stream may be silent much longer than that: a request whose LM stage takes minutes before
its first result, or a stats stream with a long interval. Every SSE stream therefore sends
a comment line (``: keepalive``, which EventSource and SSE clients ignore, per the WHATWG
HTML standard's event stream format) after each ``keepalive`` seconds without an event.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import trio

from ..dataplane._stats import RuntimeCommands, RuntimeStatistics, ScaleEvent
from ._metrics import ControlStats

logger = logging.getLogger("alto.control")

# Rates are the change over the snapshots of the last second (at least two snapshots):
# consecutive snapshots 0.25 s apart make rates that jump with every batch of frames.
RATE_WINDOW_S = 1.0

# The stats stream's interval: above a minute the dashboard is no longer live, and the rate
# window (RATE_WINDOW_S) is shorter than one step.
MAX_STREAM_INTERVAL_S = 60.0

# 15 s, the ping interval sse-starlette and aiohttp-sse default to: well inside the 60 s
# idle timeouts of common proxies. The bound: past 10 minutes no proxy default is met any more.
DEFAULT_KEEPALIVE_S = 15.0
MAX_KEEPALIVE_S = 600.0

KEEPALIVE = b": keepalive\n\n"

# Scale events in each stats event: the newest ones (``/api/pipeline`` has all the runtime
# keeps). Enough for a log on the dashboard; the stream stays small at four events a second.
STREAM_SCALE_EVENTS = 20


def check_keepalive(seconds: float) -> float:
    """``seconds`` as a keepalive interval; raises ValueError naming the allowed range."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= MAX_KEEPALIVE_S
    ):
        raise ValueError(
            f"sse keepalive must be a number of seconds in (0, {MAX_KEEPALIVE_S:g}], "
            f"not {seconds!r}"
        )
    return float(seconds)


def autoscale_dict(autoscale: tuple[int, int] | None) -> dict[str, int] | None:
    """A stage's autoscale range as JSON, or None when it is scaled by hand only."""
    return None if autoscale is None else {"min": autoscale[0], "max": autoscale[1]}


def finished_dict(stats: RuntimeStatistics) -> dict[str, int]:
    """Requests that ended, by final status, each once (the runtime counts a timed-out
    request among its failed ones too)."""
    return {
        "done": stats.requests_completed,
        "failed": stats.requests_failed - stats.requests_timed_out,
        "cancelled": stats.requests_cancelled,
        "timed_out": stats.requests_timed_out,
    }


def scale_event_dict(event: ScaleEvent, now: float) -> dict[str, Any]:
    """A scale event as JSON: ``time`` on the runtime's clock, ``age_s`` before ``now``."""
    return {
        "time": event.time,
        "age_s": round(max(0.0, now - event.time), 3),
        "stage": event.stage,
        "from_instances": event.from_instances,
        "to_instances": event.to_instances,
        "by": event.by,
        "reason": event.reason,
    }


def _rate(new: float, old: float, dt: float) -> float:
    return round((new - old) / dt, 3) if dt > 0 else 0.0


class StatsHub:
    """Samples the runtime and holds the latest rendered ``stats`` event."""

    def __init__(self, runtime: RuntimeCommands, ingress: ControlStats, interval: float) -> None:
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not 0 < interval <= MAX_STREAM_INTERVAL_S
        ):
            raise ValueError(
                f"stream_interval must be a number of seconds in (0, {MAX_STREAM_INTERVAL_S:g}], "
                f"not {interval!r}"
            )
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
        # Every snapshot counts the scale events it shows, so that /metrics misses none
        # that the runtime's bounded log forgets between two scrapes.
        self._ingress.scale_counts.update(stats.scale_log)
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
                    "max_instances": stage.max_instances,
                    "frames_processed": stage.frames_processed,
                    "frames_per_s": _rate(stage.frames_processed, prev_stage.frames_processed, dt),
                    "errors": stage.errors,
                    "autoscale": autoscale_dict(stage.autoscale),
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
            "finished": finished_dict(stats),
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
            "scale_log": [
                scale_event_dict(e, stats.time) for e in stats.scale_log[-STREAM_SCALE_EVENTS:]
            ],
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


async def stats_events(hub: StatsHub, keepalive: float) -> AsyncGenerator[bytes, None]:
    """The ``GET /api/stream`` body: ``stats`` events as the hub publishes them, and a
    keepalive comment after each ``keepalive`` seconds without one.

    Waiting on the hub is safe to cancel (nothing is taken from a queue), so the timeout
    needs no helper task; the ``yield`` stays outside the cancel scope, as trio requires
    of async generators.
    """
    seen = 0
    prefix = b"retry: 2000\n"  # reconnect after 2 s (EventSource's default is browser-chosen)
    while True:
        with trio.move_on_after(keepalive) as waited:
            seen, data = await hub.wait_newer(seen)
        if waited.cancelled_caught:
            yield KEEPALIVE
            continue
        yield prefix + b"event: stats\nid: %d\ndata: " % seen + data + b"\n\n"
        prefix = b""


class KeepaliveBody:
    """An SSE response body: the chunks of ``source``, and a keepalive comment after each
    ``keepalive`` seconds without one.

    ``source`` (the ingress's result events) cannot be waited on with a timeout: cancelling
    an async generator mid-``__anext__`` ends it. So a helper task in ``nursery`` (the
    app's) pulls from it and hands each chunk over an unbuffered channel, which keeps the
    source's backpressure: the next event is pulled only once the last one was taken.
    The task starts with the first ``__anext__``. :meth:`aclose` (Quart calls it when the
    response ends or the client goes away) stops the task and closes ``source``, also when
    iteration never started, so the runtime's result iterator is never left open.
    """

    def __init__(
        self, source: AsyncIterator[bytes], keepalive: float, nursery: trio.Nursery
    ) -> None:
        self._source = source
        self._keepalive = keepalive
        self._nursery = nursery
        self._send, self._receive = trio.open_memory_channel[bytes](0)
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._started = False
        self._closed = False
        self._error: Exception | None = None

    def __aiter__(self) -> KeepaliveBody:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            self._nursery.start_soon(self._pump)
        with trio.move_on_after(self._keepalive):
            try:
                return await self._receive.receive()
            except trio.EndOfChannel:
                if self._error is not None:
                    raise self._error from None
                raise StopAsyncIteration from None
        return KEEPALIVE

    async def _pump(self) -> None:
        try:
            with self._scope:
                async for chunk in self._source:
                    try:
                        await self._send.send(chunk)
                    except trio.BrokenResourceError:
                        return  # the body was closed: nobody reads any more
        except Exception as exc:
            # Raised in the reader's task instead: an exception here would end the app.
            self._error = exc
        finally:
            self._send.close()  # synchronous: the reader sees the error set, then the end
            try:
                await _aclose(self._source)
            finally:
                self._done.set()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._receive.close()
        if not self._started:
            await _aclose(self._source)
            return
        self._scope.cancel()
        # The helper task ends at once once cancelled (closing the source is synchronous
        # clean-up in the runtime); wait for it even when our caller is being cancelled,
        # so the source is closed when aclose returns.
        with trio.CancelScope(shield=True):
            await self._done.wait()


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
