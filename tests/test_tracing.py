"""Request traces: hops recorded by the runtime, spans reported by the instances, the
timeline served, OpenTelemetry export checked span by span, and stage metrics.

The demo pipeline in-process (``generate`` fans a number out into items, ``square``
squares each item and streams it back, ``total`` sums a request's squares), under trio's
autojump clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from alto._config import RuntimeLimits
from alto.dataplane._otel import JsonLinesSpanExporter, OTelExport
from alto.dataplane._tracing import parse_traceparent
from alto.examples.demo_pb2 import Number
from alto.testing import open_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    text = (ROOT / "configs" / "demo.toml").read_text()
    p = tmp_path / "demo.toml"
    p.write_text(text.replace("options = { delay = 0.05 }", "options = { delay = 0.1 }"))
    return p


async def test_a_trace_records_every_hop_and_every_span(
    demo: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(demo, instances={"square": 2}) as p:
        results = await p.run(Number(value=3))
        rid = results[0].request_id
        timeline = p.runtime.request_timeline(rid)
    assert timeline is not None and timeline["state"] == "done"
    assert timeline["results"] == len(results) == 4  # 3 partials and the total
    trace = timeline["trace"]
    hops = [(h["from"], h["queue"], h["to"], tuple(h["key_path"])) for h in trace["hops"]]
    assert hops[0] == ("ingress", "numbers", "generate", (rid,))
    items = [h for h in hops if h[1] == "items"]
    assert sorted(h[3] for h in items) == [(rid, 0), (rid, 1), (rid, 2)]
    assert sum(1 for h in hops if h[1] == "squares" and h[2] == "total") == 3
    assert sum(1 for h in hops if h[1] == "partials" and h[2] == "sink") == 3
    assert [h for h in hops if h[0] == "runtime"] == [("runtime", "", "total", (rid,))]
    assert [h for h in hops if h[1] == "totals"] == [("total", "totals", "sink", (rid,))]
    # Hop times only grow along a key path: an item reaches `square` after it left
    # `generate`, and each square reaches the sink after its item reached `square`.
    times = {(h["queue"], tuple(h["key_path"])): h["t"] for h in trace["hops"]}
    for c in range(3):
        assert times[("items", (rid, c))] <= times[("partials", (rid, c))]
    spans = trace["spans"]
    by_stage: dict[str, list[dict[str, object]]] = {}
    for s in spans:
        by_stage.setdefault(str(s["stage"]), []).append(s)
    assert len(by_stage["generate"]) == 1 and by_stage["generate"][0]["outputs"] == 3
    assert sorted(tuple(s["key_path"]) for s in by_stage["square"]) == [  # type: ignore[arg-type]
        (rid, 0),
        (rid, 1),
        (rid, 2),
    ]
    assert [s["kind"] for s in by_stage["total"]].count("group_closed") == 1
    for s in spans:
        assert s["received"] <= s["started"] <= s["ended"]
        if s["outputs"]:
            assert s["started"] <= s["first_output"] <= s["last_output"] <= s["ended"]
    # The generator pauses 0.1 s between items: its span lasts about as long.
    gen = by_stage["generate"][0]
    assert gen["ended"] - gen["first_output"] >= 0.2  # type: ignore[operator]


async def test_traces_are_exported_through_opentelemetry(
    demo: Path, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = OTelExport(JsonLinesSpanExporter(path), batch=False)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with open_pipeline(demo, trace_exporter=exporter) as p:
        rid = (await p.client.run(Number(value=2), traceparent=parent))[0].request_id
        timeline = p.runtime.request_timeline(rid)
        await p.run(Number(value=1))  # a second, unrelated trace
    exporter.shutdown()
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    trace_id, parent_span, _ = parse_traceparent(parent)
    mine = [s for s in spans if s["context"]["trace_id"] == "0x" + trace_id]
    others = [s for s in spans if s["context"]["trace_id"] != "0x" + trace_id]
    assert others and len({s["context"]["trace_id"] for s in others}) == 1
    (root,) = [s for s in mine if s["name"] == "alto.request"]
    assert root["parent_id"] == "0x" + parent_span  # continues the caller's trace
    # alto's span has the id the runtime chose at admission (and answers the ingress with)
    assert (
        timeline is not None and root["context"]["span_id"] == "0x" + timeline["trace"]["span_id"]
    )
    assert root["attributes"]["alto.request.id"] == rid
    assert root["attributes"]["alto.request.status"] == "done"
    children = [s for s in mine if s is not root]
    assert {s["parent_id"] for s in children} == {root["context"]["span_id"]}
    names = sorted(s["name"] for s in children)
    assert names == [
        "generate process",
        "square process",
        "square process",
        "total group_closed",
        "total process",
        "total process",
    ]
    for s in children:
        assert s["attributes"]["alto.stage"] == s["name"].split()[0]
        assert next(e["name"] for e in s["events"]) == "processing started"
        assert s["start_time"] >= root["start_time"] and s["end_time"] <= root["end_time"]


async def test_sampling_and_bad_traceparents(
    demo: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(demo, limits=RuntimeLimits(trace_sample_rate=0.0)) as p:
        rid = (await p.run(Number(value=2)))[0].request_id
        timeline = p.runtime.request_timeline(rid)
        assert timeline is not None and timeline["trace"] is None  # not sampled
        assert timeline["latency_s"] > 0  # but timed, like every request
        sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        rid = (await p.client.run(Number(value=2), traceparent=sampled))[0].request_id
        assert p.runtime.request_timeline(rid)["trace"] is not None  # type: ignore[index]
        with pytest.raises(ValueError, match="traceparent"):
            await p.client.run(
                Number(value=1), traceparent="00-" + "0" * 32 + "-" + "1" * 16 + "-01"
            )


async def test_stage_metrics_count_every_input(
    demo: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_pipeline(demo, limits=RuntimeLimits(trace_sample_rate=0.0)) as p:
        for n in (3, 4):
            await p.run(Number(value=n))
        with trio.fail_after(10):  # STATS frames come about once a second
            while True:
                stats = {s.name: s for s in p.runtime.statistics().stages}
                counts = {m.name: m.count for m in stats["square"].metrics}
                if counts.get("alto.stage.processing") == 7:
                    break
                await trio.sleep(0.5)
        square = {m.name: m for m in stats["square"].metrics}
        assert square["alto.stage.outputs"].sum == 14  # two outputs per item
        assert square["alto.stage.time_to_first_output"].count == 7
        generate = {m.name: m for m in stats["generate"].metrics}
        assert generate["alto.stage.outputs"].sum == 7
        # The generator sleeps 0.1 s between items: n items take about 0.1 * n seconds.
        assert generate["alto.stage.processing"].sum == pytest.approx(0.7, abs=0.05)
        outcomes = p.runtime.recent_requests()
        assert [o.status for o in outcomes] == ["done", "done"]
        assert all(o.time_to_first_result is not None for o in outcomes)


def test_wall_clock_is_right_in_every_event_loop_run() -> None:
    """A process may run several event loops one after another (``alto serve`` does); trio
    starts each clock at a random offset, so an offset taken in one run is wrong in the
    next, and spans stamped with it would land hours away from their children."""
    import asyncio
    import time

    from alto._telemetry import wall_clock

    async def stamp() -> float:
        return wall_clock() - time.time()

    async def stamp_asyncio() -> float:
        return wall_clock() - time.time()

    errors = [trio.run(stamp), trio.run(stamp), asyncio.run(stamp_asyncio()), trio.run(stamp)]
    assert all(abs(e) < 1.0 for e in errors), errors
