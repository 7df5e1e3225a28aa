"""A 30-second run of ``benchmarks/soak.py``: ``alto serve`` under mixed load through both
doors, overload bursts, clients that vanish, SSE clients that stop reading and a SIGKILLed
instance every few seconds. No request is lost or answered wrongly, nothing is left in
flight, and the runtime's memory and file descriptors stay bounded (generous bounds: this
is a leak check, not a measurement). The full run, and its table, are in the README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_soak_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--seconds",
            "30",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    summary = f"{run.stdout}\n{json.dumps(result, indent=1)}"
    every = result["all"]
    assert every["lost"] == 0, summary
    assert every["wrong"] == 0, summary
    assert every["sent"] == sum(
        every[k] for k in ("completed", "failed", "refused", "vanished", "lost", "wrong")
    ), summary
    for door in ("socket", "http"):
        assert result["doors"][door]["completed"] > 0, summary
    assert every["vanished"] > 0, summary
    assert sum(result["kills"].values()) >= 1, summary
    assert result["stalled_streams"] > 0, summary
    runtime = result["runtime"]
    assert runtime["requests_in_flight_at_end"] == 0, summary
    warm, end = runtime["warm"], runtime["end"]
    assert end["rss_mb"] <= 1.5 * warm["rss_mb"] + 50, summary
    assert end["fds"] <= runtime["ready"]["fds"] + 20, summary
    assert result["serve_exit_code"] == 0, summary
