"""Liveness (``GET /healthz``) and readiness (``GET /readyz``).

Readiness is decided from one statistics snapshot (:func:`alto.control._probes.readiness`),
tested here on hand-made snapshots, then over HTTP against the in-memory FakeRuntime (with
a token configured: the probes must answer without one) and against a real ``alto serve``
of the demo pipeline whose only ``generate`` instance is killed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from control_fake import FakeRuntime, crash_instance, start_instance

from alto.control import serve_control
from alto.control._probes import readiness
from alto.dataplane._stats import (
    InstanceState,
    InstanceStatistics,
    RuntimeStatistics,
    StageStatistics,
)
from alto.testing import open_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "probe-token"


# -- readiness from a snapshot ---------------------------------------------------------


def _instance(iid: int, stage: str, state: InstanceState, error: str | None = None) -> Any:
    return InstanceStatistics(
        instance_id=iid,
        stage=stage,
        state=state,
        queue_depth=0,
        credits=4,
        backlog=0,
        open_groups=0,
        frames_in=0,
        frames_out=0,
        pid=None,
        last_error=error,
    )


def _stats(*instances: InstanceStatistics, stages: tuple[str, ...] = ("a", "b")) -> Any:
    return RuntimeStatistics(
        pipeline="p",
        time=0.0,
        stages=tuple(
            StageStatistics(
                name=name,
                scheduler="least-outstanding",
                stateful=False,
                aggregate_level=None,
                fanout=False,
                inputs=(),
                outputs=(),
                instances=tuple(
                    i.instance_id
                    for i in instances
                    if i.stage == name and i.state not in ("stopped", "crashed")
                ),
                target_instances=2,
                frames_processed=0,
                errors=0,
            )
            for name in stages
        ),
        instances=instances,
        requests_in_flight=0,
        requests_submitted=0,
        requests_completed=0,
        requests_failed=0,
        requests_refused=0,
        frames_relayed=0,
        max_inflight_requests=8,
        scale_events=0,
    )


def test_ready_when_every_stage_has_a_ready_instance() -> None:
    state = readiness(
        _stats(
            _instance(1, "a", InstanceState.READY),
            _instance(2, "a", InstanceState.CRASHED, "exit code -9"),  # an old crash
            _instance(3, "b", InstanceState.READY),
            _instance(4, "b", InstanceState.STARTING),
        )
    )
    assert state.ready
    assert state.to_json() == {"status": "ready", "ready_instances": {"a": 1, "b": 1}}


def test_a_stage_without_a_ready_instance_is_named_with_why() -> None:
    state = readiness(
        _stats(
            _instance(1, "a", InstanceState.READY),
            _instance(2, "b", InstanceState.CRASHED, "exit code -9"),
            _instance(5, "b", InstanceState.CRASHED, "lost connection"),
            _instance(6, "b", InstanceState.STARTING),
            _instance(3, "b", InstanceState.STOPPED, "an old stop: not counted"),
        )
    )
    assert not state.ready
    body = state.to_json()
    assert body["status"] == "not ready"
    assert body["ready_instances"] == {"a": 1, "b": 0}
    assert body["stages"] == [
        {
            "stage": "b",
            "target_instances": 2,
            "instances": {"crashed": 2, "starting": 1},
            "reason": "1 instance starting, 2 instances crashed; instance 5: lost connection",
            "last_error": "lost connection",
        }
    ]


@pytest.mark.parametrize(
    ("instances", "reason"),
    [
        ((), "no instances (target 2)"),
        ((_instance(7, "b", InstanceState.DRAINING),), "1 instance draining"),
        ((_instance(7, "b", InstanceState.STOPPED),), "no instances (target 2)"),
    ],
    ids=["none", "draining", "stopped"],
)
def test_reasons(instances: tuple[InstanceStatistics, ...], reason: str) -> None:
    state = readiness(_stats(_instance(1, "a", InstanceState.READY), *instances))
    assert [(s.stage, s.reason, s.last_error) for s in state.not_ready] == [("b", reason, None)]


# -- over HTTP, against the fake -------------------------------------------------------


@pytest.fixture
async def fake_server(
    nursery: trio.Nursery,
) -> AsyncIterator[tuple[FakeRuntime, httpx.AsyncClient]]:
    fake = FakeRuntime()
    port = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield fake, client


async def test_healthz(fake_server: tuple[FakeRuntime, httpx.AsyncClient]) -> None:
    fake, client = fake_server
    crash_instance(fake, 1, "exit code 1")  # liveness does not depend on the pipeline
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "ok"}


async def test_readyz_follows_the_instances(
    fake_server: tuple[FakeRuntime, httpx.AsyncClient],
) -> None:
    fake, client = fake_server
    response = await client.get("/readyz")  # no Authorization header, a token configured
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "ready_instances": {"split": 1, "score": 2, "sum": 1},
    }

    crash_instance(fake, 1, "RuntimeError: model file missing")  # split's only instance
    crash_instance(fake, 2, "exit code -9")  # score keeps instance 3
    response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["ready_instances"] == {"split": 0, "score": 1, "sum": 1}
    assert body["stages"] == [
        {
            "stage": "split",
            "target_instances": 1,
            "instances": {"crashed": 1},
            "reason": "1 instance crashed; instance 1: RuntimeError: model file missing",
            "last_error": "RuntimeError: model file missing",
        }
    ]

    replacement = start_instance(fake, "split")
    body = (await client.get("/readyz")).json()
    assert body["stages"][0]["instances"] == {"crashed": 1, "starting": 1}
    fake.instances[replacement].state = InstanceState.READY
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200


class _BrokenStatistics(FakeRuntime):
    def statistics(self) -> RuntimeStatistics:
        raise RuntimeError("the runtime is gone")


async def test_readyz_when_statistics_fail(nursery: trio.Nursery) -> None:
    port = await nursery.start(partial(serve_control, _BrokenStatistics(), "127.0.0.1", 0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {
            "status": "not ready",
            "error": "statistics failed: RuntimeError: the runtime is gone",
        }
        assert (await client.get("/healthz")).status_code == 200


# -- against a real alto serve ---------------------------------------------------------


def _demo(tmp_path: Path) -> tuple[Path, Path]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "probes-{os.getpid()}"')
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(text)
    deploy = tmp_path / "deploy.toml"
    deploy.write_text("[runtime]\nstop_timeout = 2.0\n[stages.square]\ninstances = 2\n")
    return pipeline, deploy


async def _wait_for_status(client: httpx.AsyncClient, status: int) -> httpx.Response:
    while True:
        response = await client.get("/readyz")
        if response.status_code == status:
            return response
        await trio.sleep(0.02)


@pytest.mark.slow
async def test_probes_against_a_real_serve(tmp_path: Path) -> None:
    pipeline, deploy = _demo(tmp_path)
    async with open_server(pipeline, deploy, http="127.0.0.1:0", token=TOKEN) as info:
        assert info.http_url is not None
        async with httpx.AsyncClient(base_url=info.http_url, timeout=10) as client:
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["ready_instances"] == {"generate": 1, "square": 2, "total": 1}

            # generate's only instance dies: not ready until its replacement registers
            # (after a back-off of 0.25 s and a process start).
            victim = next(i for i in info.runtime.statistics().instances if i.stage == "generate")
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            with trio.fail_after(30):
                response = await _wait_for_status(client, 503)
            body = response.json()
            assert [s["stage"] for s in body["stages"]] == ["generate"]
            assert body["ready_instances"]["square"] == 2
            assert "crashed" in body["stages"][0]["instances"]
            assert "crashed" in body["stages"][0]["reason"]
            assert body["stages"][0]["last_error"]  # why the instance ended
            assert (await client.get("/healthz")).status_code == 200  # still alive

            with trio.fail_after(60):
                response = await _wait_for_status(client, 200)
            assert response.json()["ready_instances"]["generate"] == 1
