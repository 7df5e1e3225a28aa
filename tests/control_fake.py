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

import dataclasses
import itertools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import struct_pb2, wrappers_pb2

from alto._errors import AltoError, OverloadedError
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
                    error = f"stage 'score' instance {scorer.id}: {scorer.last_error}"
                    yield RequestEvent("error", request_id, message=error)
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


# -- the FacTool graph ---------------------------------------------------------------------

# The six stages of configs/factool.toml, with the schedulers and aggregation levels the
# real pipeline declares, and the paper's deployment (configs/factool.deploy.toml).
FACTOOL_EDGES = (
    ("ingress", "questions", "qa"),
    ("qa", "answers", "claims"),
    ("qa", "answer_out", "sink"),
    ("claims", "claims", "queries"),
    ("claims", "claims_out", "sink"),
    ("queries", "query_tokens", "bm25"),
    ("bm25", "candidates", "encoder"),
    ("encoder", "encoded", "rerank"),
    ("rerank", "evidence", "sink"),
)
FACTOOL_DEPLOYMENT = {"qa": 2, "claims": 2, "queries": 3, "bm25": 4, "encoder": 1, "rerank": 4}


class FacToolFakeRuntime(FakeRuntime):
    """The FacTool graph (``qa -> claims -> queries -> bm25 -> encoder -> rerank``) in memory.

    ``instances`` overrides the paper's deployment per stage (e.g. ``{"queries": 20}``).
    A request is a Struct ``{"id": "q1", "question": "..."}``; it fans out into ``claims``
    claims of ``queries`` search queries each. Every fan-out is dispatched at once (the
    children raise the depth of their instances together, for ``step_delay`` seconds), so
    concurrent requests spread depth over many instances. Results are StringValues on
    ``answer_out``, ``claims_out`` and ``evidence``. ``jitter`` varies each step's time by
    up to that fraction of ``step_delay`` (seeded), so that requests fall out of step.
    """

    def __init__(
        self,
        *,
        instances: dict[str, int] | None = None,
        step_delay: float = 0.0,
        max_inflight: int = 512,
        credits: int = 64,
        claims: int = 3,
        queries: int = 2,
        jitter: float = 0.0,
    ) -> None:
        super().__init__(
            pipeline="factool", step_delay=step_delay, max_inflight=max_inflight, credits=credits
        )
        counts = {**FACTOOL_DEPLOYMENT, **(instances or {})}
        unknown = set(counts) - set(FACTOOL_DEPLOYMENT)
        if unknown:
            raise ValueError(f"unknown FacTool stages {sorted(unknown)}; allowed: {list(counts)}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {jitter!r}")
        self.claims, self.queries, self.jitter = claims, queries, jitter
        self._rng = random.Random(0)
        self._ids = itertools.count(1)
        self.instances = {}
        self.stages = {
            s.name: s
            for s in (
                _Stage("qa", "prompt-sticky", ("questions",), ("answers", "answer_out")),
                _Stage(
                    "claims", "prompt-sticky", ("answers",), ("claims", "claims_out"), fanout=True
                ),
                _Stage("queries", "prompt-sticky", ("claims",), ("query_tokens",), fanout=True),
                _Stage(
                    "bm25",
                    "consistent-hash",
                    ("query_tokens",),
                    ("candidates",),
                    stateful=True,
                    aggregate_level=3,
                ),
                _Stage("encoder", "least-outstanding", ("candidates",), ("encoded",)),
                _Stage("rerank", "least-outstanding", ("encoded",), ("evidence",)),
            )
        }
        for stage in self.stages.values():
            stage.target = counts[stage.name]
            for _ in range(stage.target):
                self._add_instance(stage)

    def statistics(self) -> RuntimeStatistics:
        stats = super().statistics()
        # Credits in use as the runtime counts them: what is queued, up to the credits.
        instances = tuple(
            dataclasses.replace(i, credits_in_use=min(i.queue_depth, i.credits))
            for i in stats.instances
        )
        return dataclasses.replace(stats, edges=FACTOOL_EDGES, instances=instances)

    def queue_type(self, queue: str) -> Any:
        if queue not in {q for _, q, _ in FACTOOL_EDGES}:
            raise KeyError(queue)
        return struct_pb2.Struct if queue == "questions" else wrappers_pb2.StringValue

    def _pick(self, stage: _Stage, request_id: int) -> _Instance:
        if stage.scheduler in ("prompt-sticky", "consistent-hash"):  # by key, spread evenly
            ready = [
                self.instances[i]
                for i in stage.instances
                if self.instances[i].state is InstanceState.READY
            ]
            return ready[request_id % len(ready)]
        return super()._pick(stage, request_id)

    async def _work_batch(self, stage: _Stage, keys: list[int]) -> None:
        """One frame per key at once (a fan-out), processed together. Each frame is
        dispatched before the next is routed, so least-outstanding spreads them."""
        picks = []
        for key in keys:
            inst = self._pick(stage, key)
            inst.depth += 1
            inst.frames_out += 1
            inst.open_groups += stage.stateful  # a group per key while it is worked on
            picks.append(inst)
        self.frames_relayed += len(picks)
        try:
            spread = self.step_delay * self.jitter
            await trio.sleep(self.step_delay + self._rng.uniform(-spread, spread))
        finally:
            for inst in picks:
                inst.depth -= 1
                inst.open_groups -= stage.stateful
        for inst in picks:
            inst.frames_in += 1
        self.frames_relayed += len(picks)
        stage.frames_processed += len(picks)

    def _result(
        self, request_id: int, queue: str, key_path: tuple[int, ...], text: str
    ) -> RequestEvent:
        return RequestEvent(
            "result",
            request_id,
            queue=queue,
            key_path=key_path,
            payload=wrappers_pb2.StringValue(value=text).SerializeToString(),
            time=trio.current_time(),
        )

    async def _run(
        self, request_id: int, message: struct_pb2.Struct
    ) -> AsyncIterator[RequestEvent]:
        fields = dict(message.items())
        question = str(fields.get("question", ""))
        s = self.stages
        outcome = "cancelled"
        try:
            yield RequestEvent("accepted", request_id, time=trio.current_time())
            await self._work_batch(s["qa"], [request_id])
            yield self._result(request_id, "answer_out", (request_id,), f"answer to {question}")
            await self._work_batch(s["claims"], [request_id])
            for claim in range(self.claims):
                yield self._result(request_id, "claims_out", (request_id, claim), f"claim {claim}")
            # every claim's queries at once, then every query's retrieval at once
            await self._work_batch(s["queries"], [request_id * 31 + c for c in range(self.claims)])
            paths = [(request_id, c, q) for c in range(self.claims) for q in range(self.queries)]
            for stage in ("bm25", "encoder", "rerank"):
                await self._work_batch(s[stage], [hash(p) for p in paths])
            for path in paths:
                yield self._result(request_id, "evidence", path, f"evidence for {path}")
            outcome = "completed"
            yield RequestEvent("done", request_id, time=trio.current_time())
        finally:
            self.in_flight -= 1
            self.closed_requests += 1
            if outcome == "completed":
                self.completed += 1
            else:
                self.failed += 1
            self._reap()


# -- instance life cycle, for the probes -----------------------------------------------------


def crash_instance(fake: FakeRuntime, instance_id: int, error: str) -> None:
    """The instance ends on its own, as a crashed process does: it leaves its stage and
    keeps its last error (the runtime keeps crashed instances in its statistics)."""
    inst = fake.instances[instance_id]
    inst.state = InstanceState.CRASHED
    inst.last_error = error
    fake.stages[inst.stage].instances.remove(instance_id)


def start_instance(fake: FakeRuntime, stage: str) -> int:
    """A new instance of ``stage`` in the STARTING state (spawned, not registered yet)."""
    fake._add_instance(fake.stages[stage])
    iid = max(fake.instances)
    fake.instances[iid].state = InstanceState.STARTING
    return iid


# -- instance limits -----------------------------------------------------------------------


class LimitedFakeRuntime(FakeRuntime):
    """The wordcount FakeRuntime with the real runtime's scaling limits.

    ``max_instances`` caps the instances of all stages together (``[runtime]
    max_instances``), ``stage_limits`` caps single stages; a count past either raises
    ValueError naming the limit, as ``Runtime.scale`` does, and starts nothing.
    ``launcher=False`` makes scaling up raise AltoError ("no launcher"), as a runtime whose
    instances connect on their own does.
    """

    def __init__(
        self,
        *,
        max_instances: int = 8,
        stage_limits: dict[str, int] | None = None,
        launcher: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_instances = max_instances
        self.stage_limits = dict(stage_limits or {})
        self.launcher = launcher

    def _limit(self, stage: str) -> int:
        return min(self.stage_limits.get(stage, self.max_instances), self.max_instances)

    def statistics(self) -> RuntimeStatistics:
        stats = super().statistics()
        stages = tuple(
            dataclasses.replace(s, max_instances=self._limit(s.name)) for s in stats.stages
        )
        return dataclasses.replace(stats, stages=stages, max_instances=self.max_instances)

    async def scale(self, stage: str, instances: int) -> None:
        target = self.stages[stage]  # KeyError for an unknown stage
        if instances > self._limit(stage):
            raise ValueError(
                f"stage {stage!r} may have at most {self._limit(stage)} instances "
                f"(its max_instances); asked for {instances}"
            )
        others = sum(s.target for s in self.stages.values() if s is not target)
        if others + instances > self.max_instances:
            raise ValueError(
                f"the runtime may run at most {self.max_instances} instance processes "
                f"([runtime] max_instances); {others} run for other stages"
            )
        if not self.launcher and instances > len(target.instances):
            raise AltoError("this runtime has no launcher: start instances yourself")
        await super().scale(stage, instances)
