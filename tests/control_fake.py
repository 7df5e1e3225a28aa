"""An in-memory runtime for control plane tests: implements RuntimeCommands, no processes.

A three-stage "wordcount" pipeline::

    ingress --input--> split --words--> score --scores--> sum --total--> sink
             (Struct)   fan-out (StringValue)  (Int32Value)  stateful    (Int32Value)
                        round-robin            least-outstanding  hash, level 1

A request is a Struct ``{"text": "a bb ccc"}``; each word passes through one instance of
every stage (its queue depth is raised while it "works" for ``step_delay`` seconds), and
the sink gets a running total of word lengths per word, so results stream. ``{"fail":
true}`` ends the request in an error naming stage ``score``. ``overloaded = True`` (or
more than ``max_inflight`` requests) makes ``submit`` raise OverloadedError at once.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import struct_pb2, wrappers_pb2

from alto._errors import OverloadedError
from alto.dataplane._stats import (
    InstanceState,
    InstanceStatistics,
    RequestEvent,
    RuntimeStatistics,
    StageStatistics,
)

QUEUE_TYPES: dict[str, Any] = {
    "input": struct_pb2.Struct,
    "words": wrappers_pb2.StringValue,
    "scores": wrappers_pb2.Int32Value,
    "total": wrappers_pb2.Int32Value,
}


@dataclass
class _Instance:
    id: int
    stage: str
    state: InstanceState = InstanceState.READY
    depth: int = 0
    open_groups: int = 0
    frames_in: int = 0
    frames_out: int = 0
    last_error: str | None = None


@dataclass
class _Stage:
    name: str
    scheduler: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stateful: bool = False
    aggregate_level: int | None = None
    fanout: bool = False
    target: int = 1
    frames_processed: int = 0
    errors: int = 0
    rr: int = 0
    instances: list[int] = field(default_factory=list)


class FakeRuntime:
    """Implements :class:`alto.dataplane._stats.RuntimeCommands` in memory."""

    def __init__(
        self,
        *,
        pipeline: str = "wordcount",
        step_delay: float = 0.0,
        max_inflight: int = 64,
        credits: int = 4,
    ) -> None:
        self.pipeline = pipeline
        self.step_delay = step_delay
        self.max_inflight = max_inflight
        self.credits = credits
        self.overloaded = False
        self.retry_after = 2.5
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.stages = {
            s.name: s
            for s in (
                _Stage("split", "round-robin", ("input",), ("words",), fanout=True),
                _Stage("score", "least-outstanding", ("words",), ("scores",), target=2),
                _Stage("sum", "hash", ("scores",), ("total",), stateful=True, aggregate_level=1),
            )
        }
        self.instances: dict[int, _Instance] = {}
        for stage in self.stages.values():
            for _ in range(stage.target):
                self._add_instance(stage)
        self.in_flight = 0
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.refused = 0
        self.frames_relayed = 0
        self.scale_events = 0
        self.closed_requests = 0  # result iterators closed (finished or abandoned)

    # -- RuntimeCommands -----------------------------------------------------------

    def statistics(self) -> RuntimeStatistics:
        self._reap()
        return RuntimeStatistics(
            pipeline=self.pipeline,
            time=trio.current_time(),
            stages=tuple(
                StageStatistics(
                    name=s.name,
                    scheduler=s.scheduler,
                    stateful=s.stateful,
                    aggregate_level=s.aggregate_level,
                    fanout=s.fanout,
                    inputs=s.inputs,
                    outputs=s.outputs,
                    instances=tuple(s.instances),
                    target_instances=s.target,
                    frames_processed=s.frames_processed,
                    errors=s.errors,
                )
                for s in self.stages.values()
            ),
            instances=tuple(
                InstanceStatistics(
                    instance_id=i.id,
                    stage=i.stage,
                    state=i.state,
                    queue_depth=i.depth,
                    credits=self.credits,
                    backlog=max(0, i.depth - self.credits),
                    open_groups=i.open_groups,
                    frames_in=i.frames_in,
                    frames_out=i.frames_out,
                    pid=40000 + i.id,
                    last_error=i.last_error,
                )
                for i in self.instances.values()
            ),
            requests_in_flight=self.in_flight,
            requests_submitted=self.submitted,
            requests_completed=self.completed,
            requests_failed=self.failed,
            requests_refused=self.refused,
            frames_relayed=self.frames_relayed,
            max_inflight_requests=self.max_inflight,
            scale_events=self.scale_events,
            edges=(
                ("ingress", "input", "split"),
                ("split", "words", "score"),
                ("score", "scores", "sum"),
                ("sum", "total", "sink"),
            ),
        )

    async def scale(self, stage: str, instances: int) -> None:
        target = self.stages[stage]  # KeyError for an unknown stage, as the protocol says
        if instances < 1:
            raise ValueError(f"a stage needs at least 1 instance, not {instances}")
        await trio.lowlevel.checkpoint()
        target.target = instances
        ready = [i for i in target.instances if self.instances[i].state is InstanceState.READY]
        for _ in range(instances - len(ready)):
            self._add_instance(target)
        for iid in sorted(ready, reverse=True)[: max(0, len(ready) - instances)]:
            self.instances[iid].state = InstanceState.DRAINING
        self.scale_events += 1
        self._reap()

    async def drain(self, instance_id: int) -> None:
        inst = self.instances[instance_id]  # KeyError for an unknown instance
        await trio.lowlevel.checkpoint()
        if inst.state in (InstanceState.STARTING, InstanceState.READY):
            inst.state = InstanceState.DRAINING
            self.scale_events += 1
        self._reap()

    def submit(self, payload: bytes) -> AsyncIterator[RequestEvent]:
        if self.overloaded or self.in_flight >= self.max_inflight:
            self.refused += 1
            raise OverloadedError(
                f"{self.in_flight} requests in flight (limit {self.max_inflight})",
                retry_after=self.retry_after,
            )
        message = struct_pb2.Struct.FromString(payload)
        self.in_flight += 1
        self.submitted += 1
        return self._run(next(self._request_ids), message)

    def input_type(self) -> Any:
        return struct_pb2.Struct

    def queue_type(self, queue: str) -> Any:
        return QUEUE_TYPES[queue]

    # -- the fake dataplane -------------------------------------------------------

    def _add_instance(self, stage: _Stage) -> None:
        iid = next(self._ids)
        self.instances[iid] = _Instance(iid, stage.name)
        stage.instances.append(iid)

    def _reap(self) -> None:
        """Draining instances with nothing left stop (and leave their stage)."""
        for inst in self.instances.values():
            if inst.state is InstanceState.DRAINING and inst.depth == 0 and not inst.open_groups:
                inst.state = InstanceState.STOPPED
                self.stages[inst.stage].instances.remove(inst.id)

    def _pick(self, stage: _Stage, request_id: int) -> _Instance:
        ready = [
            self.instances[i]
            for i in stage.instances
            if self.instances[i].state is InstanceState.READY
        ]
        if stage.scheduler == "hash":
            return ready[request_id % len(ready)]
        if stage.scheduler == "least-outstanding":
            return min(ready, key=lambda i: (i.depth, i.id))
        stage.rr += 1
        return ready[stage.rr % len(ready)]

    async def _work(self, stage: _Stage, inst: _Instance) -> None:
        inst.depth += 1
        inst.frames_out += 1
        self.frames_relayed += 1
        try:
            await trio.sleep(self.step_delay)
        finally:
            inst.depth -= 1
        inst.frames_in += 1
        self.frames_relayed += 1
        stage.frames_processed += 1

    async def _run(
        self, request_id: int, message: struct_pb2.Struct
    ) -> AsyncIterator[RequestEvent]:
        fields = dict(message.items())
        words = str(fields.get("text", "")).split()
        fail = bool(fields.get("fail", False))
        summer = self._pick(self.stages["sum"], request_id)
        summer.open_groups += 1
        outcome = "cancelled"
        try:
            yield RequestEvent("accepted", request_id, time=trio.current_time())
            total = 0
            for index, word in enumerate(words):
                await self._work(self.stages["split"], self._pick(self.stages["split"], request_id))
                scorer = self._pick(self.stages["score"], request_id)
                await self._work(self.stages["score"], scorer)
                if fail:
                    scorer.last_error = f"ValueError: cannot score {word!r}"
                    self.stages["score"].errors += 1
                    outcome = "failed"
                    message = f"stage 'score' instance {scorer.id}: {scorer.last_error}"
                    yield RequestEvent("error", request_id, message=message)
                    return
                await self._work(self.stages["sum"], summer)
                total += len(word)
                yield RequestEvent(
                    "result",
                    request_id,
                    queue="total",
                    key_path=(request_id, index),
                    payload=wrappers_pb2.Int32Value(value=total).SerializeToString(),
                    time=trio.current_time(),
                )
            outcome = "completed"
            yield RequestEvent("done", request_id, time=trio.current_time())
        finally:
            summer.open_groups -= 1
            self.in_flight -= 1
            self.closed_requests += 1
            if outcome == "completed":
                self.completed += 1
            else:
                self.failed += 1
            self._reap()
