"""The dashboard in Debian's chromium, driven by selenium, against the FakeRuntime.

The control plane runs in a background thread with its own ``trio.run`` while a load
generator posts requests through the HTTP ingress, so queue depths move. The test loads
the page, watches depths change, scales a stage up with the token and saves a screenshot to
``artifacts/dashboard.png``. A second test gives the pipeline edges that skip columns and
checks that every arrow stays visible, routed around the cards it does not connect, also
in a narrow window where the graph wraps onto two rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from browser_helpers import depths as shown_depths
from browser_helpers import hidden_edges, wait_until_fits
from control_fake import FakeRuntime
from trio_thread import TrioThread

from alto.control import serve_control
from alto.dataplane._stats import RuntimeStatistics

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver (chromium-driver)",
    ),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium"),
]

TOKEN = "browser-token"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WAIT_S = 15


class _ServerThread(TrioThread[int]):
    """serve_control plus a load generator, in a thread of its own (its own trio.run)."""

    thread_name = "alto-control-test"

    def __init__(self, fake: FakeRuntime) -> None:
        super().__init__()
        self.fake = fake
        self.port = 0

    async def main(self, ready: Callable[[int], None]) -> None:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(
                partial(serve_control, self.fake, "127.0.0.1", 0, token=TOKEN, stream_interval=0.1)
            )
            for seed in range(6):
                nursery.start_soon(self._load, port, seed)
            ready(port)

    async def _load(self, port: int, seed: int) -> None:
        rng = random.Random(seed)
        words = "claims queries passages evidence verdict answer context prompt".split()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as client:
            if seed == 0:  # one failing request, so the errors panel has something to show
                await client.post(
                    "/v1/pipelines/wordcount/requests?stream=false",
                    json={"text": "unscorable", "fail": True},
                )
            while True:
                text = " ".join(rng.choices(words, k=rng.randint(2, 6)))
                await client.post(
                    "/v1/pipelines/wordcount/requests?stream=false", json={"text": text}
                )
                await trio.sleep(rng.uniform(0.0, 0.3))


@pytest.fixture
def server() -> Iterator[_ServerThread]:
    thread = _ServerThread(FakeRuntime(step_delay=0.12))
    thread.port = thread.start()
    try:
        yield thread
    finally:
        thread.stop()


class _SkippingRuntime(FakeRuntime):
    """The wordcount pipeline, plus edges that skip columns, as in the demo pipeline
    (``square --partials--> sink`` past ``total``): ``score`` and ``split`` also write to
    the sink, past ``sum`` and past ``score`` and ``sum``."""

    def statistics(self) -> RuntimeStatistics:
        stats = super().statistics()
        skipping = (("score", "scores", "sink"), ("split", "words", "sink"))
        return dataclasses.replace(stats, edges=(*stats.edges, *skipping))


@pytest.fixture
def skipping_server() -> Iterator[_ServerThread]:
    thread = _ServerThread(_SkippingRuntime(step_delay=0.12))
    thread.port = thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def test_dashboard(server: _ServerThread, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    driver.get(f"http://127.0.0.1:{server.port}/")

    # The graph: three stages with their instances, and the arrows between them.
    sum_instances = '.stage[data-stage="sum"] .instance'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, sum_instances)) == 1)
    stages = [
        e.get_attribute("data-stage") for e in driver.find_elements(By.CSS_SELECTOR, ".stage")
    ]
    assert stages == ["split", "score", "sum"]
    assert len(driver.find_elements(By.CSS_SELECTOR, '.stage[data-stage="score"] .instance')) == 2
    assert len(driver.find_elements(By.CSS_SELECTOR, "#edges path[data-edge]")) == 4
    wait.until(lambda d: d.find_element(By.ID, "conn").text == "live")

    # Queue depths move while requests flow.
    seen: list[dict[str, str]] = []

    def depths_changed(d: Any) -> bool:
        depths = shown_depths(d)
        if not seen or depths != seen[-1]:
            seen.append(depths)
        values = {int(v) for snapshot in seen for v in snapshot.values()}
        return len(seen) >= 3 and max(values) >= 1

    wait.until(depths_changed)

    # Throughput and latency percentiles come from the stream.
    wait.until(lambda d: d.find_element(By.ID, "lat-p50").text not in ("", "–"))
    assert float(driver.find_element(By.ID, "req-rate").text) >= 0
    wait.until(lambda d: "unscorable" in d.find_element(By.ID, "errors").text)

    # Without the token, scaling is refused and the page says why.
    scale_up = driver.find_element(
        By.CSS_SELECTOR, '.stage[data-stage="sum"] [data-action="scale-up"]'
    )
    scale_up.click()
    wait.until(lambda d: "401" in d.find_element(By.ID, "toast").text)
    assert server.fake.stages["sum"].target == 1

    # With the token (kept in localStorage), a new instance appears.
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    assert driver.execute_script("return localStorage.getItem('alto.token')") == TOKEN
    scale_up.click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, sum_instances)) == 2)
    assert server.fake.stages["sum"].target == 2
    count = driver.find_element(By.CSS_SELECTOR, '.stage[data-stage="sum"] .count').text
    assert count.endswith("/ 2")
    assert hidden_edges(driver) == []

    # Let the sparklines and charts gather a few seconds of history, then keep a picture.
    wait.until(lambda d: len(seen) >= 1 and d.execute_script("return performance.now()") > 6000)
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # The 401 of the refused scale is expected; nothing else may fail.
    unexpected = [e for e in severe if "401" not in e["message"]]
    assert not unexpected, json.dumps(unexpected, indent=1)
    assert os.path.getsize(ARTIFACTS / "dashboard.png") > 10_000


def test_dashboard_routes_edges_around_skipped_columns(
    skipping_server: _ServerThread, driver: Any
) -> None:
    """An edge that skips a column must not run behind the card in between."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    driver.get(f"http://127.0.0.1:{skipping_server.port}/")
    score = '.stage[data-stage="score"] .instance'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, score)) == 2)
    wait.until(lambda d: d.find_element(By.ID, "conn").text == "live")
    # (read in one script: the arrows are redrawn with every update)
    edges = set(
        driver.execute_script(
            "return [...document.querySelectorAll('#edges path[data-edge]')]"
            ".map((p) => p.dataset.edge)"
        )
    )
    assert {"score->sink", "split->sink", "sum->sink", "score->sum"} <= edges
    assert len(edges) == 6
    assert hidden_edges(driver) == []

    # A taller card in between (one more instance) moves the detours down with it.
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(
        By.CSS_SELECTOR, '.stage[data-stage="score"] [data-action="scale-up"]'
    ).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, score)) == 3)
    assert hidden_edges(driver) == []

    # And in a narrow window, where the graph wraps onto a second row: the arrows from
    # one row to the next run around the cards too, and nothing scrolls sideways.
    driver.set_window_size(900, 1100)
    wait.until(lambda d: d.execute_script("return document.body.clientWidth") < 1000)
    wait_until_fits(driver)
    assert driver.execute_script("return document.querySelectorAll('#columns > .row').length") > 1
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard-skipping.png"))

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, json.dumps(severe, indent=1)
