"""Launchers start and stop instance processes; the local one runs them on this machine.

The runtime's supervisor talks to a launcher through the small :class:`Launcher`
protocol: ``spawn`` an instance with the id the supervisor reserved, ``stop`` one that was
sent STOP (making sure it is gone after ``stop_timeout``), ``shutdown`` everything. The
launcher reports every exit back through the ``on_exit(instance_id, returncode)`` callback
it was built with, so the supervisor learns of a crash even before the connection breaks.

The local launcher: one OS process per stage instance, managed like a server's workers.

* Each instance runs ``python -m alto._worker`` with its settings in the environment and
  connects back over the runtime's UNIX socket.
* GPUs: a stage's ``gpus = N`` gives each instance N devices of its own through
  ``CUDA_VISIBLE_DEVICES`` (partitioned, never shared); with no GPU on the machine the
  instance gets ``CUDA_VISIBLE_DEVICES=""`` and a warning is logged.
* Output is relayed line by line with a ``[stage/instance]`` prefix.
* An instance that exits is reported to the runtime at once (its work fails with an
  error naming it, design.md invariant 4).
* Stopping: the runtime sends STOP and the worker exits by itself; past ``stop_timeout``
  the launcher sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import trio

from .._config import DeploymentConfig, PipelineConfig
from .._errors import ConfigError

log = logging.getLogger("alto.launcher")

__all__ = ["ExitCallback", "Launcher", "LocalLauncher", "detect_gpus", "plan_gpus"]

ExitCallback = Callable[[int, "int | None"], None]
"""``on_exit(instance_id, returncode)``: an instance process ended (None: unknown code)."""


class Launcher(Protocol):
    """What the supervisor needs of a launcher."""

    async def spawn(self, stage: str, instance_id: int) -> None:
        """Start an instance of ``stage`` that will register as ``instance_id``; return
        once it is started (not registered). Raises when it cannot be started."""

    def stop(self, instance_id: int) -> None:
        """The instance was sent STOP: make sure it is gone after ``stop_timeout``."""

    async def shutdown(self) -> None:
        """Stop every instance (terminate, then kill after ``stop_timeout``)."""


def detect_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids visible to us: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def plan_gpus(
    pipeline: PipelineConfig, deployment: DeploymentConfig, gpus: list[str]
) -> dict[str, list[list[str]]]:
    """Partition ``gpus`` among the instances that ask for them (stage -> per-instance ids).

    Raises ConfigError when GPUs exist but are too few for the deployment.
    """
    need = {
        s.name: (s.gpus, deployment.instances(s.name)) for s in pipeline.stages.values() if s.gpus
    }
    total = sum(g * n for g, n in need.values())
    plan: dict[str, list[list[str]]] = {}
    if not need or not gpus:
        if need:
            log.warning("no GPU found; stages %s run on the CPU", ", ".join(need))
        return plan
    if total > len(gpus):
        detail = ", ".join(f"{s}: {g} x {n}" for s, (g, n) in need.items())
        raise ConfigError(
            deployment.path,
            "stages",
            f"the deployment needs {total} GPUs ({detail}) but {len(gpus)} are visible",
        )
    it = iter(gpus)
    for s, (g, n) in need.items():
        plan[s] = [[next(it) for _ in range(g)] for _ in range(n)]
    return plan


class LocalLauncher:
    """Spawns and watches instance processes inside the caller's nursery."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        deployment: DeploymentConfig,
        address: str,
        token: str,
        nursery: trio.Nursery,
        on_exit: ExitCallback,
        *,
        gpus: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.deployment = deployment
        self.address = address
        self.token = token
        self.nursery = nursery
        self.on_exit = on_exit
        self.extra_env = dict(extra_env or {})
        self.gpu_plan = plan_gpus(pipeline, deployment, detect_gpus() if gpus is None else gpus)
        self.free_gpus: dict[str, list[list[str]]] = {s: list(v) for s, v in self.gpu_plan.items()}
        self.gpu_of: dict[int, list[str]] = {}
        self.processes: dict[int, trio.Process] = {}
        self.stop_timeout = deployment.runtime.stop_timeout

    async def spawn(self, stage: str, instance_id: int) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            ALTO_ADDRESS=self.address,
            ALTO_TOKEN=self.token,
            ALTO_PIPELINE=str(Path(self.pipeline.path).resolve()),
            ALTO_STAGE=stage,
            ALTO_INSTANCE=str(instance_id),
            PYTHONUNBUFFERED="1",
        )
        cfg = self.pipeline.stages[stage]
        if cfg.gpus:
            pool = self.free_gpus.get(stage)
            if pool:
                ids = pool.pop(0)
                self.gpu_of[instance_id] = ids
                env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            elif self.gpu_plan:
                raise ConfigError(
                    self.deployment.path,
                    f"stages.{stage}",
                    "no free GPUs left for another instance",
                )
            else:
                env["CUDA_VISIBLE_DEVICES"] = ""
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "alto._worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the runtime only; it stops the children
        )
        self.processes[instance_id] = proc
        log.info("spawned %s/%d (pid %d)", stage, instance_id, proc.pid)
        self.nursery.start_soon(self._watch, stage, instance_id, proc)

    async def _watch(self, stage: str, iid: int, proc: trio.Process) -> None:
        prefix = f"[{stage}/{iid}] ".encode()
        assert proc.stdout is not None
        pending = b""
        try:
            async for chunk in proc.stdout:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if lines:
                    sys.stderr.buffer.write(b"".join(prefix + line + b"\n" for line in lines))
                    sys.stderr.flush()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        rc = await proc.wait()
        if pending:
            sys.stderr.buffer.write(prefix + pending + b"\n")
        self.processes.pop(iid, None)
        ids = self.gpu_of.pop(iid, None)
        if ids is not None:
            self.free_gpus.setdefault(stage, []).append(ids)
        log.info("%s/%d exited with code %s", stage, iid, rc)
        self.on_exit(iid, rc)

    def stop(self, instance_id: int) -> None:
        """The worker got STOP; make sure it is gone after ``stop_timeout``."""
        proc = self.processes.get(instance_id)
        if proc is not None:
            self.nursery.start_soon(self._reap, proc)

    async def _reap(self, proc: trio.Process) -> None:
        with trio.move_on_after(self.stop_timeout):
            await proc.wait()
            return
        await self._terminate(proc)

    async def _terminate(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(self.stop_timeout):
                await proc.wait()
                return
            proc.kill()
            await proc.wait()

    async def shutdown(self) -> None:
        """Terminate every instance (SIGTERM, then SIGKILL after ``stop_timeout``)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as n:
                for proc in list(self.processes.values()):
                    n.start_soon(self._terminate, proc)
