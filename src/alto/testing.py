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

Two more helpers, for tests that need more than a pipeline in the test's process:

* :func:`open_server` runs ``alto serve`` (real instance processes, real sockets) in the
  test's nursery and yields its :class:`~alto.ServeInfo`; leaving the block stops it;
* :class:`FakePeer` is a hand-played peer of a runtime (an instance or a client) over a
  socketpair or a real socket: the test decides every byte, so malformed frames, bogus
  acknowledgements and misbehaving consumers are exact. ``benchmarks/relay_bench.py``
  plays its producer and consumers with it too.

Errors: :func:`open_pipeline` raises ConfigError for a bad pipeline file or an
``instances`` entry naming no stage, StageError when a stage's entry cannot be built from
its options. A stage that raises while processing fails only its request
(``RequestFailed`` from :meth:`InProcessPipeline.run`), as in production.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.abc
import trio
from google.protobuf.message import Message

from ._client import Client, Result
from ._config import (
    DeploymentConfig,
    PipelineConfig,
    RuntimeLimits,
    StageDeployment,
    load_deployment,
    load_pipeline,
)
from ._errors import ConfigError
from ._serve import ServeInfo, serve
from ._worker import Worker
from .dataplane._frames import PROTOCOL_VERSION, SIZE, Frame, FrameKind, encode
from .dataplane._peer import PeerConnection
from .dataplane._runtime import Runtime
from .dataplane._tls import TLSSocket
from .dataplane._tracing import SpanExport

__all__ = ["FakePeer", "InProcessPipeline", "open_pipeline", "open_server", "walk_frames"]

_WAIT = 5.0  # default bound, in seconds, on a FakePeer waiting for something that must come


@dataclass(frozen=True, eq=False)
class InProcessPipeline:
    """What :func:`open_pipeline` yields: the runtime, a connected client, and shortcuts."""

    runtime: Runtime
    client: Client
    pipeline: PipelineConfig

    def submit(
        self, message: Message, *, timeout: float | None = None, traceparent: str | None = None
    ) -> AsyncGenerator[Result, None]:
        """Submit one request and yield its results as they arrive (see ``Client.submit``:
        leaving the loop early cancels the request)."""
        return self.client.submit(message, timeout=timeout, traceparent=traceparent)

    async def run(
        self, message: Message, *, timeout: float | None = None, traceparent: str | None = None
    ) -> list[Result]:
        """Submit one request and return all its results in arrival order.

        Raises RequestFailed when a stage failed (the message names stage and instance)
        and OverloadedError when the runtime refused the request.
        """
        return await self.client.run(message, timeout=timeout, traceparent=traceparent)

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
                await worker._serve(wstream)
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
    limits: RuntimeLimits | None = None,
    trace_exporter: SpanExport | None = None,
    deployment: str | Path | None = None,
) -> AsyncIterator[InProcessPipeline]:
    """Run ``pipeline`` (a pipeline file) in this process until the block exits.

    ``instances`` maps stage names to instance counts (default one each); ``credits`` is
    every instance's limit of unacknowledged frames; ``limits`` replaces the runtime's
    limits wholesale (``credits`` is then ignored); ``trace_exporter`` receives finished
    traces (see ``alto.dataplane._otel``); ``deployment`` names a deployment file to use
    instead of ``instances`` and ``credits`` (autoscaling, limits, per-stage settings). The block is entered once every
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
    if deployment is not None:
        if instances is not None:
            raise ConfigError(
                "<open_pipeline>", "instances", "give instances or deployment, not both"
            )
        deploy = load_deployment(deployment, cfg)
    else:
        deploy = _deployment(cfg, instances, credits)
    if limits is not None:
        deploy = DeploymentConfig(deploy.path, limits, deploy.stages)
    token = secrets.token_urlsafe(16)
    # Built before anything runs, so that a bad entry point or scheduler fails here,
    # plainly, rather than as a nursery's exception group.
    first = [
        Worker(cfg, stage, address="inproc", token=token, instance=None)
        for stage in cfg.stages.values()
        for _ in range(deploy.instances(stage.name))
    ]
    runtime = Runtime(cfg, deploy, token=token, trace_exporter=trace_exporter)
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


@asynccontextmanager
async def open_server(
    pipeline: str | Path,
    deploy: str | Path | None = None,
    *,
    http: str | None = None,
    **options: Any,
) -> AsyncIterator[ServeInfo]:
    """Run ``alto serve`` for ``pipeline`` in this trio run until the block exits.

    Instances are real processes (the local launcher), the runtime listens on a real UNIX
    socket (and on TCP/HTTP when ``tcp=``/``http=`` say so: HTTP is off unless given). The
    discovery file is not written and signals are left alone, so several servers can run
    in one test. Other keyword arguments go to :func:`alto.serve` (``token``, ``tcp``,
    ``ready_timeout``...). Raises what ``serve`` raises at start-up (ConfigError,
    AltoError naming an instance that failed to start).
    """
    async with trio.open_nursery() as nursery:
        options.setdefault("write_discovery", False)
        options.setdefault("handle_signals", False)

        async def run(task_status: trio.TaskStatus[ServeInfo]) -> None:
            await serve(pipeline, deploy, http=http, task_status=task_status, **options)

        info: ServeInfo = await nursery.start(run)
        try:
            yield info
        finally:
            nursery.cancel_scope.cancel()


def walk_frames(
    buf: bytes | bytearray | memoryview, end: int
) -> tuple[list[tuple[int, int, int]], int]:
    """The complete frames in ``buf[:end]`` as ``(kind, offset, frame_end)``, and the
    offset of the first incomplete one: a header walk without decoding, for peers that
    must keep up with the relay (benchmarks)."""
    out: list[tuple[int, int, int]] = []
    off = 0
    unpack = SIZE.unpack_from
    while end - off >= 4:
        fend = off + 4 + unpack(buf, off)[0]
        if fend > end:
            break
        out.append((buf[off + 4], off, fend))
        off = fend
    return out, off


class FakePeer:
    """One hand-played connection to a runtime: send raw bytes, read decoded frames.

    Make one with :meth:`attach` (a socketpair whose other end ``runtime`` serves, as an
    accepted connection) or :meth:`connect` (a real socket to a serving runtime). Every
    wait is bounded (``timeout``, default 5 s) and fails the test with TooSlowError.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.peer = PeerConnection(self.send, self._receive_some, max_frame_size=1 << 30)
        self.id = 0  # the instance id from WELCOME, for instances
        self.welcome: dict[str, Any] = {}

    @classmethod
    def attach(cls, runtime: Runtime, nursery: trio.Nursery) -> FakePeer:
        mine, theirs = socket.socketpair()
        nursery.start_soon(runtime.handle_connection, trio.socket.from_stdlib_socket(theirs))
        return cls(trio.socket.from_stdlib_socket(mine))

    @classmethod
    async def connect(cls, address: str, *, ssl_context: ssl.SSLContext | None = None) -> FakePeer:
        """``unix:/path`` or ``HOST:PORT``; with ``ssl_context`` (a client context, e.g.
        ``alto.dataplane._tls.client_context(ca_file)``) the TCP connection speaks TLS,
        and ``sock`` is a :class:`~alto.dataplane._tls.TLSSocket` (``recv_into`` and
        ``send`` as on a plain socket; the handshake happens on the first of them)."""
        if address.startswith("unix:"):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(address[5:])
        else:
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            await sock.connect((host, int(port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = TLSSocket(sock, ssl_context, server_side=False, server_hostname=host)
        return cls(sock)

    async def _receive_some(self) -> bytes:
        try:
            return await self.sock.recv(1 << 20)
        except OSError:
            return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def hello(self, token: str, **body: Any) -> Frame:
        """Send HELLO with ``token`` and ``body``; return the answer (WELCOME or REFUSED)."""
        hello = {"protocol": PROTOCOL_VERSION, "token": token, **body}
        await self.send(encode(FrameKind.HELLO, [0], payload=json.dumps(hello).encode()))
        frame = await self.expect()
        if frame.kind == FrameKind.WELCOME:
            self.welcome = json.loads(frame.payload)
            self.id = int(self.welcome.get("instance", 0))
        return frame

    async def instance(
        self, token: str, stage: str, iid: int | None = None, *, ready: bool = True
    ) -> FakePeer:
        """Register as an instance of ``stage``; with ``ready`` (HELLO's ``ready: true``),
        ready for work at once (a worker says READY when its set-up is done; until then no
        work is routed to it; a fake has nothing to set up). Fails the test when refused."""
        frame = await self.hello(token, role="instance", stage=stage, instance=iid, ready=ready)
        assert frame.kind == FrameKind.WELCOME, frame
        return self

    async def client(self, token: str) -> FakePeer:
        """Say HELLO as a client; fails the test when refused."""
        frame = await self.hello(token, role="client")
        assert frame.kind == FrameKind.WELCOME, frame
        return self

    async def next(self) -> Frame | None:
        """The next frame, or None at EOF (unbounded: prefer :meth:`expect`)."""
        return await self.peer.next_frame()

    async def expect(self, kind: FrameKind | None = None, timeout: float = _WAIT) -> Frame:
        """The next frame (of ``kind``: frames of other kinds are skipped)."""
        with trio.fail_after(timeout):
            while True:
                frame = await self.next()
                assert frame is not None, f"EOF while waiting for {kind}"
                if kind is None or frame.kind == kind:
                    return frame

    async def expect_eof(self, timeout: float = _WAIT) -> list[Frame]:
        """Read until the runtime closes this connection; return what came before."""
        frames = []
        with trio.fail_after(timeout):
            while (frame := await self.next()) is not None:
                frames.append(frame)
        return frames

    async def pump(self, seconds: float = 0.05) -> list[Frame]:
        """What arrives within ``seconds`` (for checking that nothing does)."""
        frames: list[Frame] = []
        with trio.move_on_after(seconds):
            while (frame := await self.next()) is not None:
                frames.append(frame)
        return frames

    def close(self) -> None:
        self.sock.close()
