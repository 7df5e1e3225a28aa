"""Cancellation and deadlines reach every stage, and leave nothing behind.

A request nobody waits for (its client left the result loop, closed the connection or
cancelled it; its deadline passed) must stop costing anything: the runtime drops its
queued frames and tells the instances holding its inputs; the SDK cancels the running
``process()`` calls, skips the waiting ones, drops open groups of stateful stages without
emitting, and acknowledges everything so credits come back.

The pipeline below has every stage kind: a fan-out stage (``gen``), a fan-out stage that
streams a child slowly (``fan2``), a slow stateless stage (``slow``), and stateful stages
at level 1 (``total1``) and level 2 (``total2``). Stages record what happened to them in
module-level lists (the in-process pipeline shares this module with the test).
Everything runs in-process with trio's autojump clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import alto
from alto.aggregate import Sum
from alto.dataplane import FrameKind, encode
from alto.examples.demo_pb2 import Item, Number, Square, Total
from alto.testing import FakePeer, open_pipeline

PIPELINE = """\
[pipeline]
name = "cancel"
input = "numbers"
outputs = ["partials", "totals1", "totals2"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.subitems]
type = "alto.examples.demo_pb2:Item"
[queues.squares1]
type = "alto.examples.demo_pb2:Square"
[queues.squares2]
type = "alto.examples.demo_pb2:Square"
[queues.partials]
type = "alto.examples.demo_pb2:Square"
[queues.totals1]
type = "alto.examples.demo_pb2:Total"
[queues.totals2]
type = "alto.examples.demo_pb2:Total"
[stages.gen]
entry = "test_cancellation:Gen"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.fan2]
entry = "test_cancellation:Fan2"
inputs = ["items"]
outputs = ["subitems"]
fanout = true
[stages.slow]
entry = "test_cancellation:slow"
inputs = ["subitems"]
outputs = ["squares1", "squares2", "partials"]
[stages.total1]
entry = "test_cancellation:RecordingSum"
inputs = ["squares1"]
outputs = ["totals1"]
stateful = true
aggregate_level = 1
options = { field = "value", output = "totals1", output_field = "total" }
[stages.total2]
entry = "test_cancellation:RecordingSum"
inputs = ["squares2"]
outputs = ["totals2"]
stateful = true
aggregate_level = 2
options = { field = "value", output = "totals2", output_field = "total" }
"""

EVENTS: list[tuple[str, object]] = []  # (what happened, where)


class Gen:
    async def process(self, msg: Number, ctx: alto.Context) -> None:
        for i in range(msg.value):
            await ctx.write("items", Item(value=i))
            await trio.sleep(0.2)


class Fan2:
    """One child stream per item, written slowly (like an LM streaming a query)."""

    async def process(self, msg: Item, ctx: alto.Context) -> None:
        try:
            async with ctx.child() as child:
                for k in range(3):
                    await child.write("subitems", Item(value=msg.value * 10 + k))
                    await trio.sleep(0.5)
        except trio.Cancelled:
            EVENTS.append(("fan2 cancelled", ctx.key_path))
            raise


async def slow(msg: Item, ctx: alto.Context) -> None:
    try:
        await trio.sleep(1.0)
    except trio.Cancelled:
        EVENTS.append(("slow cancelled", ctx.key_path))
        raise
    sq = Square(value=msg.value * msg.value)
    await ctx.write("squares1", sq)
    await ctx.write("squares2", sq)
    await ctx.write("partials", sq)


class RecordingSum(Sum):
    async def group_closed(self, ctx: alto.Context) -> None:
        EVENTS.append(("emitted", ctx.key_path))
        await super().group_closed(ctx)

    async def group_cancelled(self, ctx: alto.Context) -> None:
        EVENTS.append(("group cancelled", ctx.key_path))
        await super().group_cancelled(ctx)


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    EVENTS.clear()
    p = tmp_path / "cancel.toml"
    p.write_text(PIPELINE)
    return p


async def settled(runtime: alto.dataplane.Runtime) -> None:
    """Wait until nothing is in flight anywhere (bounded), then check it stays so."""
    with trio.fail_after(60):
        while True:
            stats = runtime.statistics()
            busy = [
                i
                for i in stats.instances
                if i.queue_depth or i.credits_in_use or i.backlog or i.open_groups
            ]
            if not busy and not stats.requests_in_flight:
                break
            await trio.sleep(0.05)
    assert all(not groups for groups in runtime.pinned_groups().values())


def by_request(rid: int, what: str) -> list[object]:
    return [where for w, where in EVENTS if w == what and where[0] == rid]  # type: ignore[index]


async def test_leaving_the_result_loop_cancels_the_request_everywhere(
    pipeline: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(pipeline, instances={"slow": 2, "total1": 2, "total2": 2}) as p:
        rid = 0
        async for r in p.submit(Number(value=4)):
            rid = r.request_id
            break  # one partial result is enough: the rest is abandoned
        await settled(p.runtime)
        stats = p.runtime.statistics()
        assert stats.requests_cancelled == 1 and stats.requests_completed == 0
        # Every stage kind saw it: running inputs were cancelled, open groups dropped at
        # both levels, nothing was emitted for it.
        assert by_request(rid, "slow cancelled") or by_request(rid, "fan2 cancelled")
        assert by_request(rid, "fan2 cancelled")
        dropped = by_request(rid, "group cancelled")
        assert any(len(k) == 1 for k in dropped)  # type: ignore[arg-type]
        assert any(len(k) == 2 for k in dropped)  # type: ignore[arg-type]
        # Level-2 groups of items that finished before the cancellation may have closed;
        # the request's level-1 group never does.
        assert not [k for k in by_request(rid, "emitted") if len(k) == 1]  # type: ignore[arg-type]
        # The pipeline goes on: a later request is exact.
        results = await p.run(Number(value=2))
        totals = [
            r.message.total
            for r in results
            if r.queue == "totals1" and isinstance(r.message, Total)
        ]
        assert totals == [sum((i * 10 + k) ** 2 for i in range(2) for k in range(3))]
        await settled(p.runtime)


async def test_a_deadline_fails_the_request_and_cancels_its_work(
    pipeline: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(pipeline) as p:
        with pytest.raises(alto.RequestFailed, match="deadline exceeded") as err:
            await p.client.run(Number(value=5), timeout=1.5)
        rid = err.value.request_id
        await settled(p.runtime)
        stats = p.runtime.statistics()
        assert stats.requests_timed_out == 1 and stats.requests_failed == 1
        assert by_request(rid, "slow cancelled") or by_request(rid, "fan2 cancelled")
        assert not [k for k in by_request(rid, "emitted") if len(k) == 1]  # type: ignore[arg-type]
        timeline = p.runtime.request_timeline(rid)
        assert timeline is not None and timeline["state"] == "timed_out"


async def test_explicit_cancel_and_the_in_process_ingress(
    pipeline: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(pipeline) as p:
        # The client API: cancel while the results stream.
        with pytest.raises(alto.RequestFailed, match="cancelled by its client"):
            async for r in p.submit(Number(value=3)):
                await p.client.cancel(r.request_id)
        # The runtime's own command (what DELETE /v1/requests/{id} calls).
        events = p.runtime.submit(Number(value=3).SerializeToString())
        accepted = await events.__anext__()
        assert p.runtime.cancel(accepted.request_id, "an operator cancelled it")
        rest = [ev async for ev in events]
        assert rest[-1].kind == "error" and "operator" in rest[-1].message
        assert not p.runtime.cancel(accepted.request_id)  # already ended
        # The HTTP ingress's consumer going away (the iterator closed early).
        events = p.runtime.submit(Number(value=3).SerializeToString())
        await events.__anext__()
        await events.aclose()
        await settled(p.runtime)
        stats = p.runtime.statistics()
        assert stats.requests_cancelled == 3 and stats.requests_in_flight == 0


AB = """\
[pipeline]
name = "ab"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.a]
entry = "test_cancellation:slow"
inputs = ["numbers"]
outputs = ["out"]
"""


async def test_the_instance_is_told_and_late_frames_are_discarded(tmp_path: Path) -> None:
    path = tmp_path / "ab.toml"
    path.write_text(AB)
    deployment = alto.load_deployment(None, alto.load_pipeline(path))
    runtime = alto.dataplane.Runtime(alto.load_pipeline(path), deployment, token="t")
    async with trio.open_nursery() as nursery:
        a = await FakePeer.attach(runtime, nursery).instance("t", "a")
        client = await FakePeer.attach(runtime, nursery).client("t")
        await client.send(encode(FrameKind.SUBMIT, [1], "numbers", b""))
        rid = (await client.expect(FrameKind.ACCEPTED)).key_path[1]
        assert (await a.expect(FrameKind.DATA)).key_path == (rid,)
        await client.send(encode(FrameKind.CANCEL, [rid]))
        failed = await client.expect(FrameKind.ERROR)
        assert b"cancelled by its client" in failed.payload
        assert (await a.expect(FrameKind.CANCEL)).key_path == (rid,)  # the instance is told
        # What it still writes is discarded and counted; its ACK returns the credit.
        out = Square(value=1).SerializeToString()
        await a.send(encode(FrameKind.DATA, [rid], "out", out) + encode(FrameKind.ACK, [rid]))
        with trio.fail_after(5):
            while runtime.statistics().frames_discarded != 1:
                await trio.sleep(0.01)
        (inst,) = runtime.statistics().instances
        assert inst.credits_in_use == 0 and inst.queue_depth == 0
        assert await client.pump() == []  # nothing reaches the client after the error
        # A client cannot cancel a request it does not own.
        other = await FakePeer.attach(runtime, nursery).client("t")
        await client.send(encode(FrameKind.SUBMIT, [2], "numbers", b""))
        rid2 = (await client.expect(FrameKind.ACCEPTED)).key_path[1]
        await other.send(encode(FrameKind.CANCEL, [rid2]))
        assert await a.expect(FrameKind.DATA)
        assert await a.pump() == [] and runtime.statistics().requests_cancelled == 1
        nursery.cancel_scope.cancel()


async def test_timeout_and_traceparent_are_checked_before_sending(
    pipeline: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(pipeline) as p:
        with pytest.raises(ValueError, match="timeout"):
            await p.client.run(Number(value=1), timeout=-1)
        with pytest.raises(ValueError, match="traceparent"):
            await p.client.run(Number(value=1), traceparent="00-xyz")
        assert p.runtime.statistics().requests_submitted == 0
