"""Limits that hold under hostile use, against a real ``alto serve`` of the demo pipeline.

- ``POST /api/stages/square/scale {"instances": 100000}`` with a valid token is refused at
  once with a 409 naming the limit, starts nothing, and the server stays healthy; so is a
  count that fits the stage but not the runtime, and ``alto scale square 100000`` prints one
  line naming the limit and exits non-zero.
- A scale within the limits answers at once with the new target while the new instances
  are still starting (their ``setup()`` waits for a gate the test opens), and
  ``/api/instances`` and the SSE stream show them ``starting``, then ``ready``.
- The dashboard's scale control shows a refusal (Debian's chromium).
- A deployment file past the limits is a ConfigError naming the key, and ``alto serve``
  ends with that one line.
- Replacements after crashes never take the runtime past ``[runtime] max_instances``.

Limit refusals are 409 (the request is well-formed; the runtime's limits refuse it), as is
draining a stage's last instance and scaling a runtime that has no launcher.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio
from httpx_sse import aconnect_sse
from trio_thread import TrioThread

import alto
from alto._config import default_max_instances, load_deployment, load_pipeline
from alto._errors import ConfigError
from alto.examples import demo

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]
TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AT_ONCE = 10.0  # seconds: a bound on an answer that must not wait for instances to start


class GatedSquare:
    """The demo's ``square``, whose ``setup()`` waits until the file named by
    ``ALTO_TEST_GATE`` exists: the test decides when new instances may become ready."""

    def __init__(self, **options: object) -> None:
        pass

    async def setup(self) -> None:
        gate = Path(os.environ["ALTO_TEST_GATE"])
        while not gate.exists():
            await anyio.sleep(0.05)

    async def process(self, msg: Any, ctx: alto.Context) -> None:
        await demo.square(msg, ctx)


def write_demo(tmp_path: Path, *, square: str | None = None) -> Path:
    text = (ROOT / "configs" / "demo.toml").read_text()
    name = f"limits-{os.getpid()}-{tmp_path.name[-12:]}"
    replacements = [('name = "demo"', f'name = "{name}"'), ("delay = 0.05", "delay = 0.0")]
    if square is not None:
        replacements.append(('entry = "alto.examples.demo:square"', f'entry = "{square}"'))
    for old, new in replacements:
        assert old in text, f"configs/demo.toml changed: no {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def write_deploy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text("[runtime]\nstop_timeout = 2.0\n" + text)
    return path


@asynccontextmanager
async def serving(
    pipeline: Path, deploy: Path | None
) -> AsyncIterator[tuple[alto.ServeInfo, httpx.AsyncClient]]:
    """A real ``alto serve`` (instance processes, HTTP on a free port, a token).

    ``alto.serve`` itself rather than ``alto.testing.open_server``: these tests also run
    against a checkout from before the limits (which had no ``open_server``), and must
    fail there on the limits, not on an import."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            info: alto.ServeInfo = await nursery.start(
                lambda task_status: alto.serve(
                    pipeline,
                    deploy,
                    http="127.0.0.1:0",
                    token=TOKEN,
                    write_discovery=False,
                    handle_signals=False,
                    task_status=task_status,
                )
            )
        assert info.http_url is not None
        try:
            async with httpx.AsyncClient(
                base_url=info.http_url, headers=AUTH, timeout=30
            ) as client:
                yield info, client
        finally:
            nursery.cancel_scope.cancel()


def children() -> set[int]:
    """Live processes this one started (the instances of an in-process ``alto serve``)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def running(info: alto.ServeInfo, stage: str | None = None) -> list[Any]:
    """Instances that are starting, ready or draining (a process exists or is coming)."""
    return [
        i
        for i in info.runtime.statistics().instances
        if str(i.state) in ("starting", "ready", "draining") and stage in (None, i.stage)
    ]


async def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll ``check`` (a function, or an async one) until it returns something truthy."""
    with trio.move_on_after(timeout):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def total_of(client: httpx.AsyncClient, name: str, n: int) -> int:
    answer = await client.post(f"/v1/pipelines/{name}/requests?stream=false", json={"value": n})
    assert answer.status_code == 200 and answer.json()["status"] == "done", answer.text
    totals = [r["output"] for r in answer.json()["results"] if r["queue"] == "totals"]
    assert len(totals) == 1, totals
    return int(totals[0].get("total", 0))


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# -- scaling past the limits -------------------------------------------------------------


@pytest.mark.slow
async def test_scale_past_a_limit_is_refused_at_once_and_starts_nothing(tmp_path: Path) -> None:
    pipeline = write_demo(tmp_path)
    name = load_pipeline(pipeline).name
    limit = default_max_instances()  # no deployment file: the defaults hold
    async with serving(pipeline, None) as (info, client):
        before = info.runtime.statistics()
        processes = children()
        assert len(processes) == 3

        with trio.fail_after(AT_ONCE):
            answer = await client.post("/api/stages/square/scale", json={"instances": 100000})
        assert answer.status_code == 409, answer.text
        assert error_of(answer) == (
            f"stage 'square' may have at most {limit} instances (its max_instances); "
            "asked for 100000"
        )
        # Within the stage's limit, past the runtime's: generate and total hold 2 of them.
        with trio.fail_after(AT_ONCE):
            answer = await client.post("/api/stages/square/scale", json={"instances": limit - 1})
        assert answer.status_code == 409, answer.text
        error = error_of(answer)
        assert f"at most {limit} instance processes ([runtime] max_instances)" in error, error
        assert f"'square' can have at most {limit - 2}" in error, error

        # The CLI: one line naming the limit, a non-zero exit. Past 4096, the largest
        # max_instances any deployment may set, it does not ask the server.
        def scale(n: int) -> subprocess.CompletedProcess[str]:
            url = str(info.http_url)
            return subprocess.run(
                [*ALTO, "scale", "square", str(n), "--url", url, "--token", TOKEN],
                capture_output=True,
                text=True,
                timeout=60,
            )

        cli = await trio.to_thread.run_sync(scale, 100000)
        assert cli.returncode == 2 and cli.stdout == "", (cli.returncode, cli.stdout, cli.stderr)
        assert cli.stderr.splitlines() == [
            "alto scale: error: argument instances: expected an integer in 1..4096, "
            "not 100000 (see alto scale --help)"
        ], cli.stderr
        cli = await trio.to_thread.run_sync(scale, 1000)
        assert cli.returncode == 1 and cli.stdout == "", (cli.returncode, cli.stdout, cli.stderr)
        assert cli.stderr.splitlines() == [
            f"alto: error: HTTP 409: stage 'square' may have at most {limit} instances "
            "(its max_instances); asked for 1000"
        ], cli.stderr

        # Nothing was started, nothing changed.
        after = info.runtime.statistics()
        assert after.instances == before.instances
        assert after.scale_events == before.scale_events
        assert [s.target_instances for s in after.stages] == [1, 1, 1]
        assert children() == processes
        # And the server is healthy: the probes, and an exact answer.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert await total_of(client, name, 6) == sum(i * i for i in range(6))


@pytest.mark.slow
async def test_scale_within_limits_answers_while_the_instances_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "gate"
    gate.touch()  # open for the first instance
    monkeypatch.setenv("ALTO_TEST_GATE", str(gate))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    )
    pipeline = write_demo(tmp_path, square="test_limits:GatedSquare")
    name = load_pipeline(pipeline).name
    deploy = write_deploy(tmp_path, "[stages.square]\ninstances = 1\nmax_instances = 3\n")
    async with serving(pipeline, deploy) as (info, client):
        seen: dict[int, list[str]] = {}  # instance id -> the states the stream showed, in order

        async def watch(task_status: trio.TaskStatus[None]) -> None:
            async with aconnect_sse(client, "GET", "/api/stream") as source:
                task_status.started()
                async for event in source.aiter_sse():
                    if event.event != "stats":
                        continue
                    for inst in json.loads(event.data)["instances"]:
                        states = seen.setdefault(inst["id"], [])
                        if not states or states[-1] != inst["state"]:
                            states.append(inst["state"])

        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            old = {i.instance_id for i in info.runtime.statistics().instances}
            gate.unlink()  # new instances cannot become ready now

            with trio.fail_after(AT_ONCE):
                answer = await client.post("/api/stages/square/scale", json={"instances": 3})
            assert answer.status_code == 200, answer.text
            stage = answer.json()
            assert stage["target_instances"] == 3 and stage["max_instances"] == 3, stage
            new = set(stage["instances"]) - old
            assert len(new) == 2 and len(stage["instances"]) == 3, stage
            listed = (await client.get("/api/instances")).json()["instances"]
            assert {i["id"]: i["state"] for i in listed if i["id"] in new} == dict.fromkeys(
                new, "starting"
            )
            await until(
                lambda: _shown(seen, new, "starting"),
                "the stream to show the new instances starting",
            )

            gate.touch()

            async def ready() -> bool:
                listed = (await client.get("/api/instances")).json()["instances"]
                return all(i["state"] == "ready" for i in listed if i["id"] in new)

            await until(ready, "the new instances to register")
            await until(
                lambda: _shown(seen, new, "ready"),
                "the stream to show the new instances ready",
            )
            for iid in new:
                assert seen[iid] == ["starting", "ready"], (iid, seen[iid])

            # One past the stage's limit: refused, nothing started.
            with trio.fail_after(AT_ONCE):
                answer = await client.post("/api/stages/square/scale", json={"instances": 4})
            assert answer.status_code == 409, answer.text
            assert error_of(answer) == (
                "stage 'square' may have at most 3 instances (its max_instances); asked for 4"
            )
            assert len(running(info, "square")) == 3
            assert await total_of(client, name, 8) == sum(i * i for i in range(8))
            nursery.cancel_scope.cancel()


def _shown(seen: dict[int, list[str]], ids: set[int], state: str) -> bool:
    return all(seen.get(iid, [""])[-1] == state for iid in ids)


# -- replacements within the limits -------------------------------------------------------


@pytest.mark.slow
async def test_replacements_after_crashes_never_exceed_the_limits(tmp_path: Path) -> None:
    pipeline = write_demo(tmp_path)
    name = load_pipeline(pipeline).name
    # generate 1 + square 2 + total 1: the runtime's whole allowance of 4 processes.
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(
        "[runtime]\nstop_timeout = 2.0\nmax_instances = 4\n[stages.square]\ninstances = 2\n"
    )
    async with serving(pipeline, deploy) as (info, client):
        most = {"instances": 0, "processes": 0}

        def count() -> int:
            """Instances the runtime runs or starts; and, as a check on its books, the live
            processes it has not written off (a drained instance that closed its connection
            has stopped while its process takes a moment to exit)."""
            stats = info.runtime.statistics()
            now = len(running(info))
            ended = {i.pid for i in stats.instances if str(i.state) in ("stopped", "crashed")}
            most["instances"] = max(most["instances"], now)
            most["processes"] = max(most["processes"], len(children() - ended))
            return now

        assert count() == 4
        victim = running(info, "square")[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)

        async def crashed() -> bool:
            count()
            states = {i.instance_id: str(i.state) for i in info.runtime.statistics().instances}
            return states[victim.instance_id] == "crashed"

        await until(crashed, "the runtime to notice the crash")
        # During the replacement's back-off, another stage takes the freed process.
        answer = await client.post("/api/stages/total/scale", json={"instances": 2})
        assert answer.status_code == 200, answer.text
        # The replacement finds the runtime full and starts nothing. (Its back-off is 0.25 s;
        # watch for 8 times as long.)
        with trio.move_on_after(2.0):
            while True:
                assert count() <= 4
                await trio.sleep(0.01)
        assert len(running(info, "square")) == 1
        assert info.runtime.statistics().restarts == 0
        # Full: one more square is refused, naming the runtime's limit.
        answer = await client.post("/api/stages/square/scale", json={"instances": 2})
        assert answer.status_code == 409 and "[runtime] max_instances" in error_of(answer)

        # Room again (total back to 1): square may have its second instance.
        assert (
            await client.post("/api/stages/total/scale", json={"instances": 1})
        ).status_code == 200
        await until(
            lambda: count() == 3,
            "a total instance to drain",
        )
        assert (
            await client.post("/api/stages/square/scale", json={"instances": 2})
        ).status_code == 200

        async def square_ready() -> bool:
            count()
            return [str(i.state) for i in running(info, "square")] == ["ready", "ready"]

        await until(square_ready, "two ready square instances")
        # A crash with room to spare is replaced, and still within the limits.
        victim = running(info, "square")[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)

        async def replaced() -> bool:
            count()
            return info.runtime.statistics().restarts == 1 and await square_ready()

        await until(replaced, "the crashed instance to be replaced")
        assert max(most.values()) <= 4, most
        assert await total_of(client, name, 7) == sum(i * i for i in range(7))


# -- deployment files past the limits -------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("[stages.square]\ninstances = 100000\n", "stages.square.instances", "must be at most"),
        ("[runtime]\nmax_instances = 100000\n", "runtime.max_instances", "at most 4096"),
        ("[runtime]\nmax_instances = 0\n", "runtime.max_instances", ">= 1"),
        (
            "[runtime]\nmax_instances = 8\n[stages.square]\ninstances = 9\n",
            "stages.square.instances",
            "at most 8",
        ),
        (
            "[stages.square]\nmax_instances = 2\ninstances = 3\n",
            "stages.square.instances",
            "at most 2",
        ),
        (
            "[runtime]\nmax_instances = 8\n[stages.square]\nmax_instances = 9\n",
            "stages.square.max_instances",
            "at most 8",
        ),
        (
            "[runtime]\nmax_instances = 4\n[stages.square]\ninstances = 2\n[stages.total]\ninstances = 2\n",
            "stages",
            "5 instances in all",
        ),
        ("[runtime]\ncredits = 1000000000\n", "runtime.credits", "at most"),
        (
            "[runtime]\nmax_inflight_requests = 1000000000\n",
            "runtime.max_inflight_requests",
            "at most",
        ),
        ("[runtime]\nbacklog_limit = 1000000000\n", "runtime.backlog_limit", "at most"),
        ("[runtime]\nmax_frame_size = 100000000000\n", "runtime.max_frame_size", "at most"),
        ("[runtime]\nstop_timeout = 100000.0\n", "runtime.stop_timeout", "up to"),
        ("[stages.square]\ncredits = 1000000000\n", "stages.square.credits", "at most"),
    ],
)
def test_a_deployment_past_the_limits_is_a_config_error(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    pipeline = load_pipeline(ROOT / "configs" / "demo.toml")
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_deployment(deploy, pipeline)
    assert err.value.key == key, str(err.value)
    assert words in err.value.message, str(err.value)
    assert str(err.value).startswith(f"{deploy}: {key}: ")


def test_alto_serve_ends_with_one_line_for_a_deployment_past_the_limits(tmp_path: Path) -> None:
    pipeline = write_demo(tmp_path)
    deploy = write_deploy(tmp_path, "[stages.square]\ninstances = 100000\n")
    result = subprocess.run(
        [*ALTO, "serve", str(pipeline), "--deploy", str(deploy), "--no-http"],
        env=dict(os.environ, ALTO_RUN_DIR=str(tmp_path / "run")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"alto: error: {deploy}: stages.square.instances: must be at most "
        f"{default_max_instances()}, got 100000; allowed: 1..{default_max_instances()}"
    ], result.stderr


# -- the dashboard shows a refusal ------------------------------------------------------------


class _ServerThread(TrioThread[alto.ServeInfo]):
    """``alto.serve`` with HTTP and a token in a thread of its own (the browser test is
    synchronous)."""

    thread_name = "alto-limits-serve"
    start_timeout = 180.0

    def __init__(self, pipeline: Path, deploy: Path) -> None:
        super().__init__()
        self.pipeline, self.deploy = pipeline, deploy

    async def main(self, ready: Callable[[alto.ServeInfo], None]) -> None:
        async with trio.open_nursery() as nursery:
            info: alto.ServeInfo = await nursery.start(
                lambda task_status: alto.serve(
                    self.pipeline,
                    self.deploy,
                    http="127.0.0.1:0",
                    token=TOKEN,
                    write_discovery=False,
                    handle_signals=False,
                    task_status=task_status,
                )
            )
            ready(info)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (chromium-driver)",
)
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium")
def test_the_dashboard_shows_a_refused_scale(tmp_path: Path, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pipeline = write_demo(tmp_path)
    deploy = write_deploy(tmp_path, "[stages.square]\ninstances = 2\nmax_instances = 2\n")
    with _ServerThread(pipeline, deploy) as info:
        wait = WebDriverWait(driver, 20, poll_frequency=0.1)
        driver.get(f"{info.http_url}/")
        square = '.stage[data-stage="square"]'
        wait.until(lambda d: d.find_element(By.ID, "conn").text == "live")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{square} .count").text == "2 / 2")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        plus = driver.find_element(By.CSS_SELECTOR, f'{square} [data-action="scale-up"]')
        assert "at most 2" in (plus.get_attribute("title") or "")
        plus.click()
        refusal = f"{square} .scale-refusal"
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, refusal).is_displayed())
        text = driver.find_element(By.CSS_SELECTOR, refusal).text
        assert text == (
            "Scaling refused: 409: stage 'square' may have at most 2 instances "
            "(its max_instances); asked for 3"
        ), text
        assert "409" in driver.find_element(By.ID, "toast").text
        # Nothing was started; the card still says 2 of 2.
        stages = httpx.get(f"{info.http_url}/api/pipeline", timeout=10).json()["stages"]
        square_stage = next(s for s in stages if s["name"] == "square")
        assert len(square_stage["instances"]) == 2 and square_stage["target_instances"] == 2
        assert driver.find_element(By.CSS_SELECTOR, f"{square} .count").text == "2 / 2"
        # A scale that succeeds clears the refusal.
        driver.find_element(By.CSS_SELECTOR, f'{square} [data-action="scale-down"]').click()
        wait.until(lambda d: not d.find_element(By.CSS_SELECTOR, refusal).is_displayed())
        severe = [
            e
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "409" not in e["message"]
        ]
        assert not severe, severe
