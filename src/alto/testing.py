"""Test helpers: run a whole pipeline inside the test's own Trio run, without processes.

As trio ships :mod:`trio.testing` and httpx ships ``MockTransport``, alto ships this module
so that users can test their own stages. :func:`open_pipeline` runs the real
:class:`~alto.dataplane.Runtime` and one real worker per stage instance in the calling
process. They talk over ``socketpair()`` connections, so every frame takes the same path
(codec, relay, scheduler, aggregation-aware routing, credits, group-closed) as under
``alto serve``; only the process launcher and the listening socket are left out::

    import trio
    from alto.testing import open_pipeline
    from alto.examples.demo_pb2 import Number, Total

    async def test_totals() -> None:
        async with open_pipeline("configs/demo.toml", instances={"square": 3}) as p:
            results = await p.run(Number(value=4))
        totals = [r.message for r in results if isinstance(r.message, Total)]
        assert [t.total for t in totals] == [0 + 1 + 4 + 9]

Everything the pipeline needs runs in one nursery, so it works with pytest-trio's
``autojump_clock`` fixture: a stage that ``await anyio.sleep(...)`` s costs virtual time
only (every byte between the in-process peers is already in the kernel when the run loop
looks for I/O, so the clock never jumps past a pending frame).

Stage entry points are imported by name (``module:callable``), as in a real deployment:
a stage defined in a test module must be importable (pytest's default ``prepend`` import
mode puts a conftest-less test directory on ``sys.path``). Every stage runs under Trio
here, whatever its ``backend``; stage code written on anyio, as the SDK is, does not
notice.

Errors: :func:`open_pipeline` raises ConfigError for a bad pipeline file or an
``instances`` entry naming no stage, StageError when a stage's entry cannot be built from
its options. A stage that raises while processing fails only its request
(``RequestFailed`` from :meth:`InProcessPipeline.run`), as in production.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio.abc
import trio
from google.protobuf.message import Message

from ._client import Client, Result
from ._config import (
    DeploymentConfig,
    PipelineConfig,
    RuntimeLimits,
    StageDeployment,
    load_pipeline,
)
from ._errors import ConfigError
from ._worker import Worker
from .dataplane._runtime import Runtime

__all__ = ["InProcessPipeline", "open_pipeline"]


@dataclass(frozen=True, eq=False)
class InProcessPipeline:
    """What :func:`open_pipeline` yields: the runtime, a connected client, and shortcuts."""

    runtime: Runtime
    client: Client
    pipeline: PipelineConfig

    def submit(self, message: Message) -> AsyncIterator[Result]:
        """Submit one request and yield its results as they arrive (see ``Client.submit``)."""
        return self.client.submit(message)

    async def run(self, message: Message) -> list[Result]:
        """Submit one request and return all its results in arrival order.

        Raises RequestFailed when a stage failed (the message names stage and instance)
        and OverloadedError when the runtime refused the request.
        """
        return await self.client.run(message)

    async def wait_ready(self) -> None:
        """Wait until no instance is starting (after ``runtime.scale(...)``, say).

        Raises AltoError naming an instance that failed to start.
        """
        await self.runtime.wait_ready()


class _InProcessLauncher:
    """Starts instances as tasks of the pipeline's nursery, each a real Worker talking to
    the runtime over a socketpair (the Launcher protocol of ``alto.dataplane``)."""

    def __init__(
        self, cfg: PipelineConfig, runtime: Runtime, token: str, nursery: trio.Nursery
    ) -> None:
        self.cfg, self.runtime, self.token, self.nursery = cfg, runtime, token, nursery
        self.scopes: dict[int, trio.CancelScope] = {}
        self.workers: dict[int, Worker] = {}

    def serve(self, sock: socket.socket) -> None:
        self.nursery.start_soon(
            self.runtime.handle_connection, trio.socket.from_stdlib_socket(sock)
        )

    def start(self, worker: Worker, iid: int) -> None:
        worker.instance = iid
        worker_end, served_end = socket.socketpair()
        self.serve(served_end)
        self.nursery.start_soon(self._run, worker, worker_end)

    async def _run(self, worker: Worker, sock: socket.socket) -> None:
        # What Worker.run does, over our socket instead of a connection to an address.
        assert worker.instance is not None
        iid = worker.instance
        with trio.CancelScope() as scope:
            self.scopes[iid] = scope
            wstream = await anyio.abc.UNIXSocketStream.from_socket(sock)
            async with wstream:
                await worker.handler.setup()
                try:
                    await worker._serve(wstream)
                finally:
                    with trio.CancelScope(shield=True):
                        await worker.handler.aclose()
        self.scopes.pop(iid, None)
        self.runtime.instance_exited(iid, 0)  # it got STOP, or the runtime closed

    async def spawn(self, stage: str, instance_id: int) -> None:
        cfg = self.cfg
        self.start(
            Worker(
                cfg, cfg.stages[stage], address="inproc", token=self.token, instance=instance_id
            ),
            instance_id,
        )

    def stop(self, instance_id: int) -> None:
        pass  # the worker got STOP and ends by itself

    async def shutdown(self) -> None:
        for scope in self.scopes.values():
            scope.cancel()


def _deployment(
    pipeline: PipelineConfig, instances: dict[str, int] | None, credits: int
) -> DeploymentConfig:
    where = "<open_pipeline>"
    if isinstance(credits, bool) or not isinstance(credits, int) or credits < 1:
        raise ConfigError(where, "credits", f"must be an integer >= 1, got {credits!r}")
    stages: dict[str, StageDeployment] = {}
    for name, n in (instances or {}).items():
        if name not in pipeline.stages:
            raise ConfigError(
                where,
                f"instances.{name}",
                f"no such stage in {pipeline.path}; stages: {', '.join(pipeline.stages)}",
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(where, f"instances.{name}", f"must be an integer >= 1, got {n!r}")
        stages[name] = StageDeployment(n)
    return DeploymentConfig(where, RuntimeLimits(credits=credits), stages)


@asynccontextmanager
async def open_pipeline(
    pipeline: str | Path,
    *,
    instances: dict[str, int] | None = None,
    credits: int = 64,
) -> AsyncIterator[InProcessPipeline]:
    """Run ``pipeline`` (a pipeline file) in this process until the block exits.

    ``instances`` maps stage names to instance counts (default one each); ``credits`` is
    every instance's limit of unacknowledged frames. The block is entered once every
    instance has registered with the runtime; on exit everything is cancelled, requests
    still in flight included, and every socket is closed.

    ``runtime.scale(stage, n)`` works too: new instances start in the same nursery (wait
    for them with :meth:`InProcessPipeline.wait_ready`), and drained ones stop when the
    runtime sends them STOP.

    Raises ConfigError for an invalid pipeline file or ``instances``; PluginError for an
    unknown scheduler; StageError when an entry point cannot be built from its options.
    Whatever a worker raises outside stage code (a failing ``setup()``, a protocol error)
    propagates out of the block.
    """
    cfg = load_pipeline(pipeline)
    deployment = _deployment(cfg, instances, credits)
    token = secrets.token_urlsafe(16)
    # Built before anything runs, so that a bad entry point or scheduler fails here,
    # plainly, rather than as a nursery's exception group.
    first = [
        Worker(cfg, stage, address="inproc", token=token, instance=None)
        for stage in cfg.stages.values()
        for _ in range(deployment.instances(stage.name))
    ]
    runtime = Runtime(cfg, deployment, token=token)
    client_end, runtime_end = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_end))
    client = Client(stream, token)

    # The client's socket is closed only once the nursery is done, so its reader task is
    # never woken by "another task closed this fd".
    async with stream, trio.open_nursery() as nursery:
        launcher = _InProcessLauncher(cfg, runtime, token, nursery)
        runtime.launcher = launcher  # so that runtime.scale() starts instances in this nursery
        try:
            await nursery.start(runtime.serve, ())
            for worker in first:
                launcher.start(worker, runtime.supervisor.new_instance(worker.stage.name).id)
            launcher.serve(runtime_end)
            await client._handshake()
            nursery.start_soon(client._reader)
            p = InProcessPipeline(runtime, client, cfg)
            await p.wait_ready()
            yield p
        finally:
            nursery.cancel_scope.cancel()
