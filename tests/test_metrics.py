"""``GET /metrics`` read the way Prometheus reads it, and the Grafana dashboard built on it.

The exposition is parsed with prometheus_client's own text parser: names (units in the
name, ``_total`` on counters), labels (``instance_id``, never ``instance``, which
Prometheus attaches to every scraped series), HELP and TYPE on every family, the build
info and the process collectors. ``docs/grafana/alto.json`` is checked for what Grafana's
import needs and for PromQL that names only metrics alto exports.
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
from control_fake import FakeRuntime, crash_instance, start_instance
from prometheus_client.parser import text_string_to_metric_families

import alto
from alto.control import serve_control
from alto.dataplane._stats import RuntimeStatistics
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
    "alto_relayed_frames": ("counter", set()),
    "alto_discarded_frames": ("counter", set()),
    "alto_retried_frames": ("counter", set()),
    "alto_instance_restarts": ("counter", set()),
    "alto_scale_events": ("counter", set()),
    "alto_request_latency_seconds": ("histogram", set()),
    "alto_request_first_result_seconds": ("histogram", set()),
}
STANDARD = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
}


class LimitsFake(FakeRuntime):
    """The fake, reporting the instance limits the real runtime reports."""

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


def _check_exposition(text: str, families: dict[str, Any]) -> None:
    """What a Prometheus server needs, and our naming rules."""
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
    assert {n: (f.type, _label_names(f)) for n, f in alto_families.items()} == EXPECTED
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
            text, families = await _scrape(client)
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


async def test_dashboard_queries_only_name_metrics_alto_exports(
    fake_server: tuple[LimitsFake, httpx.AsyncClient],
) -> None:
    _, client = fake_server
    _, families = await _scrape(client)
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
    }
