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

As the real runtime does, the fake keeps each request's outcome (``recent_requests``,
``slowest_requests``, observers told of each), cancels (``cancel``) and times out requests
(``submit(timeout=...)`` ends one with "deadline exceeded"), traces them (every hop and a
span per stage per key path: ``request_timeline``; ``trace_sample_rate`` 1.0 by default, a
W3C ``traceparent`` continues the caller's trace), aggregates per-stage histograms
(``StageStatistics.metrics``) and per-instance gauges, and keeps a scale log; a stage
given an ``autoscale`` range refuses manual scaling with ScaleConflict.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import struct_pb2, wrappers_pb2

from alto._errors import AltoError, OverloadedError
from alto._telemetry import BUCKETS
from alto.dataplane import ScaleConflict
from alto.dataplane._runtime import check_timeout
from alto.dataplane._stats import (
    HistogramSnapshot,
    InstanceState,
    InstanceStatistics,
    RequestEvent,
    RequestOutcome,
    RuntimeStatistics,
    ScaleEvent,
    StageStatistics,
)
from alto.dataplane._tracing import parse_traceparent

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
    busy_s: float = 0.0  # reported as a gauge, as a stage object's statistics() would


class _Ended(Exception):
    """A request ends early: ``status`` failed, cancelled or timed_out, and why."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    """One admitted request: its timings, its deadline, its trace."""

    rid: int
    admitted_at: float  # trio.current_time()
    wall: float  # time.time() at admission
    deadline: float = math.inf
    timeout: float | None = None
    stop_reason: str = ""
    stopped: trio.Event = field(default_factory=trio.Event)
    results: int = 0
    first_result_at: float | None = None
    ended: bool = False
    trace: dict[str, Any] | None = None

    def rel(self) -> float:
        return round(trio.current_time() - self.admitted_at, 6)

    def check(self) -> None:
        """Raise _Ended when it was cancelled or its deadline passed."""
        if self.stop_reason:
            raise _Ended("cancelled", self.stop_reason)
        if trio.current_time() >= self.deadline:
            raise _Ended(
                "timed_out",
                f"deadline exceeded: the request did not finish within {self.timeout:g} s",
            )


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
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm: bool = False  # reports gen_ai.* metrics and usage attributes, as LM stages do

    def observe(self, name: str, value: float) -> None:
        """One observation of a histogram of alto._telemetry.BUCKETS (per-bucket counts)."""
        bounds = BUCKETS[name]
        h = self.metrics.setdefault(name, {"buckets": [0] * (len(bounds) + 1), "sum": 0.0})
        h["buckets"][bisect.bisect_left(bounds, value)] += 1
        h["sum"] += value


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
        self.cancelled = 0
        self.timed_out = 0
        self.trace_sample_rate = 1.0
        self.autoscale: dict[str, tuple[int, int]] = {}  # stage -> (min, max)
        self.scale_log: deque[ScaleEvent] = deque(maxlen=64)
        self.outcomes: deque[RequestOutcome] = deque(maxlen=1024)
        self.requests: dict[int, _Request] = {}  # running
        self.traces: dict[int, dict[str, Any]] = {}  # finished and running, by request
        self._observers: list[Callable[[RequestOutcome], None]] = []

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
                    autoscale=self.autoscale.get(s.name),
                    metrics=tuple(
                        HistogramSnapshot(
                            name, BUCKETS[name], tuple(h["buckets"]), h["sum"], sum(h["buckets"])
                        )
                        for name, h in sorted(s.metrics.items())
                    ),
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
                    gauges={"busy_seconds": round(i.busy_s, 6)},
                )
                for i in self.instances.values()
            ),
            requests_in_flight=self.in_flight,
            requests_cancelled=self.cancelled,
            requests_timed_out=self.timed_out,
            scale_log=tuple(self.scale_log),
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
        if stage in self.autoscale:
            lo, hi = self.autoscale[stage]
            raise ScaleConflict(
                f"stage {stage!r} is autoscaled between {lo} and {hi} instances; "
                f"change [stages.{stage}.autoscale] in the deployment file to scale it by hand"
            )
        await trio.lowlevel.checkpoint()
        if instances != target.target or instances != self._active(target):
            self.log_scale(stage, instances, "operator", "asked")
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
            active = self._active(self.stages[inst.stage])
            self.log_scale(
                inst.stage, active - 1, "operator", f"drained instance {instance_id}", active
            )
            inst.state = InstanceState.DRAINING
            self.scale_events += 1
        self._reap()

    def submit(
        self, payload: bytes, *, timeout: float | None = None, traceparent: str | None = None
    ) -> AsyncIterator[RequestEvent]:
        if timeout is not None:
            timeout = check_timeout(timeout)  # ValueError, as the runtime's
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        if self.overloaded or self.in_flight >= self.max_inflight:
            self.refused += 1
            raise OverloadedError(
                f"{self.in_flight} requests in flight (limit {self.max_inflight})",
                retry_after=self.retry_after,
            )
        message = struct_pb2.Struct.FromString(payload)
        self.in_flight += 1
        self.submitted += 1
        now = trio.current_time()
        req = _Request(next(self._request_ids), now, time.time())
        if timeout is not None:
            req.deadline, req.timeout = now + timeout, timeout
        sampled = parent[2] if parent is not None else random.random() < self.trace_sample_rate
        if sampled:
            req.trace = {
                "request_id": req.rid,
                "trace_id": parent[0] if parent is not None else secrets.token_hex(16),
                "span_id": secrets.token_hex(8),
                "parent_span_id": parent[1] if parent is not None else None,
                "status": "running",
                "error": None,
                "admitted_at": req.wall,
                "latency_s": None,
                "hops": [],
                "spans": [],
                "dropped_events": 0,
            }
            self.traces[req.rid] = req.trace
        self.requests[req.rid] = req
        first = next(iter(self.stages.values()))
        self._hop(req, "ingress", None, first.inputs[0], first.name, None, (req.rid,))
        return self._run(req, message)

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        req = self.requests.get(request_id)
        if req is None or req.ended:
            return False
        # Ended at once, as the runtime's ledger ends it; its stream says so when it wakes.
        self._finish(req, "cancelled", reason)
        req.stop_reason = reason
        req.stopped.set()
        return True

    def request_timeline(self, request_id: int) -> dict[str, Any] | None:
        req = self.requests.get(request_id)
        outcome = next((o for o in reversed(self.outcomes) if o.request_id == request_id), None)
        trace = self.traces.get(request_id)
        if req is None and outcome is None and trace is None:
            return None
        body: dict[str, Any] = {"request_id": request_id}
        if req is not None and not req.ended:
            ttfr = req.first_result_at
            body.update(
                state="running",
                elapsed_s=req.rel(),
                results=req.results,
                time_to_first_result_s=None if ttfr is None else round(ttfr - req.admitted_at, 6),
                deadline_in_s=(
                    None
                    if req.deadline == math.inf
                    else round(req.deadline - trio.current_time(), 6)
                ),
            )
        elif outcome is not None:
            ttfr = outcome.time_to_first_result
            body.update(
                state=outcome.status,
                latency_s=round(outcome.latency, 6),
                results=outcome.results,
                time_to_first_result_s=None if ttfr is None else round(ttfr, 6),
                error=outcome.error or None,
            )
        body["trace"] = dict(trace) if trace is not None else None
        return body

    def recent_requests(self, limit: int = 100) -> list[RequestOutcome]:
        return list(reversed(self.outcomes))[:limit]

    def slowest_requests(self, limit: int = 20) -> list[RequestOutcome]:
        return sorted(self.outcomes, key=lambda o: o.latency, reverse=True)[:limit]

    def add_request_observer(self, observe: Callable[[RequestOutcome], None]) -> None:
        self._observers.append(observe)

    def input_type(self) -> Any:
        return struct_pb2.Struct

    def queue_type(self, queue: str) -> Any:
        return QUEUE_TYPES[queue]

    # -- the fake dataplane -------------------------------------------------------

    # -- requests: outcomes, traces, scale log -------------------------------------

    def log_scale(
        self, stage: str, to: int, by: str, reason: str, active: int | None = None
    ) -> None:
        """A scale event, as the runtime's supervisor logs one (the autoscaler's too)."""
        st = self.stages[stage]
        was = self._active(st) if active is None else active
        self.scale_log.append(ScaleEvent(trio.current_time(), stage, was, to, by, reason))

    def _active(self, stage: _Stage) -> int:
        states = (InstanceState.STARTING, InstanceState.READY)
        return sum(1 for i in stage.instances if self.instances[i].state in states)

    def _finish(self, req: _Request, status: str, error: str = "") -> None:
        """The request ended: its outcome is kept and every observer is told, before its
        consumer sees its last event (as the runtime's ledger does). Once only."""
        if req.ended:
            return
        req.ended = True
        self.requests.pop(req.rid, None)
        if status == "done":
            self.completed += 1
        elif status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
            self.timed_out += status == "timed_out"
        outcome = RequestOutcome(
            request_id=req.rid,
            status=status,
            admitted_at=req.admitted_at,
            first_result_at=req.first_result_at,
            finished_at=trio.current_time(),
            results=req.results,
            error=error,
            traced=req.trace is not None,
        )
        if req.trace is not None:
            req.trace.update(status=status, error=error or None, latency_s=req.rel())
        self.outcomes.append(outcome)
        for observe in self._observers:
            observe(outcome)

    def _result(
        self, req: _Request, event: RequestEvent, src: str, src_instance: int
    ) -> RequestEvent:
        """A result leaving ``src`` for the sink."""
        req.results += 1
        if req.first_result_at is None:
            req.first_result_at = trio.current_time()
        self._hop(req, src, src_instance, event.queue, "sink", None, event.key_path)
        return event

    def _hop(
        self,
        req: _Request,
        src: str,
        src_instance: int | None,
        queue: str,
        dst: str,
        dst_instance: int | None,
        key_path: tuple[int, ...],
    ) -> None:
        if req.trace is not None:
            req.trace["hops"].append(
                {
                    "t": req.rel(),
                    "from": src,
                    "from_instance": src_instance,
                    "queue": queue,
                    "to": dst,
                    "to_instance": dst_instance,
                    "key_path": list(key_path),
                    "kind": "data",
                }
            )

    async def _pause(self, req: _Request | None, seconds: float) -> None:
        """Work for ``seconds``; raises _Ended when the request is cancelled or its deadline
        passes meanwhile (the cancel scope never spans a yield of the generator)."""
        if req is None:
            await trio.sleep(seconds)
            return
        req.check()
        with trio.move_on_at(min(trio.current_time() + seconds, req.deadline)):
            await req.stopped.wait()
        req.check()

    def _record(
        self,
        req: _Request | None,
        stage: _Stage,
        inst: _Instance,
        key_path: tuple[int, ...],
        received: float,
        outputs: int = 1,
    ) -> None:
        """One input processed: the stage's histograms, the instance's gauge, the span."""
        now = trio.current_time()
        inst.busy_s += now - received
        stage.observe("alto.stage.queue_wait", 0.0)
        stage.observe("alto.stage.processing", now - received)
        stage.observe("alto.stage.time_to_first_output", now - received)
        stage.observe("alto.stage.outputs", outputs)
        attributes: dict[str, Any] = {}
        if stage.lm:
            tokens = 8 * outputs
            stage.observe("gen_ai.server.time_to_first_token", (now - received) / 2)
            stage.observe("gen_ai.server.time_per_output_token", (now - received) / (2 * tokens))
            stage.observe("gen_ai.client.token.usage.input", 40)
            stage.observe("gen_ai.client.token.usage.output", tokens)
            attributes = {"gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": tokens}
        if req is not None and req.trace is not None:
            t0 = round(received - req.admitted_at, 6)
            span: dict[str, Any] = {
                "stage": stage.name,
                "instance": inst.id,
                "key_path": list(key_path),
                "kind": "group_closed" if stage.stateful else "process",
                "status": "ok",
                "received": t0,
                "started": t0,
                "first_output": req.rel(),
                "last_output": req.rel(),
                "ended": req.rel(),
                "outputs": outputs,
            }
            if attributes:
                span["attributes"] = attributes
            req.trace["spans"].append(span)

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

    async def _work(
        self,
        stage: _Stage,
        inst: _Instance,
        req: _Request | None = None,
        key_path: tuple[int, ...] = (),
    ) -> None:
        inst.depth += 1
        inst.frames_out += 1
        self.frames_relayed += 1
        received = trio.current_time()
        try:
            await self._pause(req, self.step_delay)
        finally:
            inst.depth -= 1
        inst.frames_in += 1
        self.frames_relayed += 1
        stage.frames_processed += 1
        self._record(req, stage, inst, key_path, received)

    async def _run(self, req: _Request, message: struct_pb2.Struct) -> AsyncIterator[RequestEvent]:
        request_id = req.rid
        fields = dict(message.items())
        words = str(fields.get("text", "")).split()
        fail = bool(fields.get("fail", False))
        split, score, sum_ = self.stages["split"], self.stages["score"], self.stages["sum"]
        summer = self._pick(sum_, request_id)
        summer.open_groups += 1
        try:
            yield RequestEvent("accepted", request_id, time=trio.current_time())
            total = 0
            try:
                for index, word in enumerate(words):
                    path = (request_id, index)
                    splitter = self._pick(split, request_id)
                    await self._work(split, splitter, req, (request_id,))
                    scorer = self._pick(score, request_id)
                    self._hop(req, "split", splitter.id, "words", "score", scorer.id, path)
                    await self._work(score, scorer, req, path)
                    if fail:
                        scorer.last_error = f"ValueError: cannot score {word!r}"
                        score.errors += 1
                        error = f"stage 'score' instance {scorer.id}: {scorer.last_error}"
                        raise _Ended("failed", error)
                    self._hop(req, "score", scorer.id, "scores", "sum", summer.id, path)
                    await self._work(sum_, summer, req, path)
                    total += len(word)
                    event = RequestEvent(
                        "result",
                        request_id,
                        queue="total",
                        key_path=path,
                        payload=wrappers_pb2.Int32Value(value=total).SerializeToString(),
                        time=trio.current_time(),
                    )
                    yield self._result(req, event, "sum", summer.id)
                    req.check()
            except _Ended as end:
                self._finish(req, end.status, end.message)
                yield RequestEvent("error", request_id, message=end.message)
                return
            self._finish(req, "done")
            yield RequestEvent("done", request_id, time=trio.current_time())
        finally:
            summer.open_groups -= 1
            self._closed(req)
            self._reap()

    def _closed(self, req: _Request) -> None:
        """The result iterator closed: a request it had not finished is cancelled."""
        if not req.ended:
            self._finish(req, "cancelled", "its consumer went away")
        self.in_flight -= 1
        self.closed_requests += 1


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
                _Stage("qa", "prompt-sticky", ("questions",), ("answers", "answer_out"), lm=True),
                _Stage(
                    "claims",
                    "prompt-sticky",
                    ("answers",),
                    ("claims", "claims_out"),
                    fanout=True,
                    lm=True,
                ),
                _Stage(
                    "queries",
                    "prompt-sticky",
                    ("claims",),
                    ("query_tokens",),
                    fanout=True,
                    lm=True,
                ),
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

    async def _work_batch(
        self,
        stage: _Stage,
        keys: list[int],
        req: _Request | None = None,
        paths: Sequence[tuple[int, ...]] | None = None,
        outputs: int = 1,
    ) -> list[_Instance]:
        """One frame per key at once (a fan-out), processed together. Each frame is
        dispatched before the next is routed, so least-outstanding spreads them. Returns
        the instances that took them."""
        picks = []
        for key in keys:
            inst = self._pick(stage, key)
            inst.depth += 1
            inst.frames_out += 1
            inst.open_groups += stage.stateful  # a group per key while it is worked on
            picks.append(inst)
        self.frames_relayed += len(picks)
        received = trio.current_time()
        try:
            spread = self.step_delay * self.jitter
            await self._pause(req, self.step_delay + self._rng.uniform(-spread, spread))
        finally:
            for inst in picks:
                inst.depth -= 1
                inst.open_groups -= stage.stateful
        for inst in picks:
            inst.frames_in += 1
        self.frames_relayed += len(picks)
        stage.frames_processed += len(picks)
        for i, inst in enumerate(picks):
            path = paths[i] if paths is not None else ()
            self._record(req, stage, inst, path, received, outputs)
        return picks

    def _text(
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

    async def _run(self, req: _Request, message: struct_pb2.Struct) -> AsyncIterator[RequestEvent]:
        request_id = req.rid
        fields = dict(message.items())
        question = str(fields.get("question", ""))
        s = self.stages
        rid = (request_id,)
        claims: list[tuple[int, ...]] = [(request_id, c) for c in range(self.claims)]
        paths: list[tuple[int, ...]] = [
            (request_id, c, q) for c in range(self.claims) for q in range(self.queries)
        ]
        try:
            yield RequestEvent("accepted", request_id, time=trio.current_time())
            try:
                (qa,) = await self._work_batch(s["qa"], [request_id], req, [rid])
                answer = self._text(request_id, "answer_out", rid, f"answer to {question}")
                yield self._result(req, answer, "qa", qa.id)
                self._hop(req, "qa", qa.id, "answers", "claims", None, rid)
                (claimer,) = await self._work_batch(
                    s["claims"], [request_id], req, [rid], outputs=self.claims
                )
                for claim in claims:
                    event = self._text(request_id, "claims_out", claim, f"claim {claim[1]}")
                    yield self._result(req, event, "claims", claimer.id)
                    self._hop(req, "claims", claimer.id, "claims", "queries", None, claim)
                    req.check()
                # every claim's queries at once, then every query's retrieval at once
                keys = [request_id * 31 + c for c in range(self.claims)]
                queriers = await self._work_batch(
                    s["queries"], keys, req, claims, outputs=self.queries
                )
                for path in paths:
                    self._hop(
                        req, "queries", queriers[path[1]].id, "query_tokens", "bm25", None, path
                    )
                previous = "queries"
                for stage, queue in (
                    ("bm25", "candidates"),
                    ("encoder", "encoded"),
                    ("rerank", "evidence"),
                ):
                    picks = await self._work_batch(s[stage], [hash(p) for p in paths], req, paths)
                    if stage != "rerank":
                        nxt = {"bm25": "encoder", "encoder": "rerank"}[stage]
                        for path, inst in zip(paths, picks, strict=True):
                            self._hop(req, stage, inst.id, queue, nxt, None, path)
                    previous = stage
                for path, inst in zip(paths, picks, strict=True):
                    event = self._text(request_id, "evidence", path, f"evidence for {path}")
                    yield self._result(req, event, previous, inst.id)
                req.check()
            except _Ended as end:
                self._finish(req, end.status, end.message)
                yield RequestEvent("error", request_id, message=end.message)
                return
            self._finish(req, "done")
            yield RequestEvent("done", request_id, time=trio.current_time())
        finally:
            self._closed(req)
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
