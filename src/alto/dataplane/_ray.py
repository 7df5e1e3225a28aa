"""The Ray launcher: every stage instance is a Ray actor that owns one instance process.

``pip install 'alto[ray]'``, then ``alto serve PIPELINE --launcher ray`` (or ``[runtime]
launcher = "ray"``). Each instance is one actor (:class:`InstanceActor`) placed by Ray with
the stage's resources, running ``python -m alto._worker`` as its child, exactly as the
local launcher runs it: exit codes, signals and stage backends behave the same. The worker
connects back to the runtime over TCP (TLS when the runtime has a certificate) and says
HELLO with the runtime's token; nothing else travels through Ray.

What each piece does, and why:

* Resources: ``gpus`` (pipeline), ``cpus`` and custom ``resources`` (pipeline, overridden
  by the deployment) become the actor's ``num_gpus``, ``num_cpus`` (default 1) and
  ``resources``. Ray then sets ``CUDA_VISIBLE_DEVICES`` for the GPUs it grants; an actor
  granted none would see every GPU, so the worker gets ``CUDA_VISIBLE_DEVICES=""``. A
  cluster with no GPU at all runs GPU stages on CPUs with a warning, as the local launcher
  does on a machine without GPUs.
* Placement per stage (deployment ``placement``): ``spread`` uses Ray's SPREAD strategy;
  ``pack`` asks for the node that already runs most of the stage's instances (soft node
  affinity, so it falls back elsewhere when that node is full); unset is Ray's default.
* Fail fast: at start every stage's per-instance needs are checked against every alive
  node (a stage no node can ever hold is a ConfigError naming it), and a spawn whose actor
  is still pending after ``pending_timeout`` seconds fails (the supervisor reports it)
  instead of hanging: Ray itself waits silently for resources that may never come.
* Ray's own restarts are off (``max_restarts=0``, ``max_task_retries=0``): a restarted
  actor would say HELLO with an id the runtime already retired. alto's supervisor replaces
  crashed instances with new ids, as with the local launcher.
* Watching: one task polls every actor (``poll`` blocks in the actor up to
  ``POLL_SECONDS``), bringing back the worker's output and its exit code; a dead actor
  (``ray.kill``, its node gone) fails its poll. Either is reported through ``on_exit``
  within a second, and the actor is killed so that its CPU/GPU are released.
* Logs: the actor reads the worker's stdout and stderr; the poll brings the lines here,
  and they are written to ``alto serve``'s stderr with the ``[stage/instance]`` prefix,
  as local instances' are (no dependence on Ray's log forwarding or its de-duplication).
* Files: the pipeline file's text (and the CA the worker trusts) travel as actor
  arguments and are written into a private directory on the actor's node, so nothing
  depends on a path that exists only on the head. Stage code outside installed packages
  travels with Ray's ``runtime_env`` (``working_dir`` and ``py_modules`` options).
* Stopping: the worker runs in its own session (process group); ``stop`` past
  ``stop_timeout`` and ``shutdown`` signal the whole group (an engine's own children
  too: SIGTERM, then SIGKILL), then kill the actor. If the actor process itself dies, the
  kernel kills the worker (``PR_SET_PDEATHSIG``).

Options (the deployment's ``[launcher]`` table; ``--ray-address`` sets ``address``):

==================  ===========================================================
``address``         the cluster (``HOST:PORT`` of its GCS, ``auto``, ``ray://``);
                    empty: start a local cluster on 127.0.0.1 for this serve
``runtime_address`` ``HOST:PORT`` that instances dial to reach the runtime
                    (default: ``--tcp`` as bound; a wildcard host is replaced by
                    this node's address as Ray sees it)
``namespace``       Ray namespace of the actors (default ``alto``)
``working_dir``     a local directory shipped to every node (Ray runtime_env)
``py_modules``      local directories or packages shipped likewise
``pending_timeout`` seconds an instance may wait for resources (default 60)
``num_cpus``        CPUs of a local cluster started here (0: Ray's default)
==================  ===========================================================

Errors: ``create`` raises ConfigError for a bad option or a stage no node can hold, and
AltoError when the cluster cannot be reached. ``spawn`` raises AltoError naming the
stage, what it needs and what the cluster has when an instance cannot be placed in time.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray
import ray.exceptions
import trio
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._config import DeploymentConfig, PipelineConfig
from .._errors import AltoError, ConfigError
from ._launcher import ExitCallback, LaunchContext

log = logging.getLogger("alto.launcher")

__all__ = ["InstanceActor", "RayLauncher"]

POLL_SECONDS = 0.2  # how long one poll waits in the actor for output or an exit
MAX_PENDING_TIMEOUT = 3600.0
DRAIN_SECONDS = 2.0  # how long a stopped worker's last output is waited for
MAX_OUTPUT_CHUNK = 1 << 20  # bytes of worker output one poll brings back at most


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _keep_loopback() -> None:
    """Keep Ray on 127.0.0.1 for a cluster on this machine.

    On Linux Ray replaces a loopback node address (and a loopback cluster address) by the
    machine's interface address; that address must never be bound or dialled for a
    cluster that lives on this machine. Ray keeps loopback where it runs single-machine
    clusters (macOS, Windows): that switch, read at call time, is set here and in the
    environment that the processes Ray starts inherit.
    """
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The worker dies with its actor: a killed actor process leaves no worker behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class InstanceActor:
    """The actor side: owns one worker process on its node (see the module docstring).

    Plain class; :class:`RayLauncher` turns it into an actor with ``ray.remote``. Its
    methods run one at a time on the actor's main thread (the process that forked the
    worker must outlive it for ``PR_SET_PDEATHSIG``), so ``poll`` waits at most
    ``timeout`` seconds.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None
        self.output: deque[bytes] = deque()
        self.eof = False
        self.cond = threading.Condition()

    def start(self, env: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
        """Write ``files`` (name -> text; env values naming them are replaced by their
        paths) into a private directory, start the worker, return where it runs."""
        self.dir = tempfile.mkdtemp(prefix="alto-instance-")
        child_env = dict(os.environ)
        for k, v in env.items():
            if v in files:
                path = os.path.join(self.dir, v)
                Path(path).write_text(files[v])
                v = path
            child_env[k] = v
        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        child_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # "" with no GPU: none visible
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alto._worker"],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop signals all of it
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return {
            "pid": self.proc.pid,
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "gpus": gpus,
        }

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            with self.cond:
                self.output.append(chunk)
                self.cond.notify_all()
        self.proc.wait()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def poll(self, timeout: float) -> tuple[bytes, int | None]:
        """Output since the last poll, and the exit code once the worker has exited and
        all its output was read (None while it runs). Waits up to ``timeout`` for either."""
        with self.cond:
            if not self.output and not self.eof:
                self.cond.wait(timeout)
            out = b""
            while self.output and len(out) < MAX_OUTPUT_CHUNK:
                out += self.output.popleft()
            done = self.eof and not self.output
        rc = self.proc.returncode if done and self.proc is not None else None
        return out, rc

    def terminate(self, grace: float) -> int | None:
        """Stop the worker's whole process group: SIGTERM, SIGKILL after ``grace``."""
        proc = self.proc
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Its engine's children may outlive the worker in the group: end them too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        return proc.returncode


@dataclass(eq=False)
class _Handle:
    stage: str
    iid: int
    actor: Any
    prefix: bytes
    node_id: str = ""
    pid: int = 0
    pending: Any = None  # the poll in flight (an ObjectRef)
    partial: bytes = b""
    done: bool = False
    reaping: bool = False
    draining: bool = False  # being terminated: its output is read by _terminate, not _watch
    started_at: float = field(default_factory=time.monotonic)


class RayLauncher:
    """Instances as Ray actors (the ``ray`` entry point of ``alto.launchers``)."""

    option_defaults: ClassVar[Mapping[str, Any]] = {
        "address": "",
        "runtime_address": "",
        "namespace": "alto",
        "working_dir": "",
        "py_modules": [],
        "pending_timeout": 60.0,
        "num_cpus": 0,
    }
    needs_tcp: ClassVar[bool] = True

    def __init__(
        self,
        ctx: LaunchContext,
        options: Mapping[str, Any],
        actor_class: Any,
        runtime_address: str,
        drop_gpus: bool,
    ) -> None:
        self.pipeline: PipelineConfig = ctx.pipeline
        self.deployment: DeploymentConfig = ctx.deployment
        self.token = ctx.token
        self.tls_ca = ctx.tls_ca
        self.nursery = ctx.nursery
        self.on_exit: ExitCallback = ctx.on_exit
        self.options = dict(options)
        self.actor_class = actor_class
        self.runtime_address = runtime_address
        self.drop_gpus = drop_gpus
        self.stop_timeout = ctx.deployment.runtime.stop_timeout
        self.pending_timeout = float(options["pending_timeout"])
        self.handles: dict[int, _Handle] = {}
        self.pipeline_text = Path(ctx.pipeline.path).read_text()
        self._wake = trio.Event()
        self._closed = False

    # ------------------------------------------------------------------ creation

    @classmethod
    async def create(cls, ctx: LaunchContext, options: Mapping[str, Any]) -> RayLauncher:
        """Connect to the cluster (or start a local one), check that every stage fits a
        node, and start watching. Raises ConfigError, AltoError (see the module)."""
        where = ctx.deployment.path
        timeout = float(options["pending_timeout"])
        if not 0 < timeout <= MAX_PENDING_TIMEOUT:
            raise ConfigError(
                where,
                "launcher.pending_timeout",
                f"must be a positive number of seconds up to {MAX_PENDING_TIMEOUT:g}, got {timeout:g}",
            )
        num_cpus = options["num_cpus"]
        if not isinstance(num_cpus, int) or not 0 <= num_cpus <= 4096:
            raise ConfigError(where, "launcher.num_cpus", f"must be in 0..4096, got {num_cpus!r}")
        mods = options["py_modules"]
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            raise ConfigError(
                where, "launcher.py_modules", f"expected a list of paths, got {mods!r}"
            )
        if ctx.tcp_address is None:
            raise AltoError("the ray launcher needs the runtime's TCP listener (--tcp)")
        address = str(options["address"])
        init_kwargs: dict[str, Any] = {
            "namespace": str(options["namespace"]),
            "ignore_reinit_error": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,  # instance output comes back through poll()
        }
        runtime_env: dict[str, Any] = {}
        if options["working_dir"]:
            runtime_env["working_dir"] = str(options["working_dir"])
        if mods:
            runtime_env["py_modules"] = list(mods)
        if runtime_env:
            init_kwargs["runtime_env"] = runtime_env
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not address:
            # A cluster of our own, on this machine only: loopback, no dashboard, and an
            # explicit token (Ray would otherwise write one under ~/.ray).
            _keep_loopback()
            if "RAY_AUTH_MODE" not in os.environ:
                os.environ["RAY_AUTH_MODE"] = "token"
                os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
            init_kwargs.update(include_dashboard=False)
            if num_cpus:
                init_kwargs["num_cpus"] = num_cpus
        else:
            host = address.rpartition(":")[0].strip("[]") if "://" not in address else ""
            if _is_loopback(host):
                _keep_loopback()
            init_kwargs["address"] = address
        if ray.is_initialized():
            raise AltoError(
                "Ray is already initialized in this process; one alto serve per process"
            )
        try:
            await trio.to_thread.run_sync(lambda: ray.init(**init_kwargs))
        except Exception as exc:
            raise AltoError(
                f"cannot start or reach the Ray cluster {address or '(local)'}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            nodes = await trio.to_thread.run_sync(ray.nodes)
            drop_gpus = _check_fits(ctx.pipeline, ctx.deployment, nodes, address or "(local)")
            runtime_address = await _runtime_address(
                ctx.tcp_address, str(options["runtime_address"])
            )
            actor_class = ray.remote(max_restarts=0, max_task_retries=0)(InstanceActor)
        except BaseException:
            await trio.to_thread.run_sync(ray.shutdown)
            raise
        self = cls(ctx, options, actor_class, runtime_address, drop_gpus)
        ctx.nursery.start_soon(self._watch)
        log.info(
            "ray launcher: %d node(s) at %s; instances connect to %s",
            sum(1 for n in nodes if n.get("Alive")), address or "a local cluster", runtime_address,
        )  # fmt: skip
        return self

    # ------------------------------------------------------------------ spawning

    def _actor_options(self, stage: str) -> dict[str, Any]:
        need = self.deployment.resources(self.pipeline.stages[stage])
        opts: dict[str, Any] = {
            "num_cpus": need.pop("CPU", 1.0),
            "num_gpus": 0 if self.drop_gpus else need.pop("GPU", 0),
            "resources": {k: v for k, v in need.items() if k != "GPU"},
        }
        placement = self.deployment.placement(stage)
        if placement == "spread":
            opts["scheduling_strategy"] = "SPREAD"
        elif placement == "pack":
            nodes = [h.node_id for h in self.handles.values() if h.stage == stage and h.node_id]
            if nodes:
                home = max(set(nodes), key=nodes.count)
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(home, soft=True)
        return opts

    async def spawn(self, stage: str, instance_id: int) -> None:
        if self._closed:
            raise AltoError("the ray launcher is shutting down")
        opts = self._actor_options(stage)
        env = {
            "ALTO_ADDRESS": self.runtime_address,
            "ALTO_TOKEN": self.token,
            "ALTO_PIPELINE": "pipeline.toml",
            "ALTO_STAGE": stage,
            "ALTO_INSTANCE": str(instance_id),
            "ALTO_LOG_LEVEL": os.environ.get("ALTO_LOG_LEVEL", "INFO"),
            "PYTHONUNBUFFERED": "1",
        }
        files = {"pipeline.toml": self.pipeline_text}
        if self.tls_ca is not None:
            env["ALTO_TLS_CA"] = "ca.pem"
            files["ca.pem"] = self.tls_ca
        deadline = time.monotonic() + self.pending_timeout
        while True:
            handle, info = await self._place(stage, instance_id, opts, env, files, deadline)
            if info is not None:
                break
            # Its node died before the worker started (a node just lost, not yet known
            # dead to Ray when it was chosen): place it again, within pending_timeout.
            log.warning(
                "%s/%d: its node died before it started; placing it again", stage, instance_id
            )
            opts = self._actor_options(stage)
        handle.node_id, handle.pid = info["node_id"], info["pid"]
        log.info(
            "spawned %s/%d on node %s (%s, pid %d%s)",
            stage, instance_id, info["node_id"][:8], info["node_ip"], info["pid"],
            f", GPUs {','.join(info['gpus'])}" if info["gpus"] else "",
        )  # fmt: skip
        self._wake.set()

    async def _place(
        self,
        stage: str,
        instance_id: int,
        opts: dict[str, Any],
        env: dict[str, str],
        files: dict[str, str],
        deadline: float,
    ) -> tuple[_Handle, dict[str, Any] | None]:
        """Create the actor and start its worker; None as the info when its node died
        first and there is time left to place it again. Raises AltoError otherwise."""
        actor = await trio.to_thread.run_sync(lambda: self.actor_class.options(**opts).remote())
        handle = _Handle(stage, instance_id, actor, f"[{stage}/{instance_id}] ".encode())
        self.handles[instance_id] = handle
        ref = actor.start.remote(env, files)
        left = max(0.1, deadline - time.monotonic())
        try:
            info: dict[str, Any] = await trio.to_thread.run_sync(
                lambda: ray.get(ref, timeout=left), abandon_on_cancel=True
            )
        except ray.exceptions.GetTimeoutError:
            self._forget(handle)
            need = {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus", "resources")}
            raise AltoError(
                f"instance {stage}/{instance_id} was not placed within {self.pending_timeout:g} s "
                f"(launcher.pending_timeout): it needs {need}; the cluster has "
                f"{await trio.to_thread.run_sync(ray.available_resources)} available"
            ) from None
        except ray.exceptions.RayActorError as exc:
            self._forget(handle)
            if "node" in str(exc) and time.monotonic() < deadline - 1.0:
                return handle, None
            raise AltoError(f"instance {stage}/{instance_id} could not start: {exc}") from exc
        except ray.exceptions.RayError as exc:
            self._forget(handle)
            raise AltoError(f"instance {stage}/{instance_id} could not start: {exc}") from exc
        except BaseException:
            self._forget(handle)
            raise
        return handle, info

    def _forget(self, handle: _Handle) -> None:
        """Kill an actor that never started its worker (releases what it reserved)."""
        self.handles.pop(handle.iid, None)
        handle.done = True
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("ray.kill %s/%d: %s", handle.stage, handle.iid, exc)

    # ------------------------------------------------------------------ watching

    async def _watch(self) -> None:
        """Poll every started actor; report exits and deaths, relay output."""
        while True:
            live = [h for h in self.handles.values() if h.pid and not h.done and not h.draining]
            for h in live:
                if h.pending is None:
                    h.pending = h.actor.poll.remote(POLL_SECONDS)
            refs = [h.pending for h in live]
            if not refs:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            ready, _ = await trio.to_thread.run_sync(
                functools.partial(ray.wait, refs, num_returns=len(refs), timeout=POLL_SECONDS * 2),
                abandon_on_cancel=True,
            )
            done = set(ready)
            for h in live:
                if h.pending not in done:
                    continue
                ref, h.pending = h.pending, None
                try:
                    out, rc = ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError as exc:
                    # Killed, its node gone or unreachable: the worker is gone with it
                    # (or will be: PR_SET_PDEATHSIG). With restarts off it never returns.
                    self._emit(h, b"")
                    self._ended(h, None, f"its Ray actor died ({type(exc).__name__})")
                    continue
                self._emit(h, out)
                if rc is not None:
                    self._ended(h, rc, None)

    def _emit(self, h: _Handle, out: bytes) -> None:
        data = h.partial + out
        *lines, h.partial = data.split(b"\n")
        if len(h.partial) > MAX_OUTPUT_CHUNK:  # a line without end: write it as it is
            lines.append(h.partial)
            h.partial = b""
        if lines:
            sys.stderr.buffer.write(b"".join(h.prefix + line + b"\n" for line in lines))
            sys.stderr.flush()

    def _ended(self, h: _Handle, rc: int | None, why: str | None) -> None:
        if h.done:
            return
        h.done = True
        if h.partial:
            sys.stderr.buffer.write(h.prefix + h.partial + b"\n")
            h.partial = b""
        self.handles.pop(h.iid, None)
        if why is None:
            log.info("%s/%d exited with code %s", h.stage, h.iid, rc)
        else:
            log.warning("%s/%d: %s", h.stage, h.iid, why)
        # An actor whose worker has exited still holds its CPU/GPU until killed.
        self.nursery.start_soon(self._kill_actor, h)
        self.on_exit(h.iid, rc)

    async def _kill_actor(self, h: _Handle) -> None:
        try:
            await trio.to_thread.run_sync(lambda: ray.kill(h.actor, no_restart=True))
        except Exception as exc:
            log.debug("ray.kill %s/%d: %s", h.stage, h.iid, exc)

    # ------------------------------------------------------------------ stopping

    def stop(self, instance_id: int) -> None:
        """The worker got STOP; make sure it is gone after ``stop_timeout``."""
        h = self.handles.get(instance_id)
        if h is not None and not h.reaping:
            h.reaping = True
            self.nursery.start_soon(self._reap, h)

    async def _reap(self, h: _Handle) -> None:
        deadline = trio.current_time() + self.stop_timeout
        while not h.done and trio.current_time() < deadline:
            await trio.sleep(POLL_SECONDS)
        if not h.done:
            await self._terminate(h)

    async def _terminate(self, h: _Handle) -> None:
        """Signal the worker's process group in its actor, bring back the output it had
        not relayed yet (its last log lines), then kill the actor."""
        h.draining = True  # _watch leaves it alone from here on
        pending, h.pending = h.pending, None
        rc: int | None = None
        why: str | None = "it did not stop in time; its Ray actor was killed"
        try:
            rc = await trio.to_thread.run_sync(
                functools.partial(self._terminate_and_drain, h, pending),
                abandon_on_cancel=True,
            )
            if rc is not None:
                why = None
        except Exception as exc:  # the actor is gone or stuck: killing it ends the worker
            log.debug("terminate %s/%d: %s", h.stage, h.iid, exc)
        if self._closed:
            await self._kill_actor(h)
        else:
            self._ended(h, rc, why)  # reports the exit, kills the actor

    def _terminate_and_drain(self, h: _Handle, pending: Any) -> int | None:
        """(In a thread.) The actor runs one call at a time: the poll in flight, then the
        terminate, then polls until the worker's output has all been read."""
        terminate = h.actor.terminate.remote(self.stop_timeout)
        if pending is not None:
            out, _ = ray.get(pending, timeout=POLL_SECONDS * 2 + 5)
            self._emit(h, out)
        ray.get(terminate, timeout=2 * self.stop_timeout + 5)
        deadline = time.monotonic() + DRAIN_SECONDS
        rc: int | None = None
        while rc is None and time.monotonic() < deadline:
            out, rc = ray.get(h.actor.poll.remote(POLL_SECONDS), timeout=POLL_SECONDS * 2 + 5)
            self._emit(h, out)
        if h.partial:
            self._emit(h, b"\n")
        return rc

    async def shutdown(self) -> None:
        """Stop every instance (its whole process group), kill every actor, disconnect
        from the cluster (a local cluster started here stops)."""
        with trio.CancelScope(shield=True):
            self._closed = True
            async with trio.open_nursery() as n:
                for h in list(self.handles.values()):
                    n.start_soon(self._terminate, h)
            self.handles.clear()
            await trio.to_thread.run_sync(ray.shutdown)


def _check_fits(
    pipeline: PipelineConfig, deployment: DeploymentConfig, nodes: list[dict[str, Any]], where: str
) -> bool:
    """Raise ConfigError for a stage whose one instance no alive node can hold; warn when
    the deployment as a whole exceeds the cluster. Returns True when GPU requests are to
    be dropped (the cluster has no GPU at all: GPU stages run on CPUs, with a warning)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if not alive:
        raise AltoError(f"the Ray cluster {where} has no alive node")
    drop_gpus = not any(r.get("GPU", 0) for r in alive)
    gpu_stages = [s.name for s in pipeline.stages.values() if s.gpus]
    if drop_gpus and gpu_stages:
        log.warning("no GPU in the Ray cluster; stages %s run on CPUs", ", ".join(gpu_stages))
    total: dict[str, float] = {}
    for st in pipeline.stages.values():
        need = deployment.resources(st)
        need.setdefault("CPU", 1.0)
        if drop_gpus:
            need.pop("GPU", None)
        if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in alive):
            offers = "; ".join(
                ", ".join(f"{k}={v:g}" for k, v in sorted(r.items()) if k in need) or "none of it"
                for r in alive
            )
            raise ConfigError(
                deployment.path,
                f"stages.{st.name}",
                f"one instance needs {', '.join(f'{k}={v:g}' for k, v in need.items())}, "
                f"which no node of the Ray cluster {where} has (its nodes offer: {offers})",
            )
        for k, v in need.items():
            total[k] = total.get(k, 0) + v * deployment.instances(st.name)
    have = {k: sum(r.get(k, 0) for r in alive) for k in total}
    short = [f"{k} {total[k]:g} > {have[k]:g}" for k in total if total[k] > have[k]]
    if short:
        log.warning(
            "the deployment needs more than the Ray cluster has (%s): instances past it wait "
            "for resources, and fail after launcher.pending_timeout",
            ", ".join(short),
        )
    return drop_gpus


async def _runtime_address(tcp_address: str, configured: str) -> str:
    """What instances dial: ``configured``, else the TCP listener, with a wildcard host
    replaced by this node's address as the cluster sees it."""
    if configured:
        return configured
    host, _, port = tcp_address.rpartition(":")
    if host in ("0.0.0.0", "::", ""):
        host = await trio.to_thread.run_sync(ray.util.get_node_ip_address)
    return f"{host}:{port}"
