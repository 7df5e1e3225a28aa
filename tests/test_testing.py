"""``alto.testing.open_pipeline``: whole pipelines in the test's own Trio run.

The real runtime relays between real workers over socketpairs, so these tests exercise the
routing and group-closing logic end to end without a process. Timed stages run under
pytest-trio's ``autojump_clock``: their sleeps cost virtual time only. The runtime's own
tests (its relay, ledger, supervisor and connections, with hand-played peers) are in
``tests/runtime/``.

The stages used here are defined in this module and referenced as ``test_testing:<name>``:
pytest's default import mode puts this directory on ``sys.path``.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import trio
import trio.testing

import alto
from alto._stage import Context
from alto.dataplane import InstanceState
from alto.examples.demo_pb2 import Item, Number, Square, Total
from alto.testing import InProcessPipeline, open_pipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"


def demo_copy(tmp_path: Path, delay: float) -> Path:
    text = DEMO.read_text()
    assert "options = { delay = 0.05 }" in text
    p = tmp_path / "demo.toml"
    p.write_text(text.replace("options = { delay = 0.05 }", f"options = {{ delay = {delay} }}"))
    return p


def expected(n: int) -> int:
    return sum(i * i for i in range(n))


def check_demo(n: int, results: list[alto.Result]) -> None:
    totals = [r.message for r in results if r.queue == "totals"]
    assert len(totals) == 1, totals  # a split group would emit two partial totals
    assert isinstance(totals[0], Total)
    assert (totals[0].total, totals[0].count) == (expected(n), n)
    partials = [r for r in results if r.queue == "partials"]
    assert sorted(r.key_path[1] for r in partials) == list(range(n))  # each item exactly once
    assert results[-1].queue == "totals"  # the aggregate comes after every item


def assert_idle(p: InProcessPipeline) -> None:
    stats = p.runtime.statistics()
    assert stats.requests_in_flight == 0
    assert all(
        i.queue_depth == 0 and i.open_groups == 0 and i.backlog == 0 for i in stats.instances
    )
    assert all(not groups for groups in p.runtime.pinned_groups().values())


# ---------------------------------------------------------------- the demo pipeline


async def test_demo_with_concurrent_requests(tmp_path: Path) -> None:
    values = [(i * 7) % 13 + 1 for i in range(50)]
    results: dict[int, list[alto.Result]] = {}
    async with open_pipeline(demo_copy(tmp_path, 0), instances={"square": 3, "total": 2}) as p:

        async def one(i: int) -> None:
            results[i] = await p.run(Number(value=values[i]))

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for i in range(len(values)):
                    n.start_soon(one, i)
        for i, v in enumerate(values):
            check_demo(v, results[i])
        stats = p.runtime.statistics()
        assert stats.requests_completed == 50 and stats.requests_failed == 0
        assert_idle(p)
    squared_by = collections.Counter(
        r.message.instance for rs in results.values() for r in rs if isinstance(r.message, Square)
    )
    square_ids = {s.name: s.instances for s in stats.stages}["square"]
    assert set(squared_by) == set(square_ids)  # every instance took stateless work
    summed_by = {
        r.message.instance for rs in results.values() for r in rs if isinstance(r.message, Total)
    }
    assert summed_by == set({s.name: s.instances for s in stats.stages}["total"])


async def test_demo_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    # The shipped file, generate's 0.05 s pause included: 20 requests of 10 items take
    # 10 pauses of virtual time, all at once, and no real time to speak of.
    async with open_pipeline(DEMO, instances={"square": 2, "total": 2}) as p:
        t0 = trio.current_time()
        results: list[list[alto.Result]] = []

        async def one() -> None:
            results.append(await p.run(Number(value=10)))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        assert trio.current_time() - t0 == pytest.approx(10 * 0.05)
        assert len(results) == 20
        for rs in results:
            check_demo(10, rs)
        assert_idle(p)


async def test_results_stream_while_the_request_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pipeline(DEMO) as p:
        t0 = trio.current_time()
        seen: list[tuple[float, str]] = []
        async for r in p.submit(Number(value=4)):
            seen.append((trio.current_time() - t0, r.queue))
    # item i is squared at i * 0.05 s; the total comes once generate has finished
    assert [round(t, 6) for t, q in seen if q == "partials"] == [0.0, 0.05, 0.1, 0.15]
    assert seen[-1][1] == "totals" and seen[-1][0] == pytest.approx(0.2)


async def test_small_credits_still_deliver_everything(tmp_path: Path) -> None:
    async with open_pipeline(demo_copy(tmp_path, 0), credits=1) as p:
        with trio.fail_after(10):
            check_demo(40, await p.run(Number(value=40)))
        assert {i.credits for i in p.runtime.statistics().instances} == {1}
        assert_idle(p)


# ---------------------------------------------------------------- errors


async def fail_on_three(msg: Item, ctx: Context) -> None:
    if msg.value == 3:
        raise RuntimeError("three is not allowed")
    sq = Square(value=msg.value * msg.value, instance=ctx.instance)
    await ctx.write("squares", sq)
    await ctx.write("partials", sq)


async def test_a_failing_stage_fails_only_its_request(tmp_path: Path) -> None:
    text = (
        demo_copy(tmp_path, 0)
        .read_text()
        .replace("alto.examples.demo:square", "test_testing:fail_on_three")
    )
    (tmp_path / "failing.toml").write_text(text)
    async with open_pipeline(tmp_path / "failing.toml") as p:
        with pytest.raises(alto.RequestFailed) as err:
            await p.run(Number(value=5))
        assert "stage 'square' instance" in str(err.value)
        assert "RuntimeError: three is not allowed" in str(err.value)
        check_demo(3, await p.run(Number(value=3)))  # the pipeline goes on
        stats = p.runtime.statistics()
        assert (stats.requests_failed, stats.requests_completed) == (1, 1)


async def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(
        alto.ConfigError, match=r"no such stage .*; stages: generate, square, total"
    ) as err:
        async with open_pipeline(DEMO, instances={"squares": 2}):
            pass  # pragma: no cover
    assert err.value.key == "instances.squares"
    with pytest.raises(alto.ConfigError, match="must be an integer >= 1, got 0"):
        async with open_pipeline(DEMO, instances={"square": 0}):
            pass  # pragma: no cover
    with pytest.raises(alto.ConfigError, match="credits"):
        async with open_pipeline(DEMO, credits=0):
            pass  # pragma: no cover
    with pytest.raises(alto.ConfigError, match="file not found"):
        async with open_pipeline(tmp_path / "missing.toml"):
            pass  # pragma: no cover
    bad = tmp_path / "bad.toml"
    bad.write_text(
        DEMO.read_text().replace("options = { delay = 0.05 }", "options = { pause = 1 }")
    )
    with pytest.raises(alto.StageError, match="cannot build Generate from options"):
        async with open_pipeline(bad):
            pass  # pragma: no cover


# ---------------------------------------------------------------- lifecycle


async def test_leaving_with_requests_in_flight_cancels_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_pipeline(DEMO) as p:
        with trio.move_on_after(1):  # generate needs 50 s for this one
            await p.run(Number(value=1000))
        # The caller gave up: the client cancelled the request (nobody waits for it).
        with trio.fail_after(5):
            while p.runtime.statistics().requests_cancelled != 1:
                await trio.sleep(0.01)
        assert p.runtime.statistics().requests_in_flight == 0
        runtime = p.runtime
    # everything was cancelled: the instances saw the runtime go (a quiet stop, no crash)
    assert all(i.state == InstanceState.STOPPED for i in runtime.instances.values())


LIFECYCLE: list[tuple[str, int]] = []


class Recorder:
    """A square stage that records its setup and aclose calls."""

    fail_setup = False

    async def setup(self) -> None:
        if Recorder.fail_setup:
            raise RuntimeError("model file missing")
        LIFECYCLE.append(("setup", id(self)))

    async def process(self, msg: Item, ctx: Context) -> None:
        await fail_on_three(msg, ctx)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()  # runs although the pipeline is being cancelled
        LIFECYCLE.append(("aclose", id(self)))


async def test_setup_and_aclose_run_once_per_instance(tmp_path: Path) -> None:
    text = (
        demo_copy(tmp_path, 0)
        .read_text()
        .replace("alto.examples.demo:square", "test_testing:Recorder")
    )
    (tmp_path / "rec.toml").write_text(text)
    LIFECYCLE.clear()
    async with open_pipeline(tmp_path / "rec.toml", instances={"square": 2}) as p:
        assert [k for k, _ in LIFECYCLE] == ["setup", "setup"]
        check_demo(2, await p.run(Number(value=2)))
    assert sorted(k for k, _ in LIFECYCLE) == ["aclose", "aclose", "setup", "setup"]
    assert {o for k, o in LIFECYCLE if k == "setup"} == {o for k, o in LIFECYCLE if k == "aclose"}


async def test_a_failing_setup_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        demo_copy(tmp_path, 0)
        .read_text()
        .replace("alto.examples.demo:square", "test_testing:Recorder")
    )
    (tmp_path / "rec.toml").write_text(text)
    monkeypatch.setattr(Recorder, "fail_setup", True)
    with pytest.raises(ExceptionGroup) as err:
        async with open_pipeline(tmp_path / "rec.toml"):
            pass  # pragma: no cover
    # The worker's own exception, or the runtime's report of the failed start naming it.
    assert err.group_contains(RuntimeError, match="model file missing", depth=None) or (
        err.group_contains(
            alto.AltoError, match="setup failed: RuntimeError: model file missing", depth=None
        )
    )


async def test_scale_and_drain_in_process(tmp_path: Path) -> None:
    async with open_pipeline(demo_copy(tmp_path, 0)) as p:
        await p.runtime.scale("square", 3)
        await p.wait_ready()
        squares = [i for i in p.runtime.statistics().instances if i.stage == "square"]
        assert [i.state for i in squares] == [InstanceState.READY] * 3
        with trio.fail_after(10):
            check_demo(30, await p.run(Number(value=30)))
        first = squares[0].instance_id
        await p.runtime.drain(first)
        with trio.fail_after(10):
            while p.runtime.instances[first].state != InstanceState.STOPPED:
                await trio.testing.wait_all_tasks_blocked()
                await trio.lowlevel.checkpoint()
            check_demo(30, await p.run(Number(value=30)))
        assert_idle(p)
