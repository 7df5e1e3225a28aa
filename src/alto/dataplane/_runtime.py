"""The runtime: the dataplane of one pipeline, put together.

Where to look for what:

========================================  =============================================
question                                  module
========================================  =============================================
which stages, queues and routes exist     ``_topology`` (derived from the config once)
when does a group close; when is a        ``_ledger`` (every accounting rule, no I/O)
request done
how does a frame get from A to B;         ``_relay`` (scan, route, dispatch, ACK,
credits, backlogs, backpressure           credits, refill; fast and general path)
what happens when an instance crashes;    ``_supervisor`` (ids, registration, loss,
scaling, draining, replacement            exit, scale, drain, replacement, shutdown)
sockets, the handshake, result sinks      ``_connections`` (runtime side), ``_peer``
                                          (the other side)
========================================  =============================================

This module is the glue: it accepts connections, checks each one's token, hands instances
to the supervisor and the relay, admits requests from clients and from the in-process
ingress (the HTTP control plane), and builds the frozen statistics the control plane
reads. Use :meth:`Runtime.serve` in a nursery::

    runtime = Runtime(pipeline, deployment, token=token)
    runtime.launcher = LocalLauncher(...)          # optional: who starts instances
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.serve, listeners)
        runtime.start_instances()
        await runtime.wait_ready()
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import trio
from google.protobuf.message import Message

from .._config import DeploymentConfig, PipelineConfig, resolve
from .._errors import OverloadedError, RemoteProtocolError
from ._connections import Conn, ConnSink, LocalSink, Sink, read_hello, set_tcp_options
from ._frames import PATH_OFFSET, FrameKind, encode, payload_offset
from ._launcher import Launcher
from ._ledger import Ledger, Request
from ._relay import Relay
from ._stats import (
    InstanceStatistics,
    RequestEvent,
    RuntimeStatistics,
    StageStatistics,
)
from ._supervisor import Refused, Supervisor
from ._tls import TLSSocket
from ._topology import Instance, derive_topology

log = logging.getLogger("alto.runtime")

__all__ = ["Runtime"]


class Runtime:
    """The dataplane of one pipeline (see the module docstring for its parts).

    Raises PluginError at construction when a stage names an unknown scheduler.
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        deployment: DeploymentConfig,
        *,
        token: str,
        launcher: Launcher | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.deployment = deployment
        self.limits = deployment.runtime
        self.token = token
        self.topology = derive_topology(pipeline, deployment)
        self.stages = self.topology.stages
        self.ledger = Ledger(self.topology)
        self.relay = Relay(self.topology, self.ledger, self.limits)
        self.supervisor = Supervisor(self.topology, self.ledger, self.relay, deployment)
        self.supervisor.launcher = launcher
        # The parts call each other through these few wires.
        self.ledger.dispatch = self.relay.dispatch
        self.ledger.unpinned = self.supervisor.maybe_finish_drain
        self.relay.on_idle = self.supervisor.maybe_finish_drain
        self.relay.on_client_frame = self._client_frame
        self.instances = self.supervisor.instances
        self.requests = self.ledger.requests
        self._input_type: type[Message] | None = None

    @property
    def launcher(self) -> Launcher | None:
        return self.supervisor.launcher

    @launcher.setter
    def launcher(self, launcher: Launcher | None) -> None:
        self.supervisor.launcher = launcher

    @property
    def closing(self) -> bool:
        return self.supervisor.closing

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        listeners: Iterable[trio.socket.SocketType],
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on the given listening sockets until cancelled. With
        ``ssl_context``, connections accepted on TCP listeners speak TLS (``_tls``); UNIX
        sockets stay plain."""
        async with trio.open_nursery() as nursery:
            self.supervisor.nursery = nursery
            for sock in listeners:
                nursery.start_soon(self._accept_loop, sock, ssl_context)
            task_status.started()
            await trio.sleep_forever()  # the nursery also hosts connections and spawns

    def start_instances(self) -> None:
        """Spawn the deployment's instances through the launcher (in the background; wait
        for them with :meth:`wait_ready`). Raises ValueError when the deployment asks for
        more instances than its limits allow."""
        self.supervisor.start_all()

    async def wait_ready(self, timeout: float = math.inf) -> None:
        """Wait until no instance is starting; raises AltoError naming an instance that
        failed to start (with its last error), or the late ones after ``timeout``."""
        await self.supervisor.wait_ready(timeout)

    async def _accept_loop(
        self, listener: trio.socket.SocketType, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:  # EMFILE, ENOBUFS...: back off as trio.serve_listeners does
                log.error("accept failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                set_tcp_options(sock)
                if ssl_context is not None:
                    # The handshake happens on the first receive, in the connection's own
                    # task, within read_hello's timeout: never in this loop.
                    sock = TLSSocket(sock, ssl_context, server_side=True)
            assert self.supervisor.nursery is not None
            self.supervisor.nursery.start_soon(self.handle_connection, sock)

    async def handle_connection(self, sock: trio.socket.SocketType) -> None:
        """Serve one accepted connection until it ends. Never raises: one connection's
        failure must never take the runtime down."""
        conn = Conn(sock, "connection")
        try:
            with sock:
                hello = await read_hello(sock)
                if hello is None:
                    return
                body, rest = hello
                if not isinstance(body.get("token"), str) or not hmac.compare_digest(
                    body["token"].encode(), self.token.encode()
                ):
                    log.warning("refused a connection without the runtime's token")
                    await sock.send(
                        encode(FrameKind.REFUSED, [0], payload=b"authentication failed")
                    )
                    return
                role = body.get("role")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.writer)
                    try:
                        if role == "instance":
                            await self._serve_instance(conn, body, rest)
                        elif role == "client":
                            await self._serve_client(conn, rest)
                        else:
                            log.warning("refused a connection with unknown role %r", role)
                            conn.send(_refusal(f"unknown role {role!r}; roles: instance, client"))
                    finally:
                        conn.close()
        except (OSError, trio.BrokenResourceError) as exc:
            log.debug("%s: %s", conn.name, exc)
        except Exception:
            log.exception("%s: unexpected error; closing this connection", conn.name)

    # ------------------------------------------------------------------ instances

    async def _serve_instance(self, conn: Conn, body: dict[str, Any], rest: bytes) -> None:
        stage = body.get("stage")
        iid = body.get("instance")
        if not isinstance(stage, str) or not (iid is None or type(iid) is int):
            conn.send(_refusal("HELLO needs stage: str and instance: int or null"))
            return
        try:
            inst = self.supervisor.register(stage, iid, body.get("pid"), conn)
        except Refused as exc:
            conn.send(_refusal(str(exc)))
            return
        st = inst.stage
        conn.name = f"{st.name}/{inst.id}"
        conn.send(
            encode(
                FrameKind.WELCOME,
                [0],
                payload=json.dumps(
                    {
                        "instance": inst.id,
                        "stage_index": st.index,
                        "credits": inst.credits,
                        "child_tag": st.child_tag,
                        # The runtime needs exact paths only where it tracks them.
                        "coalesce_acks": not (st.tracked or st.retains),
                        "max_frame_size": self.limits.max_frame_size,
                    }
                ).encode(),
            )
        )
        reason = ""  # stays empty when the runtime itself is cancelled (shutting down)
        try:
            await self.relay.read_loop(conn, inst, rest)
            reason = "connection closed"
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("%s: %s; closing the connection", conn.name, reason)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            if not inst.ended:
                if reason:
                    if inst.exit_code is not None:
                        reason = f"{reason} (process exited with code {inst.exit_code})"
                    self.supervisor.lost(inst, reason)
                else:  # cancelled: the whole runtime is ending, a quiet stop
                    self.supervisor.lost(inst, "the runtime is shutting down", quiet=True)

    def instance_exited(self, instance_id: int, returncode: int | None) -> None:
        """The launcher's report that an instance process ended."""
        self.supervisor.exited(instance_id, returncode)

    def instance_lost(self, inst: Instance, reason: str, *, quiet: bool = False) -> None:
        self.supervisor.lost(inst, reason, quiet=quiet)

    # ------------------------------------------------------------------ clients and requests

    async def _serve_client(self, conn: Conn, rest: bytes) -> None:
        conn.name = "client"
        p = self.pipeline
        conn.send(
            encode(
                FrameKind.WELCOME,
                [0],
                payload=json.dumps(
                    {
                        "pipeline": p.name,
                        "input": p.input,
                        "queues": {
                            q: c.type for q, c in p.queues.items() if q in p.outputs or q == p.input
                        },
                    }
                ).encode(),
            )
        )
        try:
            await self.relay.read_loop(conn, None, rest)
        except RemoteProtocolError as exc:
            log.error("client connection: protocol error: %s; closing it", exc)
        finally:
            for req in self.requests.values():  # keep running; nobody to tell
                if isinstance(req.sink, ConnSink) and req.sink.conn is conn:
                    req.sink = None

    def _client_frame(
        self, conn: Conn, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        _size, kind, _flags, qlen, depth, pklen, corr = h
        if kind != FrameKind.SUBMIT:
            raise RemoteProtocolError(f"clients may only send SUBMIT frames, got kind {kind}")
        payload = bytes(buf[payload_offset(off, depth, qlen, pklen) : fend])
        try:
            req = self._admit(ConnSink(conn, corr), payload)
        except (OverloadedError, ValueError) as exc:
            conn.send(encode(FrameKind.REFUSED, [corr], payload=str(exc).encode()))
            return
        conn.send(encode(FrameKind.ACCEPTED, [corr, req.rid]))
        self._ingress(req, payload)

    def _admit(self, sink: Sink, payload: bytes) -> Request:
        """Register a new request. Raises OverloadedError past the in-flight limit or
        while shutting down, ValueError when its input cannot travel as one frame."""
        size = PATH_OFFSET + 8 + len(self.pipeline.input) + len(payload)
        if size > self.limits.max_frame_size:
            raise ValueError(
                f"the input is too large: {size} bytes as a frame, the limit is {self.limits.max_frame_size}"
            )
        return self.ledger.admit(
            sink,
            trio.current_time(),
            limit=self.limits.max_inflight_requests,
            closing=self.supervisor.closing,
        )

    def _ingress(self, req: Request, payload: bytes) -> None:
        frame = encode(
            FrameKind.DATA,
            [req.rid],
            self.pipeline.input,
            payload,
            max_frame_size=self.limits.max_frame_size,
        )
        self.relay.ingress(req, frame)

    async def submit(self, payload: bytes) -> AsyncIterator[RequestEvent]:
        """In-process ingress (the HTTP control plane uses it). See RuntimeCommands."""
        sink = LocalSink()
        req = self._admit(sink, payload)
        try:
            self._ingress(req, payload)
            yield RequestEvent("accepted", req.rid, time=trio.current_time())
            while True:
                while sink.events:
                    ev = sink.events.popleft()
                    yield ev
                    if ev.kind in ("done", "error"):
                        return
                await sink.lot.park()
        finally:
            if req.sink is sink:
                req.sink = None

    def fail_request(self, rid: int, message: str) -> None:
        """End a request with an error naming its cause; its later frames are discarded."""
        self.ledger.fail(rid, message)

    def input_type(self) -> type[Message]:
        """The protobuf message class of the pipeline's input queue."""
        if self._input_type is None:
            self._input_type = self.queue_type(self.pipeline.input)
        return self._input_type

    def queue_type(self, queue: str) -> type[Message]:
        """The protobuf message class of ``queue`` (KeyError if unknown)."""
        typ: type[Message] = resolve(self.pipeline.queues[queue].type, what="message type")
        return typ

    # ------------------------------------------------------------------ scaling

    async def scale(self, stage: str, instances: int) -> None:
        """Set ``stage``'s target; instances start or drain in the background. Raises
        KeyError (unknown stage), ValueError (below 1 or past a limit), AltoError (no
        launcher)."""
        self.supervisor.scale(stage, instances)

    async def drain(self, instance_id: int) -> None:
        """Drain one instance (KeyError: unknown; ValueError: its stage's last)."""
        self.supervisor.drain(instance_id)

    def active_instances(self, stage: str) -> list[Instance]:
        return self.supervisor.active(self.stages[stage])

    def begin_shutdown(self) -> None:
        """New requests are refused from now on, and instance exits are not crashes."""
        self.supervisor.begin_shutdown()

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> RuntimeStatistics:
        insts = tuple(
            InstanceStatistics(
                instance_id=i.id,
                stage=i.stage.name,
                state=i.state,
                queue_depth=i.queue_depth,
                credits=i.credits,
                backlog=len(i.backlog),
                open_groups=i.open_groups,
                frames_in=i.frames_in,
                frames_out=i.frames_out,
                pid=i.pid,
                last_error=i.last_error,
                credits_in_use=i.credits_in_use,
            )
            for i in self.instances.values()
        )
        stages = tuple(
            StageStatistics(
                name=s.name,
                scheduler=s.cfg.scheduler,
                stateful=s.cfg.stateful,
                aggregate_level=s.cfg.aggregate_level,
                fanout=s.cfg.fanout,
                inputs=s.cfg.inputs,
                outputs=s.cfg.outputs,
                instances=tuple(i.id for i in s.instances.values() if not i.ended),
                target_instances=s.target_instances,
                frames_processed=s.frames_processed,
                errors=s.errors,
                max_instances=s.max_instances,
            )
            for s in self.topology.by_index
        )
        ledger = self.ledger
        return RuntimeStatistics(
            pipeline=self.pipeline.name,
            time=trio.current_time(),
            stages=stages,
            instances=insts,
            requests_in_flight=len(ledger.requests),
            requests_submitted=ledger.submitted,
            requests_completed=ledger.completed,
            requests_failed=ledger.failed,
            requests_refused=ledger.refused,
            frames_relayed=self.relay.frames_relayed,
            max_inflight_requests=self.limits.max_inflight_requests,
            scale_events=self.supervisor.scale_events,
            edges=self.pipeline.edges(),
            frames_discarded=self.relay.frames_discarded,
            frames_retried=self.relay.frames_retried,
            restarts=self.supervisor.restarts,
            max_instances=self.supervisor.max_processes,
        )

    def pinned_groups(self) -> dict[str, dict[bytes, int]]:
        """Open groups per stateful stage: key-path bytes -> instance id (for tests)."""
        return {
            s.name: {k: i.id for k, i in s.groups.items()}
            for s in self.topology.by_index
            if s.level
        }


def _refusal(message: str) -> bytes:
    return encode(FrameKind.REFUSED, [0], payload=message.encode())
