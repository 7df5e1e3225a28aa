"""The emulated-GPU benchmarks' ``--fast`` modes, run as a user runs them (a real
process): the JSON they write has the documented shape, and the orderings that the
emulated model implies hold. Nothing here compares timings of this machine: every
latency in these files is virtual (the emulated GPU's), so the checks are deterministic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fast(script: str, tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    out, plot = tmp_path / "points.json", tmp_path / "figure.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--fast", "--json", str(out), "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    return rows, proc.stdout


def check_point(row: dict[str, Any]) -> None:
    assert row["offered"] > 0
    assert 0 < row["achieved"] < 1.5 * row["offered"]
    assert 0 < row["p50"] <= row["p99"]
    # A point counts where the load was sustained: achieved >= 80% of offered (the
    # paper's rule) and no request refused at the ingress.
    assert row["counted"] == (row["achieved"] >= 0.8 * row["offered"] and row["failed"] == 0)


@pytest.mark.slow
def test_figure5_fast(tmp_path: Path) -> None:
    rows, stdout = run_fast("figure5.py", tmp_path)
    assert {r["prompt"] for r in rows} == {"qa", "claims", "queries"}
    highest: dict[str, float] = {}
    for prompt in ("qa", "claims", "queries"):
        points = [r for r in rows if r["prompt"] == prompt]
        for r in points:
            assert {"prompt", "offered", "achieved", "p50", "p99"} <= r.keys()
            check_point(r)
        offered = [r["offered"] for r in points]
        assert offered == sorted(offered) and len(set(offered)) == len(offered) >= 2
        # The sweep raises the load until the prompt saturates its GPU, and stops there.
        assert [r["counted"] for r in points] == [True] * (len(points) - 1) + [False]
        highest[prompt] = max(r["offered"] for r in points if r["counted"])
        # Past saturation the queue grows: the median latency rises with the load.
        assert points[-1]["p50"] > points[0]["p50"]
        assert f"| {prompt} |" in stdout
    # Each prompt saturates one GPU at a different rate: query generation, with the fewest
    # tokens per request (Table 1: 2.5 queries of 5.5 words), sustains the most.
    assert highest["queries"] > highest["qa"]
    assert highest["queries"] > highest["claims"]
    # Unloaded, the median latency follows Table 1's tokens per call times time per token:
    # claims (3.3 x 9.8 x 41 ms) > qa (median length ~47 x 20.7 ms) > queries.
    first = {r["prompt"]: r for r in rows if r["offered"] == min(x["offered"] for x in rows)}
    assert first["claims"]["p50"] > first["qa"]["p50"] > first["queries"]["p50"]


@pytest.mark.slow
def test_prompt_routing_fast(tmp_path: Path) -> None:
    rows, stdout = run_fast("prompt_routing.py", tmp_path)
    policies = [
        "round-robin",
        "least-outstanding",
        "prompt-sticky",
        "prompt-affinity",
        "prompt-cost",
    ]
    assert [r["policy"] for r in rows if r["offered"] == rows[0]["offered"]] == policies
    for r in rows:
        assert {"policy", "offered", "achieved", "p50", "p99", "hit_rate", "imbalance"} <= r.keys()
        check_point(r)
        assert 0 <= r["hit_rate"] <= 1
        assert r["imbalance"] >= 1
    low = {r["policy"]: r for r in rows if r["offered"] == rows[0]["offered"]}
    # The prefix caches hold about half of the templates: policies that keep a template
    # on few instances reuse more of the prompt than those that ignore it.
    for aware in ("prompt-sticky", "prompt-affinity", "prompt-cost"):
        assert low[aware]["hit_rate"] > low["round-robin"]["hit_rate"] + 0.05
        assert low[aware]["hit_rate"] > low["least-outstanding"]["hit_rate"] + 0.05
    for policy in policies:
        assert f"| {policy} |" in stdout


def run_served_fast(script: str, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """A benchmark that serves the emulated FacTool pipeline (real instance processes, a
    load generator process) in its ``--fast`` mode; its JSON and its table."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--fast", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result, proc.stdout


@pytest.mark.slow
def test_abandon_fast(tmp_path: Path) -> None:
    res, stdout = run_served_fast("abandon.py", tmp_path)
    runs = res["runs"]
    assert [r["run"] for r in runs] == ["abandonment", "no abandonment"]
    for r in runs:
        assert {
            "requests", "abandoned", "completed", "failed", "lost", "live_p50", "live_p99",
            "lm_tokens", "lm_tokens_in_traces", "tokens_per_completed", "leftovers",
            "tokens_after_abandonment", "steps_after_abandonment", "goal_met",
        } <= r.keys()  # fmt: skip
        assert r["requests"] > 0 and r["lost"] == 0
        assert r["requests"] == r["completed"] + r["abandoned"] + r["failed"] + r["refused"]
        # Once drained, nothing is left anywhere: no request in flight, no credit in use,
        # no queued frame, no open group, no LM sequence in an engine.
        assert r["settled"] and r["clean"]
        assert set(r["leftovers"].values()) == {0}
        # The traces account for the tokens the engines generated (the spans of cancelled
        # inputs arrive after their request ended and still count).
        assert 0 < r["lm_tokens_in_traces"] <= r["lm_tokens"]
        assert r["lm_tokens_in_traces"] >= 0.98 * r["lm_tokens"]
        assert 0 < r["live_p50"] <= r["live_p99"]
    ab, none = runs
    # The same requests in both runs; only the first run acts on the abandonment draws.
    assert ab["requests"] == none["requests"] and ab["abandon_planned"] == none["abandon_planned"]
    assert none["abandoned"] == 0 and none["completed"] == none["requests"] - none["failed"]
    assert 1 <= ab["abandoned"] <= ab["abandon_planned"]
    assert ab["abandoned_traced"] == ab["abandoned"]
    assert ab["runtime_outcomes"].get("cancelled", 0) >= 1
    assert ab["tokens_after_abandonment"]["n"] == ab["abandoned"]
    # Abandoned requests stop generating: the run with abandonment costs fewer tokens.
    assert ab["lm_tokens"] < none["lm_tokens"]
    assert 0 < res["saved"]["share_saved"] <= 1
    assert "| abandonment |" in stdout and "| no abandonment |" in stdout


@pytest.mark.slow
def test_autoscale_fast(tmp_path: Path) -> None:
    plot = tmp_path / "autoscale.png"
    res, stdout = run_served_fast("autoscale.py", tmp_path, "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {r["run"]: r for r in res["runs"]}
    assert list(runs) == ["fixed", "autoscaled"]
    lm = ("qa", "claims", "queries")
    for r in runs.values():
        assert (
            r["requests"] > 0 and r["lost"] == 0 and r["completed"] + r["failed"] == r["requests"]
        )
        assert r["settled"] and r["clean"]
        assert [p["offered"] for p in r["phases"]] == [res["low"], res["high"], res["low"]]
        for p in r["phases"]:
            assert {"p50", "p99", "mean_instances", "requests"} <= p.keys()
        # Sampled every 0.5 s through the load (three phases) and its drain.
        times = [s["t"] for s in r["timeline"]]
        assert times == sorted(times) and len(times) >= 3 * res["phase_seconds"] / 0.5 * 0.8
        assert 0 < r["lm_instance_seconds"]
        assert f"| {r['run']} |" in stdout
    # The paper's deployment does not move; the autoscaled one stays in 1..4 and moves
    # only by the autoscaler's decisions, each with its reason.
    fixed, auto = runs["fixed"], runs["autoscaled"]
    assert fixed["scale_events"] == []
    assert {tuple(s["held"][st] for st in lm) for s in fixed["timeline"]} == {(2, 2, 3)}
    assert all(1 <= s["held"][st] <= 4 for s in auto["timeline"] for st in lm)
    for e in auto["scale_events"]:
        assert e["stage"] in lm and e["by"] == "autoscaler" and 1 <= e["to"] <= 4
        assert "queue depth" in e["reason"]
    # The 4x step wants more query generators than one: the autoscaler adds them.
    assert any(e["stage"] == "queries" and e["to"] > e["from"] for e in auto["scale_events"])
