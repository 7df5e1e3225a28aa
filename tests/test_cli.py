"""The command line and process management, with real processes: `alto serve` and
`alto submit` as subprocesses, SIGTERM stopping everything cleanly, remote instances over
TCP with the shared token, an asyncio-backend stage, and GPU partitioning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import alto
from alto._config import DeploymentConfig, RuntimeLimits, StageDeployment, load_pipeline
from alto.dataplane import InstanceState
from alto.dataplane._launcher import detect_gpus, plan_gpus
from alto.examples.demo_pb2 import Number, Square, Total
from alto.testing import open_server

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]  # the console script of this environment


def demo_copy(tmp_path: Path, name: str, *, backend: str | None = None) -> tuple[Path, Path]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "{name}"').replace("delay = 0.05", "delay = 0.0")
    if backend:
        text = text.replace(
            'entry = "alto.examples.demo:square"',
            f'entry = "alto.examples.demo:square"\nbackend = "{backend}"',
        )
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    d = tmp_path / "deploy.toml"
    d.write_text("[runtime]\nstop_timeout = 3.0\n[stages.square]\ninstances = 2\n")
    return p, d


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(x) for x in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


@pytest.mark.slow
def test_serve_submit_and_sigterm(tmp_path: Path) -> None:
    pipeline, deploy = demo_copy(tmp_path, f"cli-{os.getpid()}")
    env = dict(os.environ, ALTO_RUN_DIR=str(tmp_path / "run"), PYTHONUNBUFFERED="1")
    disc = tmp_path / "run" / f"cli-{os.getpid()}.json"
    serve = subprocess.Popen(
        [*ALTO, "serve", str(pipeline), "--deploy", str(deploy), "--no-http"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not disc.exists():
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            assert time.monotonic() < deadline, "alto serve did not become ready"
            time.sleep(0.1)
        info = json.loads(disc.read_text())
        assert (os.stat(Path(info["socket"]).parent).st_mode & 0o777) == 0o700
        assert (os.stat(disc).st_mode & 0o777) == 0o600
        workers = children_of(serve.pid)
        assert len(workers) == 4  # generate 1, square 2, total 1

        out = subprocess.run(
            [*ALTO, "submit", f"cli-{os.getpid()}", '{"value": 4}', '{"value": 3}'],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        totals = {x["input"]: x["output"] for x in lines if x.get("queue") == "totals"}
        assert totals == {0: {"total": "14", "count": "4", "instance": totals[0]["instance"]},
                          1: {"total": "5", "count": "3", "instance": totals[1]["instance"]}}  # fmt: skip
        assert sum(1 for x in lines if x.get("done")) == 2

        bad = subprocess.run(
            [*ALTO, "submit", f"cli-{os.getpid()}", '{"nope": 1}'],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "does not fit alto.examples.demo.Number" in bad.stderr, (
            bad.stderr
        )
        assert "Traceback" not in bad.stderr

        serve.send_signal(signal.SIGTERM)
        rc = serve.wait(timeout=30)
        log = serve.stdout.read() if serve.stdout else ""
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert rc == 0, log
    assert "received SIGTERM, stopping" in log
    assert "[square/" in log  # instance output is relayed with a stage/instance prefix
    assert not disc.exists()
    assert not Path(info["socket"]).parent.exists()
    for pid in workers:
        assert not alive(pid), f"worker {pid} survived"


async def test_remote_instance_over_tcp_with_token(tmp_path: Path) -> None:
    pipeline, deploy = demo_copy(tmp_path, f"tcp-{os.getpid()}")
    async with open_server(pipeline, deploy, tcp="127.0.0.1:0", token="s3cret") as info:
        assert info.tcp_address is not None
        env = {k: v for k, v in os.environ.items() if k != "ALTO_TOKEN"}
        # a wrong token: the worker is refused and exits with an error
        refused = await trio.run_process(
            [*ALTO, "worker", "--pipeline", str(pipeline), "--stage", "square", "--connect", info.tcp_address, "--token", "wrong"],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert b"refused" in refused.stderr + refused.stdout
        rt = info.runtime
        # the right token: a remote instance joins the stage
        remote = await trio.lowlevel.open_process(
            [*ALTO, "worker", "--pipeline", str(pipeline), "--stage", "square", "--connect", info.tcp_address, "--token", "s3cret"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with trio.fail_after(60):
                while (
                    len(
                        [
                            i
                            for i in rt.statistics().instances
                            if i.stage == "square" and i.state == "ready"
                        ]
                    )
                    < 3
                ):
                    await trio.sleep(0.05)
            remote_id = max(i.instance_id for i in rt.statistics().instances if i.stage == "square")
            seen: set[int] = set()
            async with alto.open_client(address=info.tcp_address, token="s3cret") as client:
                for _ in range(8):
                    rs = await client.run(Number(value=12))
                    assert [r.message.total for r in rs if isinstance(r.message, Total)] == [506]
                    seen |= {r.message.instance for r in rs if isinstance(r.message, Square)}
            assert remote_id in seen  # the remote instance did work
            with pytest.raises(alto.AuthenticationError):
                async with alto.open_client(address=info.tcp_address, token="nope"):
                    pass
        finally:
            remote.kill()
            await remote.wait()


async def test_asyncio_backend_stage(tmp_path: Path) -> None:
    pipeline, deploy = demo_copy(tmp_path, f"aio-{os.getpid()}", backend="asyncio")
    assert load_pipeline(pipeline).stages["square"].backend == "asyncio"
    async with open_server(pipeline, deploy) as info:
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
            with trio.fail_after(60):
                rs = await client.run(Number(value=10))
        assert [r.message.total for r in rs if isinstance(r.message, Total)] == [285]


def test_gpu_partitioning(tmp_path: Path) -> None:
    text = (
        (ROOT / "configs" / "demo.toml")
        .read_text()
        .replace(
            'entry = "alto.examples.demo:square"', 'entry = "alto.examples.demo:square"\ngpus = 2'
        )
    )
    (tmp_path / "p.toml").write_text(text)
    pipe = load_pipeline(tmp_path / "p.toml")
    dep = DeploymentConfig("d.toml", RuntimeLimits(), {"square": StageDeployment(2)})
    plan = plan_gpus(pipe, dep, ["0", "1", "2", "3", "4"])
    assert plan == {"square": [["0", "1"], ["2", "3"]]}  # disjoint, per instance
    with pytest.raises(alto.ConfigError, match="needs 4 GPUs"):
        plan_gpus(pipe, dep, ["0", "1", "2"])
    assert plan_gpus(pipe, dep, []) == {}  # no GPU: the CPU, with a warning
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


async def test_a_killed_instance_is_replaced(tmp_path: Path) -> None:
    pipeline, deploy = demo_copy(tmp_path, f"restart-{os.getpid()}")
    async with open_server(pipeline, deploy) as info:
        rt = info.runtime
        victim = next(i for i in rt.statistics().instances if i.stage == "square")
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        with trio.fail_after(30):  # noticed at once, replaced after a short back-off
            while True:
                states = {
                    i.instance_id: i.state for i in rt.statistics().instances if i.stage == "square"
                }
                if (
                    states[victim.instance_id] == InstanceState.CRASHED
                    and list(states.values()).count(InstanceState.READY) == 2
                ):
                    break
                await trio.sleep(0.05)
        assert rt.statistics().restarts == 1
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
            rs = await client.run(Number(value=6))
        assert [r.message.total for r in rs if isinstance(r.message, Total)] == [55]
