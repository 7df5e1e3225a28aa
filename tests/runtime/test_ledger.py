"""The ledger (``alto.dataplane._ledger``): when a group is complete, when a request is done.

The first part drives a :class:`~alto.dataplane._ledger.Ledger` alone, without sockets or a
relay: the test reports what a relay would have seen (an entry routed to a stage, its
acknowledgement, a child closed by a LAST flag or a CLOSE frame, a group opened) and
checks what the ledger decides. Its ``dispatch`` callback records the GROUP_CLOSED frames
instead of sending them. These tests run under Trio only because the ledger stamps the
end of a request with Trio's clock.

The second part runs whole pipelines in-process (:func:`alto.testing.open_pipeline`) whose
results show the same rules end to end; their stages are defined here and referenced as
``test_ledger:<name>``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing
from runtime_helpers import TIMEOUT, demo_pipeline, wait_until, write

import alto
from alto import ConfigError, load_pipeline
from alto._config import DeploymentConfig, RuntimeLimits
from alto._stage import Context
from alto.dataplane import Frame, FrameKind, encode
from alto.dataplane._connections import Sink
from alto.dataplane._frames import parse
from alto.dataplane._ledger import Ledger, Request
from alto.dataplane._topology import Instance, Stage, derive_topology
from alto.examples.demo_pb2 import Item, Number, Square, Total
from alto.testing import open_pipeline

# --------------------------------------------------------------------------- the rules, alone

# split: [r] -> [r, a]; stream: [r, a] -> [r, a, b]. sum groups by [r, a] (level 2), leaf
# by [r, a, b] (level 3), total by [r] (level 1), downstream of sum.
LEDGER = """\
[pipeline]
name = "ledger"
input = "numbers"
outputs = ["leaves", "totals"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.tokens]
type = "alto.examples.demo_pb2:Square"
[queues.words]
type = "alto.examples.demo_pb2:Square"
[queues.sums]
type = "alto.examples.demo_pb2:Total"
[queues.leaves]
type = "alto.examples.demo_pb2:Total"
[queues.totals]
type = "alto.examples.demo_pb2:Total"
[stages.split]
entry = "runtime_helpers:never_imported"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.stream]
entry = "runtime_helpers:never_imported"
inputs = ["items"]
outputs = ["tokens", "words"]
fanout = true
[stages.sum]
entry = "runtime_helpers:never_imported"
inputs = ["tokens"]
outputs = ["sums"]
stateful = true
aggregate_level = 2
[stages.leaf]
entry = "runtime_helpers:never_imported"
inputs = ["words"]
outputs = ["leaves"]
stateful = true
aggregate_level = 3
[stages.total]
entry = "runtime_helpers:never_imported"
inputs = ["sums"]
outputs = ["totals"]
stateful = true
aggregate_level = 1
"""


def key(*ids: int) -> bytes:
    """A key path as the frame bytes the ledger keys on."""
    return struct.pack(f"<{len(ids)}Q", *ids)


class RecordingSink(Sink):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    def result(self, rid: int, frame: bytes) -> bool:
        self.events.append(("result", rid, ""))
        return True

    def done(self, rid: int) -> None:
        self.events.append(("done", rid, ""))

    def error(self, rid: int, message: str) -> None:
        self.events.append(("error", rid, message))


@dataclass
class Books:
    """A ledger over LEDGER's topology, one fake instance per stage, and what it did."""

    ledger: Ledger
    stages: dict[str, Stage]
    instances: dict[str, Instance]
    sink: RecordingSink = field(default_factory=RecordingSink)
    dispatched: list[tuple[Instance, int, Frame]] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)

    def admit(self) -> Request:
        return self.ledger.admit(self.sink, 0.0, limit=16, closing=False)

    def route(self, req: Request, stage: str, *path: int) -> None:
        """What the relay tells the ledger when it routes a DATA frame with key path
        ``path`` to ``stage``: a group opens where the stage aggregates, and the frame is
        a live entry."""
        st = self.stages[stage]
        if st.level:
            k = key(*path[: st.level])
            if k not in st.groups:
                assert self.ledger.group_closed_already(req, st, k) is None
                self.ledger.open_group(req, st, k, self.instances[stage])
        self.ledger.add_entry(req, st, encode(FrameKind.DATA, path, "q"), len(path))

    def ack(self, req: Request, stage: str, *path: int) -> None:
        """The instance of ``stage`` acknowledged its input with key path ``path``."""
        self.ledger.remove_entry(req, self.stages[stage], key(*path))

    def close(self, req: Request, *path: int) -> None:
        """The producer of child ``path`` closed it (a LAST flag or a CLOSE frame)."""
        self.ledger.close_child(req, key(*path))

    def closed_groups(self) -> list[tuple[str, tuple[int, ...]]]:
        """The GROUP_CLOSED frames dispatched so far: (stage, group key path)."""
        out = []
        for inst, rid, frame in self.dispatched:
            assert inst is self.instances[inst.stage.name]  # to the instance it was pinned to
            assert frame.kind == FrameKind.GROUP_CLOSED and frame.key_path[0] == rid
            out.append((inst.stage.name, frame.key_path))
        return out


@pytest.fixture
def books(tmp_path: Path) -> Books:
    pipeline = load_pipeline(write(tmp_path, LEDGER))
    topology = derive_topology(pipeline, DeploymentConfig("<test>", RuntimeLimits(), {}))
    instances = {st.name: Instance(st.index + 1, st, 8, launched=False) for st in topology.by_index}
    b = Books(Ledger(topology), topology.stages, instances)

    def dispatch(inst: Instance, rid: int, frame: bytes) -> None:
        b.dispatched.append((inst, rid, parse(frame, 0, len(frame))))

    def unpinned(inst: Instance) -> None:
        b.unpinned.append(inst.stage.name)

    b.ledger.dispatch = dispatch
    b.ledger.unpinned = unpinned
    # What the rules below rely on (see derive_topology).
    s = topology.stages
    assert s["split"].tracks_children and s["stream"].tracks_children
    assert s["sum"].tracked and s["sum"].track_levels == (1,)
    assert not s["leaf"].tracked and not s["total"].tracked
    return b


async def test_a_request_is_done_when_its_last_entry_is_acknowledged(books: Books) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)  # the ingress
    books.ledger.settle()
    assert books.sink.events == [] and r in books.ledger.requests
    books.ack(req, "split", r)  # split wrote nothing
    books.ledger.settle()
    assert books.sink.events == [("done", r, "")]
    assert r not in books.ledger.requests and books.ledger.completed == 1
    books.ledger.settle()  # once only
    assert books.sink.events == [("done", r, "")]


async def test_a_child_closed_by_last_closes_its_group_before_its_producer_is_done(
    books: Books,
) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    books.close(req, r, 0)  # split: ctx.write, a one-item child
    books.route(req, "stream", r, 0)
    books.close(req, r, 0, 0)  # stream: ctx.write into words, a one-item child
    books.route(req, "leaf", r, 0, 0)
    books.ledger.settle()
    # Nothing more can come under [r, 0, 0]: both of its ancestors' children are closed,
    # although split and stream still hold their inputs. The group closes behind its item
    # (the same connection), which leaf has not acknowledged yet either.
    assert books.closed_groups() == [("leaf", (r, 0, 0))]
    assert books.stages["leaf"].groups == {}
    assert books.instances["leaf"].open_groups == 0
    assert books.ledger.group_closed_already(req, books.stages["leaf"], key(r, 0, 0)) is not None


async def test_a_child_closed_by_close_closes_its_group(books: Books) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    books.close(req, r, 0)
    books.route(req, "stream", r, 0)
    for _ in range(3):  # a streamed child: three words under [r, 0, 0], no LAST flag
        books.route(req, "leaf", r, 0, 0)
    books.ledger.settle()
    assert books.closed_groups() == []  # stream, holding [r, 0], may write more
    for _ in range(3):
        books.ack(req, "leaf", r, 0, 0)
    books.ledger.settle()
    assert books.closed_groups() == []  # still: the child is open and its producer live
    books.close(req, r, 0, 0)  # stream's CLOSE frame
    books.ledger.settle()
    assert books.closed_groups() == [("leaf", (r, 0, 0))]


async def test_a_group_stays_open_while_an_ancestor_entry_with_an_open_child_is_live(
    books: Books,
) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    books.route(req, "stream", r, 0)  # split streams child [r, 0]: no LAST
    books.route(req, "leaf", r, 0, 0)  # stream streams child [r, 0, 0]: no LAST
    books.route(req, "sum", r, 0, 0)
    books.ack(req, "leaf", r, 0, 0)
    books.ack(req, "sum", r, 0, 0)
    books.close(req, r, 0, 0)  # stream closes [r, 0, 0] ...
    books.ack(req, "stream", r, 0)  # ... and is done with its input [r, 0]
    books.ledger.settle()
    # split still holds [r], and its child [r, 0] is open: another item under [r, 0]
    # could reach stream, whose children of it are counted from 0 again ([r, 0, 0], ...).
    # Neither leaf's group [r, 0, 0] nor sum's [r, 0] is complete.
    assert books.closed_groups() == []
    books.route(req, "stream", r, 0)  # and indeed: a second item of split's stream
    books.route(req, "leaf", r, 0, 0)
    books.ack(req, "leaf", r, 0, 0)
    books.close(req, r, 0, 0)
    books.ack(req, "stream", r, 0)
    books.ledger.settle()
    assert books.closed_groups() == []
    books.close(req, r, 0)  # split closes its stream [r, 0] (and still holds [r])
    books.ledger.settle()
    assert sorted(books.closed_groups()) == [("leaf", (r, 0, 0)), ("sum", (r, 0))]


async def test_a_group_stays_open_until_its_ancestor_acknowledges(books: Books) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    books.route(req, "stream", r, 0)
    books.close(req, r, 0, 0)
    books.route(req, "leaf", r, 0, 0)
    books.ack(req, "stream", r, 0)
    books.ledger.settle()
    assert books.closed_groups() == []  # split holds [r] with [r, 0] open
    books.ack(req, "split", r)  # no CLOSE: split's acknowledgement ends its children too
    books.ledger.settle()
    assert books.closed_groups() == [("leaf", (r, 0, 0))]


async def test_fan_out_at_two_levels_closes_each_group_once_and_then_the_request(
    books: Books,
) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    # split: a streamed child [r, 0] and a one-item child [r, 1]
    books.route(req, "stream", r, 0)
    books.close(req, r, 1)
    books.route(req, "stream", r, 1)
    # stream on [r, 0]: tokens for sum under a streamed child [r, 0, 0]
    books.route(req, "sum", r, 0, 0)
    books.route(req, "sum", r, 0, 0)
    # stream on [r, 1]: a one-item token child [r, 1, 0]
    books.close(req, r, 1, 0)
    books.route(req, "sum", r, 1, 0)
    books.ledger.settle()
    assert books.closed_groups() == []  # stream holds [r, 0] and [r, 1]
    books.ack(req, "stream", r, 1)
    books.ledger.settle()
    # [r, 1]: closed by split's LAST, and its producer is done: sum's group [r, 1] closes,
    # though sum has not acknowledged its item (GROUP_CLOSED queues behind it).
    assert books.closed_groups() == [("sum", (r, 1))]
    books.close(req, r, 0, 0)
    books.ack(req, "stream", r, 0)
    books.ledger.settle()
    assert books.closed_groups() == [("sum", (r, 1))]  # split may still stream into [r, 0]
    books.ack(req, "split", r)  # split is done with [r]: nothing more under [r, 0]
    books.ledger.settle()
    assert books.closed_groups() == [("sum", (r, 1)), ("sum", (r, 0))]
    # sum works through its items and both GROUP_CLOSED frames, writing one aggregate per
    # group for total (level 1): total's group [r] stays open while sum holds any entry
    for path in ((r, 0, 0), (r, 0, 0), (r, 1, 0)):
        books.ack(req, "sum", *path)
    books.route(req, "total", r, 1)
    books.ack(req, "sum", r, 1)  # its GROUP_CLOSED
    books.ledger.settle()
    assert [s for s, _ in books.closed_groups()] == ["sum", "sum"]
    books.route(req, "total", r, 0)
    books.ack(req, "sum", r, 0)
    books.ledger.settle()
    assert books.closed_groups()[-1] == ("total", (r,))
    assert books.sink.events == []  # total's GROUP_CLOSED is live until acknowledged
    books.ack(req, "total", r, 1)
    books.ack(req, "total", r, 0)
    books.ledger.settle()
    assert books.sink.events == []
    books.ack(req, "total", r)  # total wrote its aggregate, then acknowledged
    books.ledger.settle()
    assert books.sink.events == [("done", r, "")]
    assert len(books.closed_groups()) == 3  # each group exactly once
    assert all(not st.groups for st in books.stages.values())
    assert all(i.open_groups == 0 for i in books.instances.values())


async def test_untracked_stages_count_entries_by_request_only(books: Books) -> None:
    req = books.admit()
    r = req.rid
    books.route(req, "split", r)
    books.route(req, "stream", r, 0)
    books.close(req, r, 0, 0)
    books.route(req, "leaf", r, 0, 0)  # leaf is untracked: nothing downstream aggregates
    assert req.live_total == 3
    leaf = books.stages["leaf"].index
    assert not [k for k in (*req.live, *req.sub) if k[0] == leaf]
    # a coalesced ACK of n frames of an untracked stage
    books.ledger.remove_entries(req, 1)
    books.ack(req, "stream", r, 0)
    books.ack(req, "split", r)
    assert req.live_total == 0
    books.ledger.settle()
    # leaf's group closed when its last item's producers were done; its GROUP_CLOSED is
    # an entry like any other
    assert books.closed_groups() == [("leaf", (r, 0, 0))]
    assert req.live_total == 1 and books.sink.events == []
    books.ledger.remove_entries(req, 1)
    books.ledger.settle()
    assert books.sink.events == [("done", r, "")]


async def test_fail_releases_the_pins_and_says_so(books: Books) -> None:
    req = books.admit()
    r = req.rid
    other = books.admit()
    books.route(req, "split", r)
    books.route(req, "stream", r, 0)
    books.route(req, "sum", r, 0, 0)
    books.route(req, "leaf", r, 0, 0)
    books.route(other, "split", other.rid)
    books.route(other, "stream", other.rid, 0)
    books.route(other, "leaf", other.rid, 0, 0)
    assert books.instances["leaf"].open_groups == 2
    ended: list[int] = []
    books.ledger.ended = lambda request: ended.append(request.rid)
    assert books.ledger.fail(r, "stage 'stream' instance 2: boom") is req
    # its pins are gone from the stages and the instances, the instances are told
    assert books.stages["sum"].groups == {}
    assert list(books.stages["leaf"].groups) == [key(other.rid, 0, 0)]
    assert books.instances["sum"].open_groups == 0
    assert books.instances["leaf"].open_groups == 1
    assert sorted(books.unpinned) == ["leaf", "sum"]
    assert ended == [r]
    assert books.sink.events == [("error", r, "stage 'stream' instance 2: boom")]
    assert r not in books.ledger.requests and books.ledger.failed == 1
    # it ends once: a second failure and later settles change nothing
    assert books.ledger.fail(r, "again") is None
    books.ledger.settle()
    assert books.ledger.failed == 1 and len(books.sink.events) == 1
    assert books.closed_groups() == []  # no GROUP_CLOSED for a failed request's groups
    assert other.rid in books.ledger.requests


async def test_an_item_for_a_closed_group_is_refused_by_name(books: Books) -> None:
    req = books.admit()
    r = req.rid
    leaf = books.stages["leaf"]
    books.route(req, "split", r)
    books.close(req, r, 0)
    books.route(req, "stream", r, 0)
    assert books.ledger.group_closed_already(req, leaf, key(r, 0, 0)) is None
    books.close(req, r, 0, 0)
    books.route(req, "leaf", r, 0, 0)
    books.ledger.settle()
    assert books.closed_groups() == [("leaf", (r, 0, 0))]
    why = books.ledger.group_closed_already(req, leaf, key(r, 0, 0))
    assert why == (
        f"an item for group [{r}, 0, 0] of stage 'leaf' arrived after that group was closed"
    )
    # other groups, and the same key path at another stage, are not affected
    assert books.ledger.group_closed_already(req, leaf, key(r, 0, 1)) is None
    assert books.ledger.group_closed_already(req, books.stages["sum"], key(r, 0)) is None


# --------------------------------------------------------------------------- end to end

# A non-fan-out stage writes twice with one key path into a queue read by a fan-out stage.
COLLIDE = """\
[pipeline]
name = "collide"
input = "numbers"
outputs = ["counts"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.mid]
type = "alto.examples.demo_pb2:Item"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.counts]
type = "alto.examples.demo_pb2:Total"
[stages.twice]
entry = "test_ledger:twice"
inputs = ["numbers"]
outputs = ["mid"]
[stages.fan]
entry = "test_ledger:Fan"
inputs = ["mid"]
outputs = ["items"]
fanout = true
[stages.cnt]
entry = "alto.aggregate:Count"
inputs = ["items"]
outputs = ["counts"]
stateful = true
aggregate_level = 2
options = { output = "counts" }
"""

# generate (fan-out) -> total (stateful, level 1) -> again (stateful, level LEVEL)
AFTER_AGG = """\
[pipeline]
name = "afteragg"
input = "numbers"
outputs = ["totals2"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.totals]
type = "alto.examples.demo_pb2:Total"
[queues.totals2]
type = "alto.examples.demo_pb2:Total"
[stages.generate]
entry = "alto.examples.demo:Generate"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.total]
entry = "alto.aggregate:Sum"
inputs = ["items"]
outputs = ["totals"]
stateful = true
aggregate_level = 1
options = { field = "value", output = "totals", output_field = "total", count_field = "count" }
[stages.again]
entry = "alto.aggregate:Sum"
inputs = ["totals"]
outputs = ["totals2"]
stateful = true
aggregate_level = LEVEL
options = { field = "total", output = "totals2", output_field = "total", count_field = "count" }
"""


async def twice(msg: Number, ctx: alto.Context) -> None:
    """Not a fan-out stage, yet writes two messages with its input's key path."""
    await ctx.write("mid", Item(value=1))
    await ctx.write("mid", Item(value=2))


class Fan:
    async def process(self, msg: Item, ctx: alto.Context) -> None:
        await ctx.write("items", Item(value=msg.value))


@pytest.mark.parametrize("instances", [{}, {"fan": 2}])
async def test_two_writes_with_one_key_path_into_a_fan_out_stage_fail(
    tmp_path: Path, instances: dict[str, int]
) -> None:
    async with open_pipeline(write(tmp_path, COLLIDE), instances=instances) as p:
        with trio.fail_after(TIMEOUT), pytest.raises(alto.RequestFailed) as info:
            await p.run(Number(value=3))
        assert "stage 'twice' instance" in info.value.message
        assert "fan-out" in info.value.message
        assert "second message with key path [1] to queue 'mid'" in info.value.message
        await wait_until(lambda: not p.runtime.requests)


async def test_stateful_stage_after_a_stateful_stage(tmp_path: Path) -> None:
    # Outputs of a stateful stage carry its group's key path (depth = its level): a level
    # deeper than that downstream is a configuration error, not a failure of every request.
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, AFTER_AGG.replace("LEVEL", "2"), "deep.toml"))
    assert info.value.key == "stages.again.aggregate_level"
    assert "depth 1" in info.value.message
    # At level 1 it works, with exact results.
    path = write(tmp_path, AFTER_AGG.replace("LEVEL", "1"))
    async with open_pipeline(path, instances={"total": 2, "again": 2}) as p:
        values = [1, 2, 5, 9, 12]  # (0 items: no group, no aggregate)
        out: dict[int, list[alto.Result]] = {}

        async def one(v: int) -> None:
            out[v] = await p.run(Number(value=v))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for v in values:
                    nursery.start_soon(one, v)
    for v in values:
        (result,) = out[v]  # one aggregate per request
        assert result.queue == "totals2" and len(result.key_path) == 1
        assert isinstance(result.message, Total)
        assert (result.message.total, result.message.count) == (sum(range(v)), 1)


# Key paths three levels deep. Timed stages run under pytest-trio's ``autojump_clock``:
# their sleeps cost virtual time, which makes the *order* in which groups close observable
# and deterministic (a group closed by its child stream's CLOSE frame arrives while the
# request is still running; one closed only at the end of the request would not).
LEVELS = """\
[pipeline]
name = "levels"
input = "numbers"
outputs = ["sums", "counts"]

[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.tokens]
type = "alto.examples.demo_pb2:Square"
[queues.sums]
type = "alto.examples.demo_pb2:Total"
[queues.sums_fwd]
type = "alto.examples.demo_pb2:Total"
[queues.counts]
type = "alto.examples.demo_pb2:Total"

[stages.split]                 # [r] -> [r, a]: one item a per unit of the number
entry = "test_ledger:split"
inputs = ["numbers"]
outputs = ["items"]
fanout = true

[stages.stream]                # [r, a] -> [r, a, b]: two token streams per item
entry = "test_ledger:stream_tokens"
inputs = ["items"]
outputs = ["tokens"]
fanout = true

[stages.sum]                   # one group per token stream
entry = "test_ledger:SumTokens"
inputs = ["tokens"]
outputs = ["sums", "sums_fwd"]
stateful = true
aggregate_level = 3

[stages.count]                 # one group per item: how many streams were summed
entry = "alto.aggregate:Count"
inputs = ["sums_fwd"]
outputs = ["counts"]
stateful = true
aggregate_level = 2
options = { output = "counts", output_field = "count" }
"""

ITEM_PAUSE = 1.0  # virtual seconds between two items of one request
TOKEN_PAUSE = 0.01


async def split(msg: Number, ctx: Context) -> None:
    for a in range(msg.value):
        await ctx.write("items", Item(value=a + 1))
        await anyio.sleep(ITEM_PAUSE)


async def stream_tokens(msg: Item, ctx: Context) -> None:
    # stream b has value + b tokens, valued 0, 1, 2, ...: an LM emitting tokens
    for b in range(2):
        async with ctx.child() as child:
            for j in range(msg.value + b):
                await child.write("tokens", Square(value=j))
                await anyio.sleep(TOKEN_PAUSE)


class SumTokens:
    def __init__(self) -> None:
        self.open: dict[tuple[int, ...], tuple[int, int]] = {}
        self.closed: set[tuple[int, ...]] = set()

    async def process(self, msg: Square, ctx: Context) -> None:
        assert len(ctx.key_path) == 3 and ctx.group == ctx.key_path
        assert ctx.group not in self.closed, f"item for {ctx.group} after its group closed"
        s, c = self.open.get(ctx.group, (0, 0))
        self.open[ctx.group] = (s + msg.value, c + 1)

    async def group_closed(self, ctx: Context) -> None:
        assert ctx.key_path not in self.closed, f"{ctx.key_path} closed twice"
        self.closed.add(ctx.key_path)
        s, c = self.open.pop(ctx.key_path)
        total = Total(total=s, count=c, instance=ctx.instance)
        await ctx.write("sums", total)
        await ctx.write("sums_fwd", total)


def stream_sum(n_tokens: int) -> int:
    return n_tokens * (n_tokens - 1) // 2


async def test_groups_close_per_child_stream_three_levels_deep(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    values = [1, 3, 4, 6, 2]
    seen: dict[int, list[tuple[float, alto.Result]]] = {}
    async with open_pipeline(
        write(tmp_path, LEVELS, "levels.toml"), instances={"stream": 2, "sum": 2, "count": 2}
    ) as p:
        t0 = trio.current_time()

        async def one(i: int) -> None:
            seen[i] = [
                (trio.current_time() - t0, r) async for r in p.submit(Number(value=values[i]))
            ]

        async with trio.open_nursery() as n:
            for i in range(len(values)):
                n.start_soon(one, i)
        assert trio.current_time() - t0 == pytest.approx(max(values) * ITEM_PAUSE)
        stats = p.runtime.statistics()
        assert stats.requests_in_flight == 0
        assert all(i.queue_depth == 0 and i.open_groups == 0 for i in stats.instances)
        assert all(not groups for groups in p.runtime.pinned_groups().values())
        sum_ids = set({s.name: s.instances for s in stats.stages}["sum"])

    summed_by: set[int] = set()
    for i, n_items in enumerate(values):
        rs = seen[i]
        rid = rs[0][1].request_id
        sums = {r.key_path: (t, r.message) for t, r in rs if r.queue == "sums"}
        counts = {r.key_path: (t, r.message) for t, r in rs if r.queue == "counts"}
        # every level-3 group (item a, stream b) exactly once, with its own tokens only
        assert len(sums) == len([r for _, r in rs if r.queue == "sums"]) == 2 * n_items
        assert set(sums) == {(rid, a, b) for a in range(n_items) for b in range(2)}
        for (_, a, b), (t, total) in sums.items():
            assert isinstance(total, Total)
            n_tokens = a + 1 + b
            assert (total.total, total.count) == (stream_sum(n_tokens), n_tokens)
            summed_by.add(total.instance)
            # closed by its stream's CLOSE, while item a was current: not at the request's end
            assert a * ITEM_PAUSE < t < (a + 1) * ITEM_PAUSE, (a, b, t)
        for a in range(n_items):
            # stream 0 closed with its own CLOSE frame, before stream 1 of the same item ended
            assert sums[(rid, a, 0)][0] < sums[(rid, a, 1)][0]
        # every level-2 group once, closed once both of its streams were summed
        assert set(counts) == {(rid, a) for a in range(n_items)}
        for (_, a), (t, c) in counts.items():
            assert isinstance(c, Total) and c.count == 2
            assert max(sums[(rid, a, b)][0] for b in range(2)) <= t < (a + 1) * ITEM_PAUSE
    assert summed_by == sum_ids  # both aggregator instances took groups


async def test_the_demo_pipeline_closes_every_group_it_opens(tmp_path: Path) -> None:
    async with open_pipeline(demo_pipeline(tmp_path), instances={"total": 2}) as p:
        with trio.fail_after(TIMEOUT):
            results = [await p.run(Number(value=v)) for v in (3, 0, 5)]
        assert [
            [r.message.total for r in rs if isinstance(r.message, Total)] for rs in results
        ] == [[5], [], [30]]
        assert all(not groups for groups in p.runtime.pinned_groups().values())
        assert p.runtime.statistics().requests_completed == 3
