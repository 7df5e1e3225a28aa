"""End to end with real processes over real UNIX sockets: the demo pipeline.

generate (fan-out) -> square (stateless, 3 instances) -> total (stateful Sum, level 1, 2
instances). Every request's total must equal the value computed without alto, exactly one
total per request (a split group would emit two partial totals), no result lost or
duplicated, and stateless work spread over all square instances.
"""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
import trio

import alto
from alto.dataplane import InstanceState
from alto.examples.demo_pb2 import Number, Square, Total
from alto.testing import open_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def write_pipeline(
    tmp_path: Path,
    *,
    delay: float = 0.0,
    square_entry: str = "alto.examples.demo:square",
    generate_instances: int = 2,
    square_instances: int = 3,
    total_instances: int = 2,
    credits: int = 64,
    max_inflight: int = 1024,
) -> tuple[Path, Path]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace("options = { delay = 0.05 }", f"options = {{ delay = {delay} }}")
    text = text.replace('entry = "alto.examples.demo:square"', f'entry = "{square_entry}"')
    text = text.replace('name = "demo"', f'name = "demo-{os.getpid()}-{tmp_path.name[-20:]}"')
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    d = tmp_path / "deploy.toml"
    d.write_text(
        f"[runtime]\ncredits = {credits}\nmax_inflight_requests = {max_inflight}\nstop_timeout = 2.0\n"
        f"[stages.generate]\ninstances = {generate_instances}\n"
        f"[stages.square]\ninstances = {square_instances}\n"
        f"[stages.total]\ninstances = {total_instances}\n"
    )
    return p, d


def expected(n: int) -> int:
    return sum(i * i for i in range(n))


async def run_many(
    info: alto.ServeInfo,
    values: list[int],
    results: dict[int, list[alto.Result]],
    errors: dict[int, str],
) -> None:
    async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:

        async def one(i: int, v: int) -> None:
            try:
                results[i] = await client.run(Number(value=v))
            except alto.AltoError as exc:
                errors[i] = str(exc)

        async with trio.open_nursery() as n:
            for i, v in enumerate(values):
                n.start_soon(one, i, v)


def check_results(
    values: list[int], results: dict[int, list[alto.Result]]
) -> collections.Counter[int]:
    squares_by_instance: collections.Counter[int] = collections.Counter()
    for i, v in enumerate(values):
        rs = results[i]
        totals = [r.message for r in rs if r.queue == "totals"]
        partials = [r for r in rs if r.queue == "partials"]
        assert len(totals) == 1, (
            f"request {i}: {len(totals)} totals (a split group emits more than one)"
        )
        t = totals[0]
        assert isinstance(t, Total)
        assert t.total == expected(v) and t.count == v, (i, v, t)
        # each item exactly once: key paths [rid, child] with children 0..v-1
        children = sorted(r.key_path[1] for r in partials)
        assert children == list(range(v)), (i, children)
        assert sorted(r.message.value for r in partials if isinstance(r.message, Square)) == sorted(
            x * x for x in range(v)
        )
        for r in partials:
            assert isinstance(r.message, Square)
            squares_by_instance[r.message.instance] += 1
        # the total is the last thing a request returns
        assert rs[-1].queue == "totals"
    return squares_by_instance


async def test_demo_pipeline_under_concurrency(tmp_path: Path) -> None:
    pipeline, deploy = write_pipeline(tmp_path)
    values = [(i * 7) % 23 + 1 for i in range(240)]
    results: dict[int, list[alto.Result]] = {}
    errors: dict[int, str] = {}
    async with open_server(pipeline, deploy) as info:
        with trio.fail_after(120):
            await run_many(info, values, results, errors)
        stats = info.runtime.statistics()
    assert not errors
    spread = check_results(values, results)
    square_ids = {s.name: s.instances for s in stats.stages}["square"]
    assert set(spread) == set(square_ids), spread
    total_items = sum(values)
    for iid in square_ids:  # least-outstanding spreads the work
        assert spread[iid] > total_items / len(square_ids) / 4, spread
    assert stats.requests_completed == len(values)
    assert stats.requests_in_flight == 0
    assert all(i.queue_depth == 0 and i.open_groups == 0 for i in stats.instances)
    totals_by_instance = {s.name: s for s in stats.stages}["total"]
    assert totals_by_instance.frames_processed > 0


async def test_scale_aggregator_while_requests_in_flight(tmp_path: Path) -> None:
    """Add one aggregator instance and remove one while requests stream (invariant 1)."""
    pipeline, deploy = write_pipeline(tmp_path, delay=0.01)
    values = [(i * 5) % 17 + 3 for i in range(200)]
    results: dict[int, list[alto.Result]] = {}
    errors: dict[int, str] = {}
    async with open_server(pipeline, deploy) as info:
        rt = info.runtime
        first_total_ids = list({s.name: s for s in rt.statistics().stages}["total"].instances)
        async with trio.open_nursery() as load:
            load.start_soon(run_many, info, values, results, errors)
            with trio.fail_after(60):
                while sum(len(g) for g in rt.pinned_groups().values()) < 10:
                    await trio.sleep(0.01)
            pinned_before = dict(rt.pinned_groups()["total"])
            await rt.scale("total", 3)
            with trio.fail_after(60):
                while (
                    len(
                        [
                            i
                            for i in rt.statistics().instances
                            if i.stage == "total" and i.state == "ready"
                        ]
                    )
                    < 3
                ):
                    await trio.sleep(0.02)
            # groups opened before the scale-up stay where they were
            now = rt.pinned_groups()["total"]
            for key, iid in pinned_before.items():
                if key in now:
                    assert now[key] == iid
            await rt.drain(first_total_ids[0])
            with trio.fail_after(120):
                while len(results) + len(errors) < len(values):
                    await trio.sleep(0.05)
        with trio.fail_after(30):
            while any(i.state == "draining" for i in rt.statistics().instances):
                await trio.sleep(0.05)
        stats = rt.statistics()
    assert not errors, list(errors.values())[:3]
    check_results(values, results)
    states = {i.instance_id: i.state for i in stats.instances}
    assert states[first_total_ids[0]] == "stopped"
    totals_seen = {
        r.message.instance for rs in results.values() for r in rs if isinstance(r.message, Total)
    }
    assert len(totals_seen) >= 2
    assert stats.scale_events == 2


async def failing_square(msg: object, ctx: alto.Context) -> None:
    # Requests are sent one after another, so request ids are 1, 2, 3, 4 in order.
    value = getattr(msg, "value", 0)
    if value == 3 and ctx.request_id == 2:
        raise RuntimeError("three is not allowed")
    if value == 5 and ctx.request_id == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash, not an exception
    await ctx.write("squares", Square(value=value * value, instance=ctx.instance))
    await ctx.write("partials", Square(value=value * value, instance=ctx.instance))


async def test_stage_error_and_crash_fail_only_their_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, deploy = write_pipeline(
        tmp_path, square_entry="test_e2e:failing_square", generate_instances=1
    )
    # the workers import this module
    monkeypatch.setenv(
        "PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    async with open_server(pipeline, deploy) as info:
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
            ok = await client.run(Number(value=3))  # items 0, 1, 2: fine
            assert [r.message.total for r in ok if isinstance(r.message, Total)] == [5]
            with pytest.raises(alto.RequestFailed) as err:
                await client.run(Number(value=4))  # item 3 raises
            assert "stage 'square' instance" in str(err.value)
            assert "RuntimeError: three is not allowed" in str(err.value)
            with pytest.raises(alto.RequestFailed) as err:
                await client.run(Number(value=6))  # item 5 kills its instance
            assert "stage 'square' instance" in str(err.value) and "crashed" in str(err.value)
            ok = await client.run(Number(value=2))  # the runtime goes on
            assert [r.message.total for r in ok if isinstance(r.message, Total)] == [1]
        stats = info.runtime.statistics()
    crashed = [i for i in stats.instances if i.state == "crashed"]
    assert len(crashed) == 1 and crashed[0].stage == "square"
    assert stats.requests_failed == 2


async def crash_once_square(msg: object, ctx: alto.Context) -> None:
    """Dies (SIGKILL) the first time it sees the value 5, before writing anything."""
    value = getattr(msg, "value", 0)
    marker = Path(os.environ["ALTO_TEST_MARKER"])
    if value == 5:
        try:  # O_EXCL: exactly one instance, once, across processes
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    await ctx.write("squares", Square(value=value * value, instance=ctx.instance))
    await ctx.write("partials", Square(value=value * value, instance=ctx.instance))


async def test_idempotent_stage_retries_work_of_a_crashed_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, deploy = write_pipeline(
        tmp_path, square_entry="test_e2e:crash_once_square", generate_instances=1
    )
    text = pipeline.read_text().replace(
        'scheduler = "least-outstanding"', 'scheduler = "least-outstanding"\nidempotent = true', 1
    )
    pipeline.write_text(text)
    monkeypatch.setenv(
        "PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    monkeypatch.setenv("ALTO_TEST_MARKER", str(tmp_path / "crashed"))
    values = [8, 3, 6, 7, 2]
    results: dict[int, list[alto.Result]] = {}
    errors: dict[int, str] = {}
    async with open_server(pipeline, deploy) as info:
        with trio.fail_after(60):
            await run_many(info, values, results, errors)
        stats = info.runtime.statistics()
        retried = info.runtime.statistics().frames_retried
    assert (tmp_path / "crashed").exists()
    assert not errors, errors
    check_results(values, results)  # every request complete and exact despite the crash
    assert retried >= 1
    states = [i.state for i in stats.instances if i.stage == "square"]
    assert states.count(InstanceState.CRASHED) == 1


async def test_wrong_token_is_refused(tmp_path: Path) -> None:
    pipeline, deploy = write_pipeline(
        tmp_path, generate_instances=1, square_instances=1, total_instances=1
    )
    async with open_server(pipeline, deploy) as info:
        with pytest.raises(alto.AuthenticationError):
            async with alto.open_client(address="unix:" + info.socket_path, token="wrong"):
                pass


async def test_overload_is_refused_not_queued(tmp_path: Path) -> None:
    pipeline, deploy = write_pipeline(
        tmp_path,
        delay=0.2,
        generate_instances=1,
        square_instances=1,
        total_instances=1,
        max_inflight=2,
    )
    async with open_server(pipeline, deploy) as info:
        refused = 0
        done = 0
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:

            async def one() -> None:
                nonlocal refused, done
                try:
                    await client.run(Number(value=3))
                    done += 1
                except alto.OverloadedError:
                    refused += 1

            async with trio.open_nursery() as n:
                for _ in range(6):
                    n.start_soon(one)
        assert done >= 2 and refused >= 1 and done + refused == 6
        assert info.runtime.statistics().requests_refused == refused
