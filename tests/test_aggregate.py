"""Aggregation operators and the stage SDK's write rules, without a runtime or a socket.

The operators are driven through ``process()`` / ``group_closed()`` exactly as a worker
drives them, with a :class:`alto._stage.Context` whose output is a fake that collects the
frames it is sent; the frames are decoded with the real :class:`FrameDecoder`.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from google.protobuf import struct_pb2, wrappers_pb2
from google.protobuf.message import Message

import alto
from alto import LocalProtocolError, StageError
from alto._stage import Context, StageHandler, StageInfo
from alto.aggregate import Collect, Count, Filter, GroupAggregator, Sum, TopK
from alto.dataplane import NEED_DATA, Frame, FrameDecoder, FrameFlags, FrameKind
from alto.examples.demo_pb2 import Item, Number, Square, Total


class FakeOutput:
    """Stands in for the worker's output buffer: keeps what is sent, in order."""

    def __init__(self, max_frame_size: int = 1 << 20) -> None:
        self.max_frame_size = max_frame_size
        self.data = bytearray()

    async def send(self, data: bytes) -> None:
        self.data += data

    def frames(self) -> list[Frame]:
        dec = FrameDecoder(self.max_frame_size)
        dec.receive_data(bytes(self.data))
        dec.receive_data(b"")
        out: list[Frame] = []
        while (ev := dec.next_event()) is not None:
            assert ev is not NEED_DATA and isinstance(ev, Frame)
            out.append(ev)
        return out


def info(
    outputs: dict[str, type[Message]],
    *,
    fanout: bool = False,
    level: int = 0,
    child_tag: int = 0,
    name: str = "stage",
    instance: int = 7,
) -> StageInfo:
    return StageInfo(name, instance, fanout, outputs, child_tag, level)


class Driver:
    """Feeds one stateful operator as the worker does: one Context per input or close."""

    def __init__(self, op: Any, outputs: dict[str, type[Message]], level: int) -> None:
        self.op = op
        self.info = info(outputs, level=level, name="agg")
        self.out = FakeOutput()

    async def item(self, path: tuple[int, ...], msg: Message) -> None:
        await self.op.process(msg, Context(self.info, self.out, path))

    async def close(self, group: tuple[int, ...]) -> list[Frame]:
        before = len(self.out.frames())
        await self.op.group_closed(Context(self.info, self.out, group))
        return self.out.frames()[before:]


def decoded(frames: list[Frame], typ: type[Message]) -> list[Any]:
    return [typ.FromString(f.payload) for f in frames]


def is_even(msg: Item) -> bool:
    """The Filter predicate, found as ``test_aggregate:is_even``."""
    return msg.value % 2 == 0


# ---------------------------------------------------------------- operators


async def test_sum_per_group_with_interleaved_groups() -> None:
    d = Driver(
        Sum(field="value", output="totals", count_field="count", instance_field="instance"),
        {"totals": Total},
        2,
    )
    # level 2: the group is [request, claim]; items carry [request, claim, query]
    for i in range(6):
        await d.item((1, i % 2, i), Square(value=i))
        await d.item((2, 0, i), Square(value=100))
    f = await d.close((1, 0))
    assert [x.key_path for x in f] == [(1, 0)]  # emitted under the group's own key path
    assert decoded(f, Total) == [Total(total=0 + 2 + 4, count=3, instance=7)]
    assert decoded(await d.close((1, 1)), Total) == [Total(total=1 + 3 + 5, count=3, instance=7)]
    assert decoded(await d.close((2, 0)), Total) == [Total(total=600, count=6, instance=7)]
    assert d.op.groups == {}  # state is dropped once emitted


async def test_sum_emits_for_an_empty_group_and_without_optional_fields() -> None:
    d = Driver(Sum(field="value", output="totals"), {"totals": Total}, 1)
    f = await d.close((9,))
    assert f[0].kind == FrameKind.DATA and f[0].queue == "totals" and f[0].flags == FrameFlags.NONE
    assert decoded(f, Total) == [Total(total=0, count=0, instance=0)]


async def test_sum_names_the_fields_when_one_is_wrong() -> None:
    d = Driver(Sum(field="val", output="totals"), {"totals": Total}, 1)
    with pytest.raises(
        StageError, match=r"alto.examples.demo.Square has no field 'val'; fields: value, instance"
    ):
        await d.item((1, 0), Square(value=3))


async def test_count_per_group() -> None:
    d = Driver(Count(output="counts"), {"counts": Total}, 1)
    for rid, n in ((1, 3), (2, 5), (1, 2)):
        for i in range(n):
            await d.item((rid, i), Item(value=i))
    assert decoded(await d.close((2,)), Total) == [Total(count=5)]
    assert decoded(await d.close((1,)), Total) == [Total(count=5)]
    assert decoded(await d.close((3,)), Total) == [Total(count=0)]


async def test_topk_keeps_the_k_best_in_order() -> None:
    d = Driver(TopK(k=3, score_field="value", output="best"), {"best": Square}, 1)
    scores = [5, 1, 9, 3, 9, 7, 2, 8]
    for i, s in enumerate(scores):
        await d.item((1, i), Square(value=s, instance=i))  # instance: the arrival order
        await d.item((2, i), Square(value=-s, instance=i))
    best = decoded(await d.close((1,)), Square)
    # ties keep the earlier arrival first
    assert [(m.value, m.instance) for m in best] == [(9, 2), (9, 4), (8, 7)]
    worst = decoded(await d.close((2,)), Square)
    assert [(m.value, m.instance) for m in worst] == [(-1, 1), (-2, 6), (-3, 3)]


async def test_topk_with_fewer_items_than_k() -> None:
    d = Driver(TopK(k=10, score_field="value", output="best"), {"best": Square}, 1)
    for i, s in enumerate([2, 3, 1]):
        await d.item((1, i), Square(value=s))
    assert [m.value for m in decoded(await d.close((1,)), Square)] == [3, 2, 1]


def test_topk_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopK(k=0, score_field="value", output="best")


async def test_filter_keeps_matching_items_in_arrival_order() -> None:
    d = Driver(Filter(predicate="test_aggregate:is_even", output="evens"), {"evens": Item}, 1)
    for v in [3, 8, 2, 5, 4, 1]:
        await d.item((1, v), Item(value=v))
    f = await d.close((1,))
    assert [m.value for m in decoded(f, Item)] == [8, 2, 4]
    assert all(x.key_path == (1,) for x in f)


def test_filter_with_an_unknown_predicate() -> None:
    with pytest.raises(ValueError, match="cannot import filter predicate 'test_aggregate:nope'"):
        Filter(predicate="test_aggregate:nope", output="evens")


async def test_collect_into_a_repeated_field() -> None:
    d = Driver(Collect(output="lists", field="values"), {"lists": struct_pb2.ListValue}, 1)
    for i in range(3):
        await d.item((4, i), struct_pb2.Value(number_value=i))
    (lst,) = decoded(await d.close((4,)), struct_pb2.ListValue)
    assert [v.number_value for v in lst.values] == [0, 1, 2]


async def test_a_custom_aggregator() -> None:
    class Longest(GroupAggregator[str]):
        def initial(self) -> str:
            return ""

        def update(self, state: str, msg: Message) -> str:
            assert isinstance(msg, wrappers_pb2.StringValue)
            return max(state, msg.value, key=len)

        async def emit(self, state: str, ctx: Context) -> None:
            await ctx.write(self.output, wrappers_pb2.StringValue(value=state))

    d = Driver(Longest("out"), {"out": wrappers_pb2.StringValue}, 1)
    for w in ["a", "abc", "ab"]:
        await d.item((1, 0), wrappers_pb2.StringValue(value=w))
    assert decoded(await d.close((1,)), wrappers_pb2.StringValue) == [
        wrappers_pb2.StringValue(value="abc")
    ]


def test_operators_build_from_options_as_the_worker_builds_them() -> None:
    h = StageHandler(
        "total", Sum, {"field": "value", "output": "totals", "count_field": "count"}, stateful=True
    )
    assert h._closed is not None
    with pytest.raises(StageError, match="cannot build Sum from options"):
        StageHandler("total", Sum, {"feld": "value", "output": "totals"}, stateful=True)


# ---------------------------------------------------------------- Context.write rules


async def test_fan_out_writes_append_a_child_id_and_set_last() -> None:
    out = FakeOutput()
    ctx = Context(info({"items": Item}, fanout=True), out, (5, 2))
    for v in range(3):
        await ctx.write("items", Item(value=v))
    f = out.frames()
    assert [x.key_path for x in f] == [(5, 2, 0), (5, 2, 1), (5, 2, 2)]
    assert all(x.flags == FrameFlags.LAST and x.kind == FrameKind.DATA for x in f)
    assert decoded(f, Item) == [Item(value=v) for v in range(3)]


async def test_fan_out_child_ids_carry_the_stage_tag() -> None:
    out = FakeOutput()
    tag = 3 << 40
    ctx = Context(info({"items": Item}, fanout=True, child_tag=tag), out, (1,))
    await ctx.write("items", Item())
    async with ctx.child() as child:
        await child.write("items", Item())
    assert [x.key_path for x in out.frames()] == [(1, tag), (1, tag | 1), (1, tag | 1)]


async def test_child_streams_share_one_path_and_end_with_close() -> None:
    out = FakeOutput()
    ctx = Context(info({"tokens": Item}, fanout=True), out, (8,))
    async with ctx.child() as a:
        for t in range(3):
            await a.write("tokens", Item(value=t), prompt_key="p")
    async with ctx.child() as b:
        pass  # an empty child still closes
    assert (a.key_path, b.key_path) == ((8, 0), (8, 1))
    f = out.frames()
    assert [(x.kind, x.key_path, x.flags) for x in f] == [
        (FrameKind.DATA, (8, 0), FrameFlags.NONE),
        (FrameKind.DATA, (8, 0), FrameFlags.NONE),
        (FrameKind.DATA, (8, 0), FrameFlags.NONE),
        (FrameKind.CLOSE, (8, 0), FrameFlags.NONE),
        (FrameKind.CLOSE, (8, 1), FrameFlags.NONE),
    ]
    assert f[0].prompt_key == b"p"
    with pytest.raises(StageError, match=r"child \[8, 0\] is closed"):
        await a.write("tokens", Item())
    await a.aclose()  # closing twice sends nothing
    assert len(out.frames()) == 5


async def test_child_closes_when_the_body_raises() -> None:
    out = FakeOutput()
    ctx = Context(info({"tokens": Item}, fanout=True), out, (8,))
    with pytest.raises(RuntimeError):
        async with ctx.child() as c:
            await c.write("tokens", Item())
            raise RuntimeError("engine died")
    assert [x.kind for x in out.frames()] == [FrameKind.DATA, FrameKind.CLOSE]


async def test_non_fan_out_writes_keep_the_input_path() -> None:
    out = FakeOutput()
    ctx = Context(info({"squares": Square}), out, (3, 1))
    await ctx.write("squares", Square(value=1), id=3, prompt_key="pk")
    (f,) = out.frames()
    assert (f.key_path, f.flags, f.prompt_key, f.queue) == (
        (3, 1),
        FrameFlags.NONE,
        b"pk",
        "squares",
    )
    with pytest.raises(StageError, match="id=4 is not this input's request id 3"):
        await ctx.write("squares", Square(), id=4)
    with pytest.raises(StageError, match="is not declared fanout = true"):
        ctx.child()
    with pytest.raises(StageError, match="is not stateful"):
        _ = ctx.group


async def test_explicit_constraints() -> None:
    out = FakeOutput()
    ctx = Context(info({"bm25": Item}, fanout=True), out, (4, 1))
    await ctx.write("bm25", Item(), id=4, constraints=[4, 1, 9, 2])
    (f,) = out.frames()
    assert (f.key_path, f.flags) == (
        (4, 1, 9, 2),
        FrameFlags.NONE,
    )  # no LAST: the runtime closes it
    with pytest.raises(
        StageError, match=r"constraints \[4, 2, 9\] must extend the input's key path \[4, 1\]"
    ):
        await ctx.write("bm25", Item(), constraints=[4, 2, 9])
    with pytest.raises(StageError, match=r"must extend the input's key path"):
        await ctx.write("bm25", Item(), constraints=[4])
    with pytest.raises(StageError, match="id=5 is not this input's request id 4"):
        await ctx.write("bm25", Item(), id=5, constraints=[4, 1, 3])
    assert len(out.frames()) == 1  # nothing was sent by the refused writes


async def test_unknown_queue_names_the_allowed_ones() -> None:
    ctx = Context(
        info({"squares": Square, "partials": Square}, name="square", instance=3), FakeOutput(), (1,)
    )
    with pytest.raises(StageError) as err:
        await ctx.write("totals", Square())
    assert (err.value.stage, err.value.instance) == ("square", 3)
    assert "unknown output queue 'totals'; this stage writes: squares, partials" in str(err.value)
    assert str(err.value).startswith("stage 'square' instance 3: ")
    with pytest.raises(StageError, match="unknown output queue"):
        ctx.message("totals")
    sink_only = Context(info({}), FakeOutput(), (1,))
    with pytest.raises(StageError, match=r"this stage writes: \(none\)"):
        await sink_only.write("x", Item())


async def test_wrong_message_type_names_the_expected_one() -> None:
    ctx = Context(info({"squares": Square}), FakeOutput(), (1,))
    with pytest.raises(
        StageError, match=r"queue 'squares' carries alto\.examples\.demo\.Square, got Item"
    ):
        await ctx.write("squares", Item(value=2))


async def test_message_builds_the_queue_type() -> None:
    ctx = Context(info({"squares": Square}), FakeOutput(), (1,))
    m = ctx.message("squares", value=4)
    assert isinstance(m, Square) and m.value == 4


async def test_a_frame_over_the_limit_is_a_local_error() -> None:
    ctx = Context(info({"q": wrappers_pb2.BytesValue}), FakeOutput(max_frame_size=1024), (1,))
    await ctx.write("q", wrappers_pb2.BytesValue(value=b"x" * 900))
    with pytest.raises(LocalProtocolError, match="exceeds the limit of 1024"):
        await ctx.write("q", wrappers_pb2.BytesValue(value=b"x" * 1024))


async def test_group_is_the_key_path_prefix() -> None:
    ctx = Context(info({}, level=2), FakeOutput(), (1, 2, 3, 4))
    assert ctx.group == (1, 2)
    assert (ctx.request_id, ctx.stage, ctx.instance) == (1, "stage", 7)


# ---------------------------------------------------------------- alto.write


async def fan_out_with_module_write(msg: Number, ctx: Context) -> None:
    assert alto.current_context() is ctx
    for v in range(msg.value):
        await alto.write("items", Item(value=v))
    await alto.write(
        queue="items", obj=Item(value=99), id=ctx.request_id, constraints=[*ctx.key_path, 50, 1]
    )


async def test_module_level_write_uses_the_current_context() -> None:
    h = StageHandler("gen", fan_out_with_module_write, {}, stateful=False)
    out = FakeOutput()
    ctx = Context(info({"items": Item}, fanout=True), out, (6,))
    await h.process(Number(value=2), ctx)
    assert [(f.key_path, f.flags) for f in out.frames()] == [
        ((6, 0), FrameFlags.LAST),
        ((6, 1), FrameFlags.LAST),
        ((6, 50, 1), FrameFlags.NONE),
    ]
    with pytest.raises(LookupError):
        alto.current_context()  # reset after the call
    with pytest.raises(LookupError):
        await alto.write("items", Item())


async def test_concurrent_inputs_each_see_their_own_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[int, int] = {}

    async def stage(msg: Number, ctx: Context) -> None:
        await trio.sleep(0.01 * msg.value)
        seen[msg.value] = alto.current_context().request_id

    h = StageHandler("s", stage, {}, stateful=False)
    async with trio.open_nursery() as n:
        for rid in (3, 1, 2):
            n.start_soon(h.process, Number(value=rid), Context(info({}), FakeOutput(), (rid,)))
    assert seen == {1: 1, 2: 2, 3: 3}


def test_stage_handler_rejects_bad_entries() -> None:
    async def f(msg: Any, ctx: Context) -> None:
        pass

    with pytest.raises(StageError, match="options are only for class entry points"):
        StageHandler("s", f, {"x": 1}, stateful=False)
    with pytest.raises(StageError, match="must be a class with group_closed"):
        StageHandler("s", f, {}, stateful=True)
    with pytest.raises(StageError, match="neither an async function nor a class"):
        StageHandler("s", len, {}, stateful=False)
