"""``GET /metrics`` read the way Prometheus reads it, and the Grafana dashboard built on it.

The exposition is parsed with prometheus_client's own text parser: names (units in the
name, ``_total`` on counters), labels (``instance_id``, never ``instance``, which
Prometheus attaches to every scraped series), HELP and TYPE on every family, the build
info and the process collectors. Request latency counts every request once, whichever
door it came through; requests are counted by final status; the stages' own histograms
(queue wait, processing, time to first output, outputs, the ``gen_ai`` ones of LM stages)
are Prometheus histograms whose buckets are the instances' counts, added up; scale events
are counted by stage, direction and who. ``docs/grafana/alto.json`` is checked for what
Grafana's import needs and for PromQL that names only metrics alto exports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from control_fake import FacToolFakeRuntime, FakeRuntime, crash_instance, start_instance
from prometheus_client.parser import text_string_to_metric_families

import alto
from alto._telemetry import BUCKETS
from alto.control import serve_control
from alto.control._metrics import ScaleCounts
from alto.dataplane._stats import RuntimeStatistics, ScaleEvent
from alto.testing import open_server

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "alto.json"
TOKEN = "metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

PER_INSTANCE = {"stage", "instance_id"}
PER_STAGE = {"stage"}
# Every alto family: its type and label names. A new metric is a decision: it changes this
# table, the README's list and, where it helps an operator, the dashboard.
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "alto_build_info": ("gauge", {"version", "python"}),
    "alto_instance_queue_depth_frames": ("gauge", PER_INSTANCE),
    "alto_instance_credits_frames": ("gauge", PER_INSTANCE),
    "alto_instance_credits_in_use_frames": ("gauge", PER_INSTANCE),
    "alto_instance_backlog_frames": ("gauge", PER_INSTANCE),
    "alto_instance_open_groups": ("gauge", PER_INSTANCE),
    "alto_instance_received_frames": ("counter", PER_INSTANCE),
    "alto_instance_sent_frames": ("counter", PER_INSTANCE),
    "alto_instance_info": ("gauge", {*PER_INSTANCE, "state"}),
    "alto_stage_instances": ("gauge", PER_STAGE),
    "alto_stage_ready_instances": ("gauge", PER_STAGE),
    "alto_stage_target_instances": ("gauge", PER_STAGE),
    "alto_stage_max_instances": ("gauge", PER_STAGE),
    "alto_stage_errors": ("counter", PER_STAGE),
    "alto_stage_processed_frames": ("counter", PER_STAGE),
    "alto_requests_in_flight": ("gauge", set()),
    "alto_max_inflight_requests": ("gauge", set()),
    "alto_max_instances": ("gauge", set()),
    "alto_requests": ("counter", {"status"}),
    "alto_requests_finished": ("counter", {"status"}),
    "alto_relayed_frames": ("counter", set()),
    "alto_discarded_frames": ("counter", set()),
    "alto_retried_frames": ("counter", set()),
    "alto_instance_restarts": ("counter", set()),
    "alto_scale_events": ("counter", set()),
    "alto_request_latency_seconds": ("histogram", set()),
    "alto_request_first_result_seconds": ("histogram", set()),
    # what the stages' instances measure, once they have processed something
    "alto_stage_queue_wait_seconds": ("histogram", PER_STAGE),
    "alto_stage_processing_seconds": ("histogram", PER_STAGE),
    "alto_stage_time_to_first_output_seconds": ("histogram", PER_STAGE),
    "alto_stage_outputs_per_input": ("histogram", PER_STAGE),
}
# Families that appear only where what they count exists: LM stages, autoscaled stages,
# scale events.
OPTIONAL: dict[str, tuple[str, set[str]]] = {
    "alto_gen_ai_server_time_to_first_token_seconds": ("histogram", PER_STAGE),
    "alto_gen_ai_server_time_per_output_token_seconds": ("histogram", PER_STAGE),
    "alto_gen_ai_client_token_usage_tokens": ("histogram", {"stage", "type"}),
    "alto_stage_autoscale_min_instances": ("gauge", PER_STAGE),
    "alto_stage_autoscale_max_instances": ("gauge", PER_STAGE),
    "alto_stage_scale_events": ("counter", {"stage", "direction", "by"}),
}
STANDARD = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
}


class LimitsFake(FakeRuntime):
    """The fake, reporting the instance limits the real runtime reports; ``split`` is
    autoscaled between 1 and 4 instances."""

    def __init__(self) -> None:
        super().__init__()
        self.autoscale["split"] = (1, 4)

    def statistics(self) -> RuntimeStatistics:
        stats = super().statistics()
        stages = tuple(dataclasses.replace(s, max_instances=8) for s in stats.stages)
        return dataclasses.replace(stats, stages=stages, max_instances=32)


@pytest.fixture
async def fake_server(nursery: trio.Nursery) -> AsyncIterator[tuple[LimitsFake, httpx.AsyncClient]]:
    fake = LimitsFake()
    port = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield fake, client


async def _scrape(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def _check_exposition(
    text: str, families: dict[str, Any], expected: dict[str, tuple[str, set[str]]] = EXPECTED
) -> None:
    """What a Prometheus server needs, and our naming rules: every family of ``expected``
    (and no other than those and the optional ones) with its type and labels."""
    for name, family in families.items():
        assert family.documentation, f"{name} has no HELP"
        assert family.type != "unknown", f"{name} has no TYPE"
    # The parser fills in a missing HELP from nothing; read the lines too.
    helped = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    typed = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert helped == set(typed)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert sample is not None
            base = re.sub(r"_(bucket|count|sum|created)$", "", sample.group())
            assert sample.group() in typed or base in typed, f"no TYPE for {line!r}"

    # prometheus_client adds a `_created` gauge per histogram (the Prometheus text format
    # has no place for a creation time); PROMETHEUS_DISABLE_CREATED_SERIES=true drops them.
    alto_families = {
        n: f for n, f in families.items() if n.startswith("alto_") and not n.endswith("_created")
    }
    known = {**OPTIONAL, **expected}
    # A labelled family without samples (no limits reported) shows no label names.
    shown = {
        n: (f.type, _label_names(f) if f.samples else known.get(n, (None, set()))[1])
        for n, f in alto_families.items()
    }
    assert set(expected) <= set(shown), sorted(set(expected) - set(shown))
    assert shown == {n: known.get(n) for n in shown}
    for name, family in families.items():
        for sample in family.samples:
            # Prometheus adds `instance` (the target) itself; ours would be renamed.
            assert not {"instance", "exported_instance"} & set(sample.labels), sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        if name.startswith("alto_") and "frames" in name:
            assert name.endswith("_frames"), f"{name}: the unit goes last"
    for name, kind in STANDARD.items():
        assert families[name].type == kind, name


def _label_names(family: Any) -> set[str]:
    names: set[str] = set()
    for sample in family.samples:
        names |= set(sample.labels) - {"le"}
    return names


def _samples(families: dict[str, Any], name: str) -> dict[tuple[str, ...], float]:
    family = families[name]
    return {
        tuple(v for _, v in sorted(s.labels.items())): s.value
        for s in family.samples
        if not s.name.endswith("_created")
    }


async def test_exposition_names_labels_help_and_type(
    fake_server: tuple[LimitsFake, httpx.AsyncClient],
) -> None:
    _, client = fake_server
    response = await client.post(
        "/v1/pipelines/wordcount/requests",
        params={"stream": "false"},
        json={"text": "a bb"},
        headers=AUTH,
    )
    assert response.json()["status"] == "done"
    text, families = await _scrape(client)
    _check_exposition(text, families)

    assert _samples(families, "alto_build_info") == {
        (platform.python_version(), alto.__version__): 1
    }
    assert families["python_info"].samples[0].labels["version"] == platform.python_version()
    assert families["process_open_fds"].samples[0].value > 0
    assert _samples(families, "alto_instance_queue_depth_frames") == {
        ("1", "split"): 0,
        ("2", "score"): 0,
        ("3", "score"): 0,
        ("4", "sum"): 0,
    }
    sent = _samples(families, "alto_instance_sent_frames")
    assert sum(sent.values()) == 6  # two words through three stages
    assert _samples(families, "alto_relayed_frames") == {(): 12}
    assert _samples(families, "alto_requests")[("completed",)] == 1
    assert _samples(families, "alto_max_instances") == {(): 32}
    assert _samples(families, "alto_stage_max_instances") == {
        ("split",): 8,
        ("score",): 8,
        ("sum",): 8,
    }


async def test_instance_states_and_stage_gauges(
    fake_server: tuple[LimitsFake, httpx.AsyncClient],
) -> None:
    fake, client = fake_server
    crash_instance(fake, 2, "exit code -9")
    starting = start_instance(fake, "score")
    response = await client.post("/api/stages/sum/scale", json={"instances": 3}, headers=AUTH)
    assert response.status_code == 200
    _, families = await _scrape(client)
    info = _samples(families, "alto_instance_info")
    assert info == {
        ("1", "split", "ready"): 1,
        ("2", "score", "crashed"): 1,
        ("3", "score", "ready"): 1,
        (str(starting), "score", "starting"): 1,
        ("4", "sum", "ready"): 1,
        ("6", "sum", "ready"): 1,
        ("7", "sum", "ready"): 1,
    }
    assert _samples(families, "alto_stage_instances") == {
        ("split",): 1,
        ("score",): 2,  # 3 and the starting one; the crashed one left its stage
        ("sum",): 3,
    }
    assert _samples(families, "alto_stage_ready_instances") == {
        ("split",): 1,
        ("score",): 1,
        ("sum",): 3,
    }
    assert _samples(families, "alto_stage_target_instances") == {
        ("split",): 1,
        ("score",): 2,
        ("sum",): 3,
    }
    assert _samples(families, "alto_scale_events") == {(): 1}


async def test_a_runtime_without_limits_exports_no_limit_gauges(nursery: trio.Nursery) -> None:
    # 0 in the statistics means "not reported": no gauge rather than a false limit of 0.
    port = await nursery.start(partial(serve_control, FakeRuntime(), "127.0.0.1", 0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        _, families = await _scrape(client)
    assert "alto_max_instances" not in families
    assert _samples(families, "alto_stage_max_instances") == {}


def _histogram(families: dict[str, Any], name: str, **labels: str) -> dict[str, Any]:
    """One series of a histogram family: its ``le`` buckets, count and sum."""
    out: dict[str, Any] = {"buckets": {}}
    for sample in families[name].samples:
        if any(sample.labels.get(k) != v for k, v in labels.items()):
            continue
        if sample.name == f"{name}_bucket":
            out["buckets"][sample.labels["le"]] = sample.value
        elif sample.name == f"{name}_count":
            out["count"] = sample.value
        elif sample.name == f"{name}_sum":
            out["sum"] = sample.value
    return out


async def test_request_latency_counts_every_door_once(
    fake_server: tuple[LimitsFake, httpx.AsyncClient],
) -> None:
    fake, client = fake_server
    for params in ({"stream": "false"}, {}):  # JSON and SSE through the HTTP ingress
        response = await client.post(
            "/v1/pipelines/wordcount/requests", params=params, json={"text": "a bb"}, headers=AUTH
        )
        assert response.status_code == 200
    # The in-process door (what socket clients and alto.testing reach too): no HTTP at all.
    events = [e async for e in fake.submit(b"")]
    assert [e.kind for e in events] == ["accepted", "done"]
    _, families = await _scrape(client)
    for name in ("alto_request_latency_seconds", "alto_request_first_result_seconds"):
        count = _samples(families, name)[("+Inf",)]
        # 3 completed; the empty text had no result, so 2 first results
        assert count == (3 if "latency" in name else 2), name
    assert _samples(families, "alto_requests_finished")[("done",)] == 3


async def test_requests_by_final_status(nursery: trio.Nursery) -> None:
    fake = FakeRuntime(step_delay=0.05)
    port = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN))
    path = "/v1/pipelines/wordcount/requests"
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10
    ) as client:
        done = await client.post(path, params={"stream": "false"}, json={"text": "a"})
        failed = await client.post(path, params={"stream": "false"}, json={"text": "a", "fail": 1})
        late = await client.post(
            path, params={"stream": "false", "timeout": "0.07"}, json={"text": "a b c d e"}
        )
        assert [r.json()["status"] for r in (done, failed, late)] == ["done", "error", "error"]
        assert late.json()["error"].startswith("deadline exceeded")

        async def cancel_it() -> None:
            while not fake.requests:
                await trio.sleep(0.01)
            (rid,) = fake.requests
            response = await client.delete(f"/v1/requests/{rid}")
            assert response.status_code == 202, response.text

        async with trio.open_nursery() as inner:
            inner.start_soon(cancel_it)
            cancelled = await client.post(
                path, params={"stream": "false"}, json={"text": "a b c d e f g"}
            )
        assert cancelled.json()["error"] == "cancelled through the control plane"
        _, families = await _scrape(client)
    finished = _samples(families, "alto_requests_finished")
    assert finished == {("done",): 1, ("failed",): 1, ("cancelled",): 1, ("timed_out",): 1}
    # The runtime's own counter keeps its meaning: a timed-out request is a failed one.
    requests = _samples(families, "alto_requests")
    assert requests[("failed",)] == 2 and requests[("completed",)] == 1
    # Only completed requests have a latency; all that had a first result, a first result.
    assert _samples(families, "alto_request_latency_seconds")[("+Inf",)] == 1


async def test_stage_histograms_are_the_instances_counts_added_up(
    nursery: trio.Nursery,
) -> None:
    fake = FacToolFakeRuntime(step_delay=0.01)
    port = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for i in range(3):
            response = await client.post(
                "/v1/pipelines/factool/requests",
                params={"stream": "false"},
                json={"id": f"q{i}", "question": "why?"},
            )
            assert response.json()["status"] == "done"
        text, families = await _scrape(client)
    gen_ai = {n: v for n, v in OPTIONAL.items() if "gen_ai" in n}
    expected = {n: v for n, v in EXPECTED.items() if n != "alto_max_instances"}  # unreported
    _check_exposition(text, families, {**expected, **gen_ai})
    stats = {s.name: s for s in fake.statistics().stages}
    for stage in ("qa", "bm25", "rerank"):
        snapshot = next(m for m in stats[stage].metrics if m.name == "alto.stage.processing")
        shown = _histogram(families, "alto_stage_processing_seconds", stage=stage)
        assert shown["count"] == snapshot.count == stats[stage].frames_processed
        assert shown["sum"] == pytest.approx(snapshot.sum)
        # Prometheus' buckets are cumulative; the instances report one count per bucket.
        cumulative = [sum(snapshot.buckets[: i + 1]) for i in range(len(snapshot.bounds))]
        bounds = BUCKETS["alto.stage.processing"]
        assert [shown["buckets"][repr(float(b))] for b in bounds] == cumulative
        assert shown["buckets"]["+Inf"] == snapshot.count
    outputs = _histogram(families, "alto_stage_outputs_per_input", stage="claims")
    assert outputs["count"] == 3 and outputs["sum"] == 3 * fake.claims
    # gen_ai.* only where an LM stage ran: the three LM stages of FacTool, not retrieval.
    ttft = "alto_gen_ai_server_time_to_first_token_seconds"
    assert {s.labels["stage"] for s in families[ttft].samples} == {"qa", "claims", "queries"}
    usage = "alto_gen_ai_client_token_usage_tokens"
    assert _histogram(families, usage, stage="qa", type="input")["sum"] == 3 * 40
    assert _histogram(families, usage, stage="qa", type="output")["count"] == 3
    assert {s.labels["type"] for s in families[usage].samples} == {"input", "output"}


async def test_scale_events_by_stage_direction_and_who(
    fake_server: tuple[LimitsFake, httpx.AsyncClient],
) -> None:
    fake, client = fake_server
    # The autoscaler's decisions (split is autoscaled), and an operator's scale and drain.
    fake.log_scale("split", 3, "autoscaler", "queue depth 11 > 4 per instance for 2 s")
    fake.log_scale("split", 2, "autoscaler", "queue depth 2 <= 4 per instance for 30 s", 3)
    response = await client.post("/api/stages/sum/scale", json={"instances": 3}, headers=AUTH)
    assert response.status_code == 200
    _, families = await _scrape(client)
    response = await client.post("/api/instances/2/drain", headers=AUTH)
    assert response.status_code == 202
    _, families = await _scrape(client)
    _, families = await _scrape(client)  # a second scrape counts nothing twice
    assert _samples(families, "alto_stage_scale_events") == {
        ("autoscaler", "up", "split"): 1,
        ("autoscaler", "down", "split"): 1,
        ("operator", "up", "sum"): 1,
        ("operator", "down", "score"): 1,
    }
    assert _samples(families, "alto_stage_autoscale_min_instances") == {("split",): 1}
    assert _samples(families, "alto_stage_autoscale_max_instances") == {("split",): 4}
    # An autoscaled stage is not scaled by hand: 409 naming its range, nothing logged.
    response = await client.post("/api/stages/split/scale", json={"instances": 2}, headers=AUTH)
    assert response.status_code == 409
    assert "autoscaled between 1 and 4" in response.json()["error"]
    assert len(fake.scale_log) == 4


def _event(t: float, stage: str = "s", to: int = 2) -> ScaleEvent:
    return ScaleEvent(t, stage, 1, to, "autoscaler", "r")


def test_scale_counts_count_each_event_of_a_bounded_log_once() -> None:
    counts = ScaleCounts()
    log = [_event(1.0), _event(2.0), _event(2.0, to=0)]
    counts.update(log)
    counts.update(log)
    assert counts.counts() == {("s", "up", "autoscaler"): 2, ("s", "down", "autoscaler"): 1}
    # Another event at the newest time already seen, and the oldest one forgotten.
    log = [*log[1:], _event(2.0, "t"), _event(3.0, "t")]
    counts.update(log)
    assert counts.counts() == {
        ("s", "up", "autoscaler"): 2,
        ("s", "down", "autoscaler"): 1,
        ("t", "up", "autoscaler"): 2,
    }
    counts.update([])
    counts.update(log[-1:])
    assert sum(counts.counts().values()) == 5


@pytest.mark.slow
async def test_a_real_serve_exports_the_same_families(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "metrics-{os.getpid()}"')
    text = text.replace("delay = 0.05", "delay = 0.0")
    (tmp_path / "p.toml").write_text(text)
    (tmp_path / "d.toml").write_text("[runtime]\nstop_timeout = 2.0\n")
    async with open_server(tmp_path / "p.toml", tmp_path / "d.toml", http="127.0.0.1:0") as info:
        assert info.http_url is not None
        async with httpx.AsyncClient(base_url=info.http_url, timeout=30) as client:
            response = await client.post(
                f"/v1/pipelines/metrics-{os.getpid()}/requests",
                params={"stream": "false"},
                json={"value": 3},
                headers={"Authorization": f"Bearer {info.token}"},
            )
            assert response.json()["status"] == "done", response.text
            # The instances report what they measured about once a second.
            with trio.fail_after(15):
                while True:
                    text, families = await _scrape(client)
                    processing = families.get("alto_stage_processing_seconds")
                    stages_seen = {s.labels["stage"] for s in getattr(processing, "samples", [])}
                    if len(stages_seen) == 3:  # every stage reported
                        break
                    await trio.sleep(0.2)
    # The demo has no LM stage and no autoscaled stage; its stages processed inputs.
    _check_exposition(text, families)
    stages = {"generate", "square", "total"}
    assert {k[0] for k in _samples(families, "alto_stage_max_instances")} == stages
    assert {k[2] for k in _samples(families, "alto_instance_info")} == {"ready"}
    assert _samples(families, "alto_requests")[("completed",)] == 1
    assert _samples(families, "alto_request_latency_seconds")[("+Inf",)] == 1
    processed = _samples(families, "alto_stage_processed_frames")
    assert processed[("square",)] == 3


# -- the Grafana dashboard -------------------------------------------------------------

# PromQL words that are not metric names (aggregation modifiers and binary operators).
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names and label names
    excluded)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group().lower() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def test_promql_metric_names() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"a_seconds_bucket"}
    assert promql_metric_names(
        'sum by (stage) (x_frames{s="a b"}) / sum by (stage) (y_frames) and on (stage) z'
    ) == {"x_frames", "y_frames", "z"}
    assert promql_metric_names("count(up) by (job) > 1e3") == {"up"}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out.extend((inner["title"], t["expr"]) for t in inner.get("targets", []))
    return out


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] == "alto" and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.3+; 10.x exports 38-39
    assert dashboard.get("id") is None  # an import must not overwrite another dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    kinds = {"row", "timeseries", "stat", "table"}
    for panel in dashboard["panels"]:
        assert panel["type"] in kinds, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("h", "w", "x", "y"))
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var == "__rate_interval", (panel["title"], var)


class EverythingFake(FacToolFakeRuntime):
    """The FacTool fake (LM stages: the gen_ai families), with the limits the real runtime
    reports and an autoscaled stage: every family alto exports has samples."""

    def __init__(self) -> None:
        super().__init__()
        self.autoscale["queries"] = (1, 4)

    def statistics(self) -> RuntimeStatistics:
        stats = super().statistics()
        stages = tuple(dataclasses.replace(s, max_instances=8) for s in stats.stages)
        return dataclasses.replace(stats, stages=stages, max_instances=32)


async def test_dashboard_queries_only_name_metrics_alto_exports(nursery: trio.Nursery) -> None:
    fake = EverythingFake()
    port = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10
    ) as client:
        response = await client.post(
            "/v1/pipelines/factool/requests",
            params={"stream": "false"},
            json={"id": "q", "question": "?"},
        )
        assert response.json()["status"] == "done"
        fake.log_scale("queries", 4, "autoscaler", "queue depth 16 > 4 per instance for 2 s")
        text, families = await _scrape(client)
    _check_exposition(text, families, {**EXPECTED, **OPTIONAL})  # every family, with samples
    exported = {s.name for f in families.values() for s in f.samples}
    dashboard = _dashboard()
    used: set[str] = set()
    for title, expr in _queries(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{title}: {expr!r} selects no metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported"
        used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *\w+\)", variable["definition"])
            assert match is not None and match.group(1) in exported, variable["definition"]
    # What an operator asks first: request rate, latency, queue depth, credits, instances
    # and their states, scaling, errors.
    assert used >= {
        "alto_requests_total",
        "alto_request_latency_seconds_bucket",
        "alto_instance_queue_depth_frames",
        "alto_instance_credits_in_use_frames",
        "alto_stage_instances",
        "alto_instance_info",
        "alto_scale_events_total",
        "alto_stage_errors_total",
        # ... and, per stage, what its instances measure, LM usage, and who scaled it
        "alto_requests_finished_total",
        "alto_stage_processing_seconds_bucket",
        "alto_stage_queue_wait_seconds_bucket",
        "alto_stage_time_to_first_output_seconds_bucket",
        "alto_gen_ai_server_time_to_first_token_seconds_bucket",
        "alto_gen_ai_server_time_per_output_token_seconds_bucket",
        "alto_gen_ai_client_token_usage_tokens_sum",
        "alto_stage_scale_events_total",
        "alto_stage_autoscale_max_instances",
    }
