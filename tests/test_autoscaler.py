"""Autoscaling per stage: the decision rule alone (no I/O), the deployment keys, and a
step load through a real in-process pipeline under trio's autojump clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import alto
from alto._config import AutoscaleConfig
from alto.dataplane._autoscaler import Autoscaler
from alto.dataplane._supervisor import ScaleConflict
from alto.examples.demo_pb2 import Item, Number
from alto.testing import open_pipeline

ROOT = Path(__file__).resolve().parents[1]


def decider(**kw: float) -> Autoscaler:
    policy = AutoscaleConfig(
        int(kw.pop("min", 1)), int(kw.pop("max", 8)), **kw
    )  # target 4, up 2 s, down 30 s unless given
    return Autoscaler({"s": policy}, {})


def test_scales_up_only_after_the_up_delay_to_the_lowest_count_wanted() -> None:
    a = decider()
    assert a.decide("s", 0.0, 1, 20) is None  # wants 5; the delay starts
    assert a.decide("s", 1.0, 1, 12) is None  # wants 3
    target, reason = a.decide("s", 2.0, 1, 40) or (0, "")  # 2 s of wanting more
    assert target == 3 and "above the target" in reason  # the lowest count wanted meanwhile


def test_a_burst_shorter_than_the_delay_costs_nothing() -> None:
    a = decider()
    assert a.decide("s", 0.0, 2, 40) is None
    assert a.decide("s", 1.0, 2, 4) is None  # back under: the up delay resets
    assert a.decide("s", 2.5, 2, 40) is None  # wants more again: a new delay starts
    decision = a.decide("s", 4.5, 2, 40)
    assert decision is not None and decision[0] == 8


def test_scales_down_after_the_down_delay_to_the_highest_count_wanted() -> None:
    a = decider(down_delay=10)
    assert a.decide("s", 0.0, 6, 0) is None  # wants 1
    assert a.decide("s", 5.0, 6, 14) is None  # wants 4: remembered
    target, reason = a.decide("s", 10.0, 6, 0) or (0, "")
    assert target == 4 and "below the target" in reason
    assert a.decide("s", 11.0, 4, 16) is None  # just right: nothing to do


def test_never_outside_min_and_max() -> None:
    a = decider(min=2, max=3, up_delay=0.5)
    assert a.decide("s", 0.0, 1, 0) == (2, "outside its autoscale range 2..3")
    assert a.decide("s", 1.0, 3, 1000) is None  # wants more than max: stays at 3
    assert a.decide("s", 2.0, 5, 1000) == (3, "outside its autoscale range 2..3")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("min = 3\nmax = 2", "must be >= min"),
        ("min = 0", "must be >= 1"),
        ("max = 100000", "at most"),
        ("target_queue_depth = 0", "target_queue_depth"),
        ("up_delay = -1", "positive number of seconds"),
        ("bogus = 1", "unknown key"),
        ("min = 4\nmax = 6", "outside the autoscale range"),
    ],
)
def test_bad_autoscale_tables_are_config_errors(tmp_path: Path, table: str, message: str) -> None:
    d = tmp_path / "d.toml"
    d.write_text(f"[stages.square]\ninstances = 2\n[stages.square.autoscale]\n{table}\n")
    with pytest.raises(alto.ConfigError, match=message):
        alto.load_deployment(d, alto.load_pipeline(ROOT / "configs" / "demo.toml"))


async def test_a_step_load_scales_a_stage_up_and_back_down(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pipeline = tmp_path / "demo.toml"
    text = (ROOT / "configs" / "demo.toml").read_text()
    pipeline.write_text(text.replace("options = { delay = 0.05 }", "options = { delay = 0 }"))
    deploy = tmp_path / "d.toml"
    deploy.write_text(
        "[runtime]\ncredits = 4\n"
        "[stages.square]\ninstances = 1\n"
        "[stages.square.autoscale]\nmin = 1\nmax = 4\ntarget_queue_depth = 2\n"
        "up_delay = 1.0\ndown_delay = 5.0\n"
    )
    # Each square takes 0.5 s of (virtual) time, so a burst of items queues.
    import alto.examples.demo as demo

    original = demo.square

    async def slow_square(msg: Item, ctx: alto.Context) -> None:
        await trio.sleep(0.5)
        await original(msg, ctx)

    demo.square = slow_square
    try:
        async with open_pipeline(pipeline, deployment=deploy) as p:
            counts: list[int] = []

            async def sample() -> None:
                while True:
                    stats = p.runtime.statistics()
                    counts.append(
                        sum(
                            1 for i in stats.instances if i.stage == "square" and i.state == "ready"
                        )
                    )
                    await trio.sleep(0.25)

            async with trio.open_nursery() as n:
                n.start_soon(sample)
                async with trio.open_nursery() as load:
                    for _ in range(6):
                        load.start_soon(p.run, Number(value=8))
                grew = max(counts)
                await trio.sleep(15)  # idle past the down delay (twice: it may step down twice)
                n.cancel_scope.cancel()
            assert grew >= 3  # 48 items of 0.5 s: the stage grew
            assert counts[-1] == 1  # and came back to min when idle
            log = p.runtime.statistics().scale_log
            assert [e.by for e in log] == ["autoscaler"] * len(log)
            assert log[0].to_instances > log[0].from_instances
            assert log[-1].to_instances < log[-1].from_instances
            stage = next(s for s in p.runtime.statistics().stages if s.name == "square")
            assert stage.autoscale == (1, 4)
            # An operator's scale of an autoscaled stage is refused, naming the range.
            with pytest.raises(ScaleConflict, match="autoscaled between 1 and 4"):
                await p.runtime.scale("square", 3)
    finally:
        demo.square = original
