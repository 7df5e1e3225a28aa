"""Idempotent stages: a crashed instance costs no request that had produced no output.

A stateless stage declared ``idempotent = true`` squares numbers slowly (0.3 s, many inputs
at once). 120 concurrent requests are all held by its instances (processing, nothing
written: the stage writes only once a gate file exists), one instance is SIGKILLed, then
the gate opens. Every request must end with its exact result, once: the inputs the dead
instance held are retried on the other instance, or, when there is none, on the
replacement the supervisor starts (the retries wait for it to register).

Only inputs that already produced part of their output fail: a stage that writes a first
output and then waits loses exactly the requests whose first output came from the killed
instance, each with an error naming the stage and the instance; every other request
completes. Real processes and sockets throughout (``alto.testing.open_server``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import trio

import alto
from alto.examples.demo_pb2 import Number, Square
from alto.testing import open_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 120
PROCESSING_S = 0.3


async def _wait_for_gate() -> None:
    gate = Path(os.environ["ALTO_TEST_GATE"])
    while not gate.exists():
        await anyio.sleep(0.02)


async def slow_square(msg: Number, ctx: alto.Context) -> None:
    """Slow, and writes nothing before the gate opens: a crash before then loses no output."""
    await anyio.sleep(PROCESSING_S)
    await _wait_for_gate()
    await ctx.write("results", Square(value=msg.value * msg.value, instance=ctx.instance))


async def odd_ones_write_first(msg: Number, ctx: alto.Context) -> None:
    """Odd numbers write a first output at once (value -1, naming the instance), then the
    square once the gate opens; even numbers only the square."""
    if msg.value % 2:
        await ctx.write("results", Square(value=-1, instance=ctx.instance))
    await anyio.sleep(PROCESSING_S)
    await _wait_for_gate()
    await ctx.write("results", Square(value=msg.value * msg.value, instance=ctx.instance))


PIPELINE = """
[pipeline]
name = "NAME"
input = "numbers"
outputs = ["results"]

[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.results]
type = "alto.examples.demo_pb2:Square"

[stages.slow]
entry = "test_idempotent:ENTRY"
inputs = ["numbers"]
outputs = ["results"]
idempotent = true
concurrency = 128
"""


@dataclass
class Outcome:
    results: list[Square] = field(default_factory=list)
    error: str | None = None
    done: bool = False


@asynccontextmanager
async def serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, instances: int
) -> AsyncIterator[tuple[alto.ServeInfo, Path]]:
    gate = tmp_path / "gate"  # closed: nothing is written until the test opens it
    monkeypatch.setenv("ALTO_TEST_GATE", str(gate))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    )
    pipeline = tmp_path / "pipeline.toml"
    name = f"idempotent-{os.getpid()}-{tmp_path.name[-12:]}"
    pipeline.write_text(PIPELINE.replace("NAME", name).replace("ENTRY", entry))
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(f"[runtime]\nstop_timeout = 2.0\n[stages.slow]\ninstances = {instances}\n")
    with trio.fail_after(120):
        async with open_server(pipeline, deploy) as info:
            yield info, gate


async def submit_all(
    info: alto.ServeInfo, nursery: trio.Nursery, outcomes: dict[int, Outcome]
) -> None:
    """Submit 0..REQUESTS-1 at once over one client connection; each outcome is filled in
    as its results arrive."""
    client = await nursery.start(_client, info)

    async def one(n: int) -> None:
        outcome = outcomes[n]
        try:
            async for result in client.submit(Number(value=n)):
                assert isinstance(result.message, Square)
                outcome.results.append(result.message)
        except alto.RequestFailed as exc:
            outcome.error = str(exc)
        else:
            outcome.done = True

    for n in range(REQUESTS):
        outcomes[n] = Outcome()
        nursery.start_soon(one, n)


async def _client(info: alto.ServeInfo, task_status: trio.TaskStatus[alto.Client]) -> None:
    async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def until(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def held(info: alto.ServeInfo) -> dict[int, int]:
    """Inputs each live instance of the stage holds (dispatched, not acknowledged)."""
    return {
        i.instance_id: i.queue_depth
        for i in info.runtime.statistics().instances
        if i.stage == "slow" and str(i.state) == "ready"
    }


async def kill_one_holding_work(
    info: alto.ServeInfo, ready: Callable[[int], bool] = lambda victim: True
) -> tuple[int, int]:
    """Once every request's input is held by an instance, SIGKILL the one that holds most
    (once ``ready(its id)``); return its id and how many inputs it held."""
    await until(lambda: sum(held(info).values()) == REQUESTS, "every input to be dispatched")
    victim_id, count = max(held(info).items(), key=lambda item: item[1])
    assert count > 0
    await until(lambda: ready(victim_id), "the victim to be ready to die")
    victim = next(i for i in info.runtime.statistics().instances if i.instance_id == victim_id)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    await until(
        lambda: any(
            i.instance_id == victim_id and str(i.state) == "crashed"
            for i in info.runtime.statistics().instances
        ),
        "the runtime to notice the crash",
    )
    return victim_id, count


@pytest.mark.parametrize("instances", [2, 1], ids=["another-instance", "the-replacement"])
async def test_a_killed_instance_costs_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instances: int
) -> None:
    outcomes: dict[int, Outcome] = {}
    async with serving(tmp_path, monkeypatch, "slow_square", instances) as (info, gate):
        async with trio.open_nursery() as requests:
            await submit_all(info, requests, outcomes)
            victim, count = await kill_one_holding_work(info)
            gate.touch()
            await until(lambda: all(o.done or o.error for o in outcomes.values()), "every request")
            requests.cancel_scope.cancel()
        stats = info.runtime.statistics()
    failed = {n: o.error for n, o in outcomes.items() if o.error}
    assert not failed, failed
    for n, outcome in outcomes.items():
        assert [r.value for r in outcome.results] == [n * n], (n, outcome.results)
        assert all(r.instance != victim for r in outcome.results), (n, outcome.results)
    assert stats.frames_retried == count
    assert stats.requests_failed == 0 and stats.requests_completed >= REQUESTS
    if instances == 1:
        # Nothing else could take them: they waited for the replacement.
        assert count == REQUESTS and stats.restarts == 1


async def test_only_inputs_that_produced_output_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes: dict[int, Outcome] = {}
    async with serving(tmp_path, monkeypatch, "odd_ones_write_first", 2) as (info, gate):
        async with trio.open_nursery() as requests:
            await submit_all(info, requests, outcomes)

            def wrote_first(victim: int) -> bool:
                # A first output of the victim reached the client: at least one request
                # has produced part of its output there (so the test shows one failing).
                return any(o.results and o.results[0].instance == victim for o in outcomes.values())

            victim, count = await kill_one_holding_work(info, wrote_first)
            gate.touch()
            await until(lambda: all(o.done or o.error for o in outcomes.values()), "every request")
            requests.cancel_scope.cancel()
        stats = info.runtime.statistics()
    lost = 0
    for n, outcome in outcomes.items():
        first = outcome.results[0] if outcome.results else None
        if n % 2 and first is not None and first.instance == victim:
            # It had written part of its output: a retry would write it again.
            lost += 1
            assert outcome.error is not None, (n, outcome)
            assert f"stage 'slow' instance {victim} crashed" in outcome.error, outcome.error
            assert [r.value for r in outcome.results] == [-1], (n, outcome.results)
        else:
            assert outcome.done, (n, outcome.error)
            expected = [-1, n * n] if n % 2 else [n * n]
            assert [r.value for r in outcome.results] == expected, (n, outcome.results)
    assert lost > 0, "the killed instance held no odd number"
    assert stats.requests_failed == lost
    assert stats.frames_retried == count - lost  # the even ones it held
