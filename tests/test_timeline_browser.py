"""The dashboard's request list and timeline against a real ``alto serve``, in chromium.

A real ``alto.serve`` of the emulated FacTool pipeline (``configs/factool-emulated.toml``:
emulated LM stages with the paper's Table 1 timings, real streaming BM25, the encoder and
reranker emulated as figure3.py runs them, so that no model loads), one instance per
stage, every request traced (the default ``trace_sample_rate``), ``queries`` autoscaled
between 1 and 2 instances. SQuAD questions go through the HTTP ingress; then Debian's
chromium opens the dashboard:

- the request list shows the finished requests with numbers (latency, first result,
  results), newest first, and the slowest first on its other tab;
- clicking a request draws its timeline as the paper's Figure 2 does: a row per stage the
  request visited, one box per partial output that left the stage (as many as the trace
  has hops out of it), processing spans as faint bars, the request's end marked;
- the autoscaled stage carries its range and its scale buttons are off; an operator's
  scale shows up in the scaling log with who made it and why.

Screenshot: ``artifacts/timeline.png``; with ``ALTO_UPDATE_SCREENSHOTS=1`` also
``docs/screenshots/timeline.png`` (the README shows it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_thread import TrioThread

import alto

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver (chromium-driver)",
    ),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium"),
    pytest.mark.skipif(importlib.util.find_spec("bm25s") is None, reason="needs bm25s (llm extra)"),
]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "screenshots" / "timeline.png"
ARTIFACTS = ROOT / "artifacts"
TOKEN = "timeline-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STAGES = ["qa", "claims", "queries", "bm25", "encoder", "rerank"]
QUESTIONS = 3
WAIT_S = 20

DEPLOYMENT = """
[runtime]
credits = 16
max_inflight_requests = 64
stop_timeout = 5.0
[stages.qa]
instances = 1
[stages.claims]
instances = 1
[stages.queries]
instances = 1
[stages.queries.autoscale]
min = 1
max = 2
target_queue_depth = 64     # so high that this test's few requests never scale it
[stages.bm25]
instances = 1
[stages.encoder]
instances = 1
[stages.rerank]
instances = 1
"""


def _pipeline(tmp: Path) -> Path:
    """configs/factool-emulated.toml with the encoder and reranker emulated (the times
    benchmarks/figure3.py uses): no MiniLM model to load, no passage index to build."""
    text = (ROOT / "configs" / "factool-emulated.toml").read_text()
    text, n = re.subn(
        r"(\[stages\.encoder\]\n(?:(?!\[).*\n)*?)(gpus = 1\n)",
        r"\1\2options = { emulate_seconds = 0.005 }\n",
        text,
    )
    assert n == 1, "configs/factool-emulated.toml changed: no encoder stage with gpus = 1"
    text, n = re.subn(
        r"options = \{ k = 3, index_dir = [^}]*\}",
        "options = { k = 3, emulate_seconds = 0.002 }",
        text,
    )
    assert n == 1, "configs/factool-emulated.toml changed: no rerank options with index_dir"
    path = tmp / "factool-emulated.toml"
    path.write_text(text)
    return path


class _Server(TrioThread[str]):
    """``alto.serve`` in a thread of its own (selenium blocks), with a few questions sent
    through the HTTP ingress and one operator scale, before the test looks."""

    thread_name = "alto-timeline"
    start_timeout = 300.0

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.pipeline = _pipeline(tmp)
        self.deploy = tmp / "deploy.toml"
        self.deploy.write_text(DEPLOYMENT)
        self.url = ""
        self.request_ids: list[int] = []

    async def main(self, ready: Callable[[str], None]) -> None:
        from alto.retrieval import load_questions

        async with trio.open_nursery() as nursery:
            info: alto.ServeInfo = await nursery.start(
                lambda task_status: alto.serve(
                    self.pipeline,
                    self.deploy,
                    http="127.0.0.1:0",
                    token=TOKEN,
                    ready_timeout=240,
                    write_discovery=False,
                    handle_signals=False,
                    task_status=task_status,
                )
            )
            assert info.http_url is not None
            questions = load_questions()[::97][:QUESTIONS]
            async with httpx.AsyncClient(base_url=info.http_url, headers=AUTH, timeout=120) as c:

                async def ask(i: int) -> None:
                    q = questions[i]
                    response = await c.post(
                        "/v1/pipelines/factool-emulated/requests",
                        params={"stream": "false"},
                        json={"id": q.id, "question": q.question},
                    )
                    body = response.json()
                    assert response.status_code == 200 and body["status"] == "done", body
                    self.request_ids.append(body["request_id"])

                async with trio.open_nursery() as asking:
                    for i in range(QUESTIONS):
                        asking.start_soon(ask, i)
                response = await c.post("/api/stages/encoder/scale", json={"instances": 2})
                assert response.status_code == 200, response.text
            ready(info.http_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    server = _Server(tmp_path_factory.mktemp("timeline"))
    server.url = server.start()
    try:
        yield server
    finally:
        server.stop()


# What the request list and the timeline show, read in one script.
_SHOWN = """
    const rows = [...document.querySelectorAll('#req-rows tr.req-row')].map((tr) => ({
      id: Number(tr.dataset.request),
      cells: [...tr.cells].map((td) => td.textContent),
    }));
    const timeline = [...document.querySelectorAll('#timeline svg g.tl-row')].map((g) => ({
      stage: g.dataset.stage,
      boxes: g.querySelectorAll('rect.tl-box').length,
      results: g.querySelectorAll('rect.tl-box.result').length,
      spans: g.querySelectorAll('rect.tl-span').length,
      label: (g.querySelector('text.tl-label') || {}).textContent,
    }));
    return {
      rows, timeline,
      head: document.getElementById('timeline-head').textContent,
      end: document.querySelectorAll('#timeline line.tl-end').length,
      selected: [...document.querySelectorAll('#req-rows tr.selected')].map((tr) => Number(tr.dataset.request)),
    };
"""


def shown(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(_SHOWN)
    return result


def _seconds(text: str) -> float:
    """'512 ms' or '3.27 s' as seconds."""
    number, unit = text.split()
    return float(number) / (1000 if unit == "ms" else 1)


def test_request_list_and_timeline(server: _Server, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    driver.set_window_size(1280, 1100)
    driver.get(f"{server.url}/")

    # The list: every request, newest first, with numbers.
    wait.until(lambda d: len(shown(d)["rows"]) == QUESTIONS)
    rows = shown(driver)["rows"]
    recent = httpx.get(f"{server.url}/api/requests", timeout=10).json()["requests"]
    assert [r["id"] for r in rows] == [r["request_id"] for r in recent]  # newest first
    assert sorted(r["id"] for r in rows) == sorted(server.request_ids)
    for row in rows:
        rid, status, latency, first, results = row["cells"]
        assert rid == f"#{row['id']}" and status == "done", row
        assert 0 < _seconds(first) <= _seconds(latency), row
        assert int(results) > 3, row  # an answer, claims and evidence
    # The slowest first on the other tab.
    driver.find_element(By.ID, "tab-slowest").click()
    wait.until(
        lambda d: d.find_element(By.ID, "tab-slowest").get_attribute("aria-selected") == "true"
    )
    wait.until(lambda d: len(shown(d)["rows"]) == QUESTIONS)
    slowest = [_seconds(r["cells"][2]) for r in shown(driver)["rows"]]
    assert slowest == sorted(slowest, reverse=True)

    # A request's timeline: a row per stage it visited, a box per partial output.
    rid = shown(driver)["rows"][0]["id"]
    driver.find_element(By.CSS_SELECTOR, f'#req-rows tr[data-request="{rid}"]').click()
    wait.until(lambda d: len(shown(d)["timeline"]) > 0)
    view = shown(driver)
    timeline = httpx.get(f"{server.url}/api/requests/{rid}", timeout=10).json()
    trace = timeline["trace"]
    visited = {s["stage"] for s in trace["spans"]} | {
        h["from"] for h in trace["hops"] if h["from"] not in ("ingress", "runtime")
    }
    assert visited == set(STAGES)
    assert [r["stage"] for r in view["timeline"]] == STAGES  # in the pipeline's order
    for row in view["timeline"]:
        stage = row["stage"]
        assert row["label"] == stage
        assert row["boxes"] == sum(1 for h in trace["hops"] if h["from"] == stage) > 0, row
        assert row["results"] == sum(
            1 for h in trace["hops"] if h["from"] == stage and h["to"] == "sink"
        ), row
        assert row["spans"] == sum(1 for s in trace["spans"] if s["stage"] == stage) > 0, row
    results = {r["stage"]: r["results"] for r in view["timeline"]}
    assert results["qa"] == 1 and results["claims"] >= 1 and results["rerank"] >= 1
    assert view["end"] == 1 and view["selected"] == [rid]
    assert view["head"].startswith(f"request {rid}: done after ")
    assert trace["trace_id"] in view["head"]

    # The autoscaled stage says so, and its count is not the operator's to change.
    card = '.stage[data-stage="queries"]'
    badge = driver.find_element(By.CSS_SELECTOR, f"{card} .badge.autoscale")
    assert badge.text == "autoscale 1–2"
    for action in ("scale-up", "scale-down"):
        button = driver.find_element(By.CSS_SELECTOR, f'{card} [data-action="{action}"]')
        assert not button.is_enabled() and "autoscaled between 1 and 2" in button.get_attribute(
            "title"
        )
    # The operator's scale of the encoder, in the scaling log with who and why.
    wait.until(lambda d: "encoder" in d.find_element(By.ID, "scale-log").text)
    entry = driver.find_element(By.CSS_SELECTOR, '#scale-log li[data-stage="encoder"]').text
    assert "1 → 2" in entry and "operator" in entry and "asked" in entry

    panel = driver.find_element(By.CSS_SELECTOR, ".requests-panel")
    driver.execute_script("arguments[0].scrollIntoView()", panel)
    ARTIFACTS.mkdir(exist_ok=True)
    assert panel.screenshot(str(ARTIFACTS / "timeline.png"))
    assert (ARTIFACTS / "timeline.png").stat().st_size > 20_000
    if os.environ.get("ALTO_UPDATE_SCREENSHOTS") == "1":  # the README's, on purpose only
        shutil.copyfile(ARTIFACTS / "timeline.png", SCREENSHOT)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, json.dumps(severe, indent=1)
