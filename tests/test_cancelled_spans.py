"""The trace of a cancelled request keeps the spans of the inputs that were running when
it was cancelled: the instances report them (status ``cancelled``) after the request has
ended, and the runtime still files them under its trace. Benchmarks read the work a
request cost after it was abandoned from these spans (``benchmarks/abandon.py``).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from alto.examples.demo_pb2 import Number
from alto.testing import open_pipeline

ROOT = Path(__file__).resolve().parents[1]


async def test_spans_reported_after_a_cancellation_join_the_trace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    text = (ROOT / "configs" / "demo.toml").read_text()
    demo = tmp_path / "demo.toml"
    demo.write_text(text.replace("options = { delay = 0.05 }", "options = { delay = 0.5 }"))
    async with open_pipeline(demo) as p:
        rid = 0
        async for r in p.submit(Number(value=5)):
            rid = r.request_id
            break  # abandoned while `generate` is still writing items
        with trio.fail_after(30):
            while True:
                stats = p.runtime.statistics()
                if not stats.requests_in_flight and not any(
                    i.queue_depth or i.credits_in_use for i in stats.instances
                ):
                    break
                await trio.sleep(0.05)
        timeline = p.runtime.request_timeline(rid)
    assert timeline is not None and timeline["state"] == "cancelled"
    spans = {(s["stage"], s["status"]) for s in timeline["trace"]["spans"]}
    # `generate` was running when the request ended: its span came afterwards.
    assert ("generate", "cancelled") in spans
    gen = next(s for s in timeline["trace"]["spans"] if s["stage"] == "generate")
    assert 1 <= gen["outputs"] < 5
