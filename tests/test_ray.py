"""The Ray launcher on a real two-node Ray cluster on 127.0.0.1 (``tests/ray_cluster.py``).

One cluster for the module: a head and a second node with the custom resource ``node2``,
token authentication set explicitly, usage stats off, its own temp dir; only the processes
it started are stopped. ``alto serve`` runs in the test's trio run (``open_server``) with
``launcher = "ray"`` and connects to that cluster. Covered: the demo over TLS with
instances spread over both nodes and their logs prefixed in serve's stderr, the FacTool
pipeline with emulated LMs and one stage pinned to ``node2``, an actor killed in the middle
of requests, scaling up and down, resources the cluster can never provide (an error at
start) and an instance that cannot be placed (an error after ``pending_timeout``), no
process left after shutdown, and last the second node stopped (its instances lost, work
failed cleanly, replacements placed on the head).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import alto
from alto.examples.demo_pb2 import Number, Square, Total
from alto.testing import open_server

# Ray reads its authentication mode when it is imported, and alto serve (the Ray driver)
# runs in this process: the cluster's settings are this process's from the start.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(16),
    "RAY_DEDUP_LOGS": "0",
}
os.environ.update(RAY_ENV)
ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "ray-test-token"


@dataclass
class RayCluster:
    address: str
    proc: subprocess.Popen[str]

    def stop_node2(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop-node2\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"stopped": "node2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ray_cluster.py"), str(tmp)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(60)
        pytest.fail("the test Ray cluster did not start")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp))
        try:
            yield RayCluster(json.loads(line)["address"], proc)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: the helper shuts the whole cluster down
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(30)


def demo(tmp_path: Path, deploy: str, *, delay: float = 0.0) -> tuple[Path, Path]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "ray-{os.getpid()}"')
    text = text.replace("delay = 0.05", f"delay = {delay}")
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    d = tmp_path / "deploy.toml"
    d.write_text(deploy)
    return p, d


def deploy_text(cluster: RayCluster, body: str, **launcher: Any) -> str:
    opts = {"address": cluster.address, "pending_timeout": 20.0, **launcher}
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())
    return f'[runtime]\nlauncher = "ray"\nstop_timeout = 3.0\n[launcher]\n{table}\n{body}'


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def worker_pids(info: alto.ServeInfo) -> set[int]:
    return {i.pid for i in info.runtime.statistics().instances if i.pid and i.state == "ready"}


def nodes_of(info: alto.ServeInfo, stage: str) -> dict[int, str]:
    launcher: Any = info.runtime.launcher
    return {iid: h.node_id for iid, h in launcher.handles.items() if h.stage == stage}


async def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def ray_node_ids() -> tuple[str, str]:
    """(head, node2) node ids, from the driver's view."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = next(n["NodeID"] for n in nodes if "node2" not in n["Resources"])
    node2 = next(n["NodeID"] for n in nodes if "node2" in n["Resources"])
    return head, node2


async def test_demo_on_ray_over_tls(
    tmp_path: Path, cluster: RayCluster, capfd: pytest.CaptureFixture[str]
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    body = '[stages.square]\ninstances = 3\nplacement = "spread"\n[stages.total]\ninstances = 2\n'
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, body))
    async with open_server(
        pipeline, deploy, token=TOKEN, tcp="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key)
    ) as info:
        rt = info.runtime
        head, node2 = ray_node_ids()
        assert set(nodes_of(info, "square").values()) == {head, node2}  # spread
        async with alto.open_client(
            address=info.tcp_address, token=TOKEN, tls_ca=str(ca_path(tmp_path, ca))
        ) as client:
            squarers: set[int] = set()
            for n in (3, 10, 20):
                rs = await client.run(Number(value=n))
                assert [r.message.total for r in rs if isinstance(r.message, Total)] == [
                    sum(i * i for i in range(n))
                ]
                squarers |= {r.message.instance for r in rs if isinstance(r.message, Square)}
        assert squarers <= {i.id for i in rt.active_instances("square")}
        pids = worker_pids(info)
        assert len(pids) == 6
        ids = {(st, i.id) for st in ("square", "total") for i in rt.active_instances(st)}
    # every instance's log came back, with its prefix, its last lines included
    err = capfd.readouterr().err
    for stage, iid in ids:
        assert f"[{stage}/{iid}] " in err, (stage, iid)
    for pid in pids:
        assert not alive(pid), f"worker {pid} survived shutdown"


def ca_path(tmp_path: Path, ca: Any) -> Path:
    p = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return p


async def test_actor_killed_mid_request_is_replaced(tmp_path: Path, cluster: RayCluster) -> None:
    body = "[stages.square]\ninstances = 2\n"
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, body), delay=0.02)
    async with open_server(pipeline, deploy, token=TOKEN) as info:
        rt = info.runtime
        launcher: Any = rt.launcher
        victim = min(i.id for i in rt.active_instances("square"))
        outcomes: list[str] = []

        async def one() -> None:
            async with alto.open_client(address=f"unix:{info.socket_path}", token=TOKEN) as c:
                try:
                    rs = await c.run(Number(value=60))
                    totals = [r.message.total for r in rs if isinstance(r.message, Total)]
                    assert totals == [sum(i * i for i in range(60))]
                    outcomes.append("ok")
                except alto.RequestFailed as exc:
                    assert f"instance {victim}" in str(exc)  # the error names the instance
                    outcomes.append("failed")

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one)
            await wait_for(lambda: rt.instances[victim].queue_depth > 0, 30)
            actor = launcher.handles[victim].actor
            await trio.to_thread.run_sync(lambda: ray.kill(actor, no_restart=True))
        assert len(outcomes) == 4  # every request ended, in results or a named error
        assert rt.instances[victim].state == "crashed" if victim in rt.instances else True
        # the supervisor replaced it through the launcher
        await wait_for(
            lambda: len([i for i in rt.active_instances("square") if i.state == "ready"]) == 2
        )
        assert victim not in {i.id for i in rt.active_instances("square")}
        assert rt.supervisor.restarts >= 1
        async with alto.open_client(address=f"unix:{info.socket_path}", token=TOKEN) as c:
            rs = await c.run(Number(value=5))
            assert [r.message.total for r in rs if isinstance(r.message, Total)] == [30]


async def test_scale_up_and_down(tmp_path: Path, cluster: RayCluster) -> None:
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, ""))
    async with open_server(pipeline, deploy, token=TOKEN) as info:
        rt = info.runtime
        launcher: Any = rt.launcher
        await rt.scale("square", 3)
        await rt.wait_ready(60)
        assert len(rt.active_instances("square")) == 3
        assert len(nodes_of(info, "square")) == 3
        before = {i.pid for i in rt.statistics().instances if i.stage == "square" and i.pid}
        await rt.scale("square", 1)
        await wait_for(lambda: len(nodes_of(info, "square")) == 1)  # actors gone
        after = {
            i.pid for i in rt.statistics().instances if i.stage == "square" and i.state == "ready"
        }
        for pid in before - after:
            await wait_for(lambda pid=pid: not alive(pid), 20)
        assert len(launcher.handles) == 3  # generate, total, one square


async def test_resources_no_node_has_are_an_error_at_start(
    tmp_path: Path, cluster: RayCluster
) -> None:
    body = "[stages.square]\nresources = { island = 1 }\n"
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, body))
    with pytest.raises(alto.ConfigError, match=r"stages\.square: one instance needs .*island=1"):
        await start_only(pipeline, deploy)


async def test_an_instance_that_cannot_be_placed_fails_in_time(
    tmp_path: Path, cluster: RayCluster
) -> None:
    # each instance fits node2 alone; two cannot both fit: the second stays pending
    body = "[stages.square]\ninstances = 2\nresources = { node2 = 10 }\n"
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, body, pending_timeout=3.0))
    with pytest.raises(alto.AltoError, match="was not placed within 3 s"):
        await start_only(pipeline, deploy)


async def start_only(pipeline: Path, deploy: Path) -> None:
    try:
        with trio.fail_after(120):
            await alto.serve(
                pipeline,
                deploy,
                http=None,
                token=TOKEN,
                write_discovery=False,
                handle_signals=False,
                ready_timeout=60,
            )
    except BaseExceptionGroup as group:  # raised inside serve's nursery: its one error
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        raise leaf from None
    raise AssertionError("alto.serve returned")


@pytest.mark.llm
async def test_factool_emulated_with_a_stage_pinned_to_node2(
    tmp_path: Path, cluster: RayCluster
) -> None:
    pytest.importorskip("bm25s")
    pytest.importorskip("sentence_transformers")
    from alto.factool.factool_pb2 import Evidence, Question

    deploy = tmp_path / "factool.deploy.toml"
    text = (ROOT / "configs" / "factool-emulated.ray.toml").read_text()
    text = text.replace('address = ""', f'address = "{cluster.address}"')
    text = text.replace("# resources = { node2 = 1 }", "resources = { node2 = 1 }")
    assert "\nresources = { node2 = 1 }" in text
    deploy.write_text(text)
    async with open_server(ROOT / "configs" / "factool-emulated.toml", deploy, token=TOKEN) as info:
        _head, node2 = ray_node_ids()
        assert set(nodes_of(info, "rerank").values()) == {node2}
        async with alto.open_client(address=f"unix:{info.socket_path}", token=TOKEN) as c:
            rs = await c.run(Question(id="q1", question="Where did Super Bowl 50 take place?"))
        assert any(isinstance(r.message, Evidence) for r in rs)
        frames = info.runtime.statistics().frames_relayed
        assert frames > 10


async def test_second_node_stopped(tmp_path: Path, cluster: RayCluster) -> None:
    """Last in the module: it takes the second node away."""
    body = '[stages.square]\ninstances = 4\nplacement = "spread"\n'
    pipeline, deploy = demo(tmp_path, deploy_text(cluster, body), delay=0.01)
    async with open_server(pipeline, deploy, token=TOKEN) as info:
        rt = info.runtime
        head, node2 = ray_node_ids()
        on_node2 = {iid for iid, node in nodes_of(info, "square").items() if node == node2}
        assert on_node2  # spread put some there
        outcomes: list[str] = []

        async def one() -> None:
            async with alto.open_client(address=f"unix:{info.socket_path}", token=TOKEN) as c:
                try:
                    rs = await c.run(Number(value=80))
                    totals = [r.message.total for r in rs if isinstance(r.message, Total)]
                    assert totals == [sum(i * i for i in range(80))]
                    outcomes.append("ok")
                except alto.RequestFailed as exc:
                    assert "crashed" in str(exc) or "lost" in str(exc), exc
                    outcomes.append("failed")

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one)
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(cluster.stop_node2)
        assert len(outcomes) == 4
        # its instances were reported lost ...
        await wait_for(lambda: all(rt.instances[i].ended for i in on_node2 if i in rt.instances))
        # ... and replaced on the head, the only node left
        await wait_for(
            lambda: len([i for i in rt.active_instances("square") if i.state == "ready"]) == 4,
            90,
        )
        assert set(nodes_of(info, "square").values()) == {head}
        async with alto.open_client(address=f"unix:{info.socket_path}", token=TOKEN) as c:
            rs = await c.run(Number(value=6))
            assert [r.message.total for r in rs if isinstance(r.message, Total)] == [55]
        pids = worker_pids(info)
    for pid in pids:
        assert not alive(pid), f"worker {pid} survived shutdown"
