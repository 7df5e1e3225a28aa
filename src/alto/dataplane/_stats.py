"""Immutable statistics snapshots and the narrow command interface of the runtime.

The control plane (``alto.control``) sees the dataplane only through these: it calls
``Runtime.statistics()`` for a frozen :class:`RuntimeStatistics` and changes the dataplane
only through the methods of :class:`RuntimeCommands`. Nothing here refers to relay
internals, so the control plane can be tested against a fake that implements the protocol.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class InstanceState(enum.StrEnum):
    STARTING = "starting"  # process spawned, not registered yet
    READY = "ready"  # registered, takes new work
    DRAINING = "draining"  # takes no new groups; finishing what is pinned or in flight
    STOPPED = "stopped"  # ended on purpose
    CRASHED = "crashed"  # ended on its own (exit code or lost connection)


@dataclass(frozen=True, slots=True)
class InstanceStatistics:
    instance_id: int
    stage: str
    state: InstanceState
    queue_depth: int  # frames dispatched minus frames acknowledged
    credits: int  # the most unacknowledged frames it may hold
    backlog: int  # frames held in the runtime waiting for a credit
    open_groups: int  # aggregation groups pinned to it
    frames_in: int  # frames it sent to the runtime
    frames_out: int  # frames the runtime sent to it
    pid: int | None
    last_error: str | None
    credits_in_use: int = 0  # frames sent to it and not yet acknowledged (at most credits)
    gauges: Mapping[str, float] = field(default_factory=dict)  # its stage object's numbers


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A cumulative histogram the instances of a stage reported (see ``alto._telemetry``):
    ``buckets[i]`` counts observations <= ``bounds[i]``, the last one the rest."""

    name: str
    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    sum: float
    count: int


@dataclass(frozen=True, slots=True)
class StageStatistics:
    name: str
    scheduler: str
    stateful: bool
    aggregate_level: int | None
    fanout: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    instances: tuple[int, ...]  # ids of instances that are not stopped
    target_instances: int
    frames_processed: int
    errors: int
    max_instances: int = 0  # the most instances the stage may have (0: not reported)
    metrics: tuple[HistogramSnapshot, ...] = ()  # what its instances measured
    autoscale: tuple[int, int] | None = None  # (min, max) when the runtime scales it


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    pipeline: str
    time: float  # trio.current_time() of the snapshot
    stages: tuple[StageStatistics, ...]
    instances: tuple[InstanceStatistics, ...]
    requests_in_flight: int
    requests_submitted: int
    requests_completed: int
    requests_failed: int
    requests_refused: int
    frames_relayed: int
    max_inflight_requests: int
    scale_events: int
    edges: tuple[tuple[str, str, str], ...] = field(
        default=()
    )  # (from stage or "ingress", queue, to stage or "sink")
    requests_cancelled: int = 0  # ended because nobody waited for them any more
    requests_timed_out: int = 0  # failed because their deadline passed (also in failed)
    scale_log: tuple[ScaleEvent, ...] = ()  # the most recent scale events, oldest first
    frames_discarded: int = 0  # frames of requests that had already ended
    frames_retried: int = 0  # inputs of crashed idempotent instances sent again
    restarts: int = 0  # crashed instances replaced
    max_instances: int = 0  # the most instance processes the runtime may run (0: not reported)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One event of a request's result stream.

    ``kind`` is ``"accepted"`` (``request_id`` set), ``"result"`` (``queue``,
    ``key_path`` and ``payload`` set: protobuf bytes of the queue's type), ``"done"`` or
    ``"error"`` (``message`` set).
    """

    kind: str
    request_id: int
    queue: str = ""
    key_path: tuple[int, ...] = ()
    payload: bytes = b""
    message: str = ""
    time: float = 0.0


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A change of a stage's target number of instances, and who made it why."""

    time: float  # trio.current_time()
    stage: str
    from_instances: int
    to_instances: int
    by: str  # "operator" (API, CLI, dashboard) or "autoscaler"
    reason: str


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How one request ended, whichever door it came through.

    ``status``: ``done``, ``failed``, ``cancelled`` (its client went away or cancelled
    it) or ``timed_out`` (its deadline passed). Times are the runtime's clock
    (``trio.current_time()``); ``first_result_at`` is None when no result reached its
    client.
    """

    request_id: int
    status: str
    admitted_at: float
    first_result_at: float | None
    finished_at: float
    results: int
    error: str = ""
    traced: bool = False

    @property
    def latency(self) -> float:
        return self.finished_at - self.admitted_at

    @property
    def time_to_first_result(self) -> float | None:
        if self.first_result_at is None:
            return None
        return self.first_result_at - self.admitted_at


class RuntimeCommands(Protocol):
    """What the control plane may ask of the runtime."""

    def statistics(self) -> RuntimeStatistics: ...

    async def scale(self, stage: str, instances: int) -> None:
        """Set ``stage``'s target to ``instances``: returns at once; new instances start
        (or surplus ones drain) in the background, visible in ``statistics()``.

        Raises KeyError for an unknown stage and ValueError for a count below 1 or past
        the stage's or the runtime's ``max_instances`` (the message names the limit).
        """

    async def drain(self, instance_id: int) -> None:
        """Stop routing new groups to the instance, let pinned work finish, then stop it.

        Raises KeyError for an unknown instance, ValueError for the last instance of its
        stage (scale the stage up first).
        """

    def submit(self, payload: bytes) -> AsyncIterator[RequestEvent]:
        """Submit one request (protobuf bytes of the pipeline's input type).

        Yields an ``accepted`` event, then results as they reach the sink, then ``done``
        or ``error``. Raises :class:`alto.OverloadedError` at once when the runtime is past
        its in-flight limit.
        """
        ...

    def input_type(self) -> Any:
        """The protobuf message class of the pipeline's input queue."""

    def queue_type(self, queue: str) -> Any:
        """The protobuf message class of a queue (KeyError if unknown)."""
