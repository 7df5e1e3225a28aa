"""Launchers start and stop instance processes; the local one runs them on this machine.

The runtime's supervisor talks to a launcher through the small :class:`Launcher`
protocol: ``spawn`` an instance with the id the supervisor reserved, ``stop`` one that was
sent STOP (making sure it is gone after ``stop_timeout``), ``shutdown`` everything. The
launcher reports every exit back through the ``on_exit(instance_id, returncode)`` callback
it was built with, so the supervisor learns of a crash even before the connection breaks.

Launchers are plugins: entry points in the group ``alto.launchers`` (``local``, this
module's :class:`LocalLauncher`, and ``ray``, :class:`alto.dataplane._ray.RayLauncher`),
chosen by name with ``[runtime] launcher = "NAME"`` in the deployment file or
``alto serve --launcher NAME`` (the flag wins), with options from the deployment's
``[launcher]`` table. An entry point names a class (see :class:`LauncherClass`) with:

* ``option_defaults``: every option it accepts and its default. Any other key of the
  ``[launcher]`` table is a ConfigError naming the key and the allowed ones, and so is a
  value whose type differs from its default's (a default of None accepts any type);
* ``needs_tcp``: True when its instances reach the runtime over TCP (another machine):
  ``alto serve`` then listens on ``127.0.0.1:0`` when no ``--tcp`` was given;
* ``async create(ctx, options) -> Launcher``, a classmethod: build and prepare it (connect
  to a cluster, check that the deployment fits) before any instance starts. ``ctx`` is a
  :class:`LaunchContext`; ``options`` are the defaults updated with the table. Raises
  ConfigError for an option's bad value or a deployment that can never be placed, AltoError
  when the launcher cannot start.

:func:`open_launcher` does all of that; ``alto serve`` and the tests call it.

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

import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import trio

from .._config import DeploymentConfig, PipelineConfig
from .._errors import ConfigError, PluginError, UnknownPluginError

log = logging.getLogger("alto.launcher")

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExitCallback",
    "LaunchContext",
    "Launcher",
    "LauncherClass",
    "LocalLauncher",
    "available_launchers",
    "detect_gpus",
    "load_launcher",
    "open_launcher",
    "plan_gpus",
]

ENTRY_POINT_GROUP = "alto.launchers"
OUTPUT_DRAIN_SECONDS = 2.0  # how long shutdown waits for stopped instances' last output

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


@dataclass(frozen=True, eq=False)
class LaunchContext:
    """What ``alto serve`` hands a launcher class's ``create``."""

    pipeline: PipelineConfig
    deployment: DeploymentConfig
    token: str  # every instance presents it in HELLO
    address: str  # "unix:/path": the runtime's UNIX socket, for instances on this machine
    tcp_address: str | None  # "HOST:PORT" as bound by --tcp (or for needs_tcp); else None
    # PEM text that instances must trust to reach ``tcp_address`` over TLS (the CA, or the
    # runtime's own certificate, pinned); None: the TCP listener is plain.
    tls_ca: str | None
    nursery: trio.Nursery  # for the launcher's own tasks (watchers); lives as long as it
    on_exit: ExitCallback


class LauncherClass(Protocol):
    """What an ``alto.launchers`` entry point names (see the module docstring)."""

    option_defaults: ClassVar[Mapping[str, Any]]
    needs_tcp: ClassVar[bool]

    @classmethod
    async def create(cls, ctx: LaunchContext, options: Mapping[str, Any]) -> Launcher: ...


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    # Looked up on each call, so that tests can monkeypatch entry_points.
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def available_launchers() -> list[str]:
    """The names registered in the ``alto.launchers`` entry point group, sorted."""
    return sorted(_entry_points())


def load_launcher(name: str) -> LauncherClass:
    """The launcher class registered as ``name``.

    Raises UnknownPluginError (listing the registered names) or PluginError (it cannot be
    imported, e.g. ``ray`` without ``pip install 'alto[ray]'``, or is not a launcher class).
    """
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        raise UnknownPluginError(ENTRY_POINT_GROUP, name, list(eps))
    try:
        cls = ep.load()
    except Exception as exc:
        hint = f" (install it: pip install 'alto[{name}]')" if isinstance(exc, ImportError) else ""
        raise PluginError(
            ENTRY_POINT_GROUP,
            name,
            f"cannot import {ep.value!r}: {type(exc).__name__}: {exc}{hint}",
        ) from exc
    for attr in ("option_defaults", "needs_tcp", "create"):
        if not hasattr(cls, attr):
            raise PluginError(
                ENTRY_POINT_GROUP, name, f"{ep.value!r} is not a launcher class (no {attr!r})"
            )
    return cast(LauncherClass, cls)


def check_options(
    name: str, cls: LauncherClass, options: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """``cls``'s defaults updated with ``options``. Raises ConfigError naming the file
    ``where`` and the ``launcher.KEY`` that is unknown or of the wrong type."""
    defaults = dict(cls.option_defaults)
    for k, v in options.items():
        if k not in defaults:
            allowed = ", ".join(sorted(defaults)) or "(none)"
            raise ConfigError(
                where, f"launcher.{k}", f"unknown option of launcher {name!r}; allowed: {allowed}"
            )
        d = defaults[k]
        if d is not None and v is not None:
            want: tuple[type, ...] = (int, float) if type(d) in (int, float) else (type(d),)
            if not isinstance(v, want) or (isinstance(v, bool) and not isinstance(d, bool)):
                raise ConfigError(
                    where,
                    f"launcher.{k}",
                    f"expected {' or '.join(t.__name__ for t in want)}, got {v!r}",
                )
    defaults.update(options)
    return defaults


async def open_launcher(
    name: str, ctx: LaunchContext, options: Mapping[str, Any], *, where: str = "<command line>"
) -> Launcher:
    """Load launcher ``name``, check ``options`` and create it (see the module docstring).

    Raises UnknownPluginError, PluginError, ConfigError, or what its ``create`` raises.
    """
    cls = load_launcher(name)
    return await cls.create(ctx, check_options(name, cls, options, where))


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

    option_defaults: ClassVar[Mapping[str, Any]] = {}
    needs_tcp: ClassVar[bool] = False

    @classmethod
    async def create(cls, ctx: LaunchContext, options: Mapping[str, Any]) -> LocalLauncher:
        """The ``local`` entry point: instances connect over the runtime's UNIX socket."""
        return cls(ctx.pipeline, ctx.deployment, ctx.address, ctx.token, ctx.nursery, ctx.on_exit)

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
        # Set when an instance's output has been read to its end (see shutdown).
        self._watching: dict[int, trio.Event] = {}
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
        self._watching[instance_id] = trio.Event()
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
        finally:
            read = self._watching.pop(iid, None)
            if read is not None:
                read.set()
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
            # Their last output (a failed start's traceback, say) may still sit in the
            # pipes: let the watchers read it to the end before serve cancels them.
            with trio.move_on_after(OUTPUT_DRAIN_SECONDS):
                for read in list(self._watching.values()):
                    await read.wait()
