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
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from types import MappingProxyType
from typing import Any

import trio
from google.protobuf.message import Message

from .._config import MAX_TIMEOUT_SECONDS, DeploymentConfig, PipelineConfig, resolve
from .._errors import OverloadedError, RemoteProtocolError
from .._telemetry import BUCKETS
from ._autoscaler import Autoscaler
from ._connections import Conn, ConnSink, LocalSink, Sink, read_hello, set_tcp_options
from ._frames import (
    PATH_OFFSET,
    PROTOCOL_VERSION,
    FrameFlags,
    FrameKind,
    encode,
    payload_offset,
)
from ._launcher import Launcher
from ._ledger import Ledger, Request
from ._relay import Relay
from ._stats import (
    HistogramSnapshot,
    InstanceStatistics,
    RequestEvent,
    RequestOutcome,
    RuntimeStatistics,
    StageStatistics,
)
from ._supervisor import Refused, Supervisor
from ._tls import TLSSocket
from ._topology import Instance, derive_topology
from ._tracing import SpanExport, Tracer, parse_traceparent

log = logging.getLogger("alto.runtime")

__all__ = ["Runtime", "check_timeout", "parse_request_options"]

RECENT_OUTCOMES = 1024  # request outcomes kept for the control plane


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
        trace_exporter: SpanExport | None = None,
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
        policies = {
            name: d.autoscale for name, d in deployment.stages.items() if d.autoscale is not None
        }
        self.supervisor.autoscaled = policies
        self.autoscaler = Autoscaler(policies, self.topology.stages) if policies else None
        # The parts call each other through these few wires.
        self.ledger.dispatch = self.relay.dispatch
        self.ledger.unpinned = self.supervisor.maybe_finish_drain
        self.ledger.ended = self.relay.cancel_work
        self.ledger.finished = self._finished
        self.relay.on_idle = self.supervisor.maybe_finish_drain
        self.relay.on_ready = self.supervisor.ready
        self.relay.on_client_frame = self._client_frame
        self.tracer = Tracer(pipeline.name, self.limits.trace_sample_rate, exporter=trace_exporter)
        self.instances = self.supervisor.instances
        self.requests = self.ledger.requests
        self._input_type: type[Message] | None = None
        # How requests ended: the most recent ones for the control plane, and observers
        # (the control plane's latency metrics) told of each.
        self.outcomes: deque[RequestOutcome] = deque(maxlen=RECENT_OUTCOMES)
        self._observers: list[Callable[[RequestOutcome], None]] = []
        # Deadlines: the earliest one known, and an event to wake the watcher when an
        # earlier one arrives.
        self._next_deadline = math.inf
        self._deadline_moved = trio.Event()

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
            nursery.start_soon(self._watch_deadlines)
            if self.autoscaler is not None:
                nursery.start_soon(self.autoscaler.run, self._autoscale)
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
                version = body.get("protocol", 1)
                if version != PROTOCOL_VERSION:
                    log.warning("refused a peer speaking alto protocol %r", version)
                    await sock.send(
                        _refusal(
                            f"this runtime speaks alto protocol {PROTOCOL_VERSION}, the peer "
                            f"{version!r}: run the same alto version on both sides"
                        )
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
                        "slot": inst.slot,
                        # the stage's options with this slot's instance_options over them
                        "options": self.deployment.instance_options(st.cfg, inst.slot),
                    }
                ).encode(),
            )
        )
        if body.get("ready") is True:
            # A peer with nothing to set up (a test's fake instance, a benchmark's) says so
            # in HELLO: ready at once, after WELCOME (a retried frame must follow it).
            self.supervisor.ready(inst)
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
            # Nobody waits for its requests any more: they stop costing anything.
            gone = [
                rid
                for rid, req in self.requests.items()
                if isinstance(req.sink, ConnSink) and req.sink.conn is conn
            ]
            for rid in gone:
                req = self.requests[rid]
                req.sink = None
                self.ledger.fail(rid, "its client disconnected", status="cancelled")
            if gone:
                self.ledger.settle()

    def _client_frame(
        self, conn: Conn, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        _size, kind, _flags, qlen, depth, pklen, corr = h
        if kind == FrameKind.CANCEL:
            # A client may cancel only its own requests (path[0] is the request id).
            req = self.requests.get(corr)
            if req is not None and isinstance(req.sink, ConnSink) and req.sink.conn is conn:
                self.cancel(corr, "cancelled by its client")
            return
        if kind != FrameKind.SUBMIT:
            raise RemoteProtocolError(
                f"clients may only send SUBMIT and CANCEL frames, got kind {kind}"
            )
        p = payload_offset(off, depth, qlen, pklen)
        payload = bytes(buf[p:fend])
        try:
            options = parse_request_options(bytes(buf[p - pklen : p]))
            req = self._admit(ConnSink(conn, corr), payload, **options)
        except (OverloadedError, ValueError) as exc:
            refusal: dict[str, Any] = {"reason": "invalid", "message": str(exc)}
            if isinstance(exc, OverloadedError):
                refusal.update(reason="overloaded", retry_after=exc.retry_after)
            conn.send(encode(FrameKind.REFUSED, [corr], payload=json.dumps(refusal).encode()))
            return
        conn.send(encode(FrameKind.ACCEPTED, [corr, req.rid]))
        self._ingress(req, payload)

    def _admit(
        self,
        sink: Sink,
        payload: bytes,
        *,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Request:
        """Register a new request. Raises OverloadedError past the in-flight limit or
        while shutting down, ValueError when its input cannot travel as one frame or an
        option is out of range."""
        size = PATH_OFFSET + 8 + len(self.pipeline.input) + len(payload)
        if size > self.limits.max_frame_size:
            raise ValueError(
                f"the input is too large: {size} bytes as a frame, the limit is {self.limits.max_frame_size}"
            )
        timeout = check_timeout(timeout) if timeout is not None else self.limits.request_timeout
        if traceparent is not None:
            parse_traceparent(traceparent)  # ValueError naming the problem, before admission
        now = trio.current_time()
        req = self.ledger.admit(
            sink,
            now,
            limit=self.limits.max_inflight_requests,
            closing=self.supervisor.closing,
        )
        req.trace = self.tracer.start(req.rid, traceparent)
        if timeout is not None:
            req.deadline = now + timeout
            if req.deadline < self._next_deadline:
                self._next_deadline = req.deadline
                self._deadline_moved.set()
        return req

    async def _watch_deadlines(self) -> None:
        """Fail requests whose deadline passed ("deadline exceeded"); sleeps until the
        earliest deadline, woken when an earlier one arrives."""
        while True:
            with trio.move_on_at(self._next_deadline):
                await self._deadline_moved.wait()
            self._deadline_moved = trio.Event()
            now = trio.current_time()
            if now >= self._next_deadline:
                self._next_deadline = self.ledger.expire(now)
                self.ledger.settle()

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """Cancel a request: it ends with an error saying ``reason``, its queued frames
        are dropped and the instances holding its inputs are told to stop (design
        invariant 4: it still ends explicitly). Returns False when it had already ended."""
        req = self.ledger.fail(request_id, reason, status="cancelled")
        self.ledger.settle()
        return req is not None

    def _finished(self, outcome: RequestOutcome) -> None:
        if outcome.traced:
            rec = self.tracer.running.get(outcome.request_id)
            if rec is not None:
                self.tracer.finish(rec, outcome.status, outcome.error)
        self.outcomes.append(outcome)
        for observe in self._observers:
            observe(outcome)

    def request_timeline(self, request_id: int) -> dict[str, Any] | None:
        """What the runtime knows of a request: its state and timings and, when it was
        traced, every hop and span (``TraceRecord.as_dict``); None when it is unknown
        (never admitted, or forgotten: recent and slowest requests are kept)."""
        req = self.requests.get(request_id)
        outcome = next((o for o in reversed(self.outcomes) if o.request_id == request_id), None)
        if req is None and outcome is None and self.tracer.get(request_id) is None:
            return None
        body: dict[str, Any] = {"request_id": request_id}
        if req is not None:
            now = trio.current_time()
            body.update(
                state="running",
                elapsed_s=round(now - req.admitted_at, 6),
                results=req.results,
                time_to_first_result_s=(
                    round(req.first_result_at - req.admitted_at, 6)
                    if req.first_result_at is not None
                    else None
                ),
                deadline_in_s=(round(req.deadline - now, 6) if req.deadline != math.inf else None),
            )
        elif outcome is not None:
            ttfr = outcome.time_to_first_result
            body.update(
                state=outcome.status,
                latency_s=round(outcome.latency, 6),
                results=outcome.results,
                time_to_first_result_s=round(ttfr, 6) if ttfr is not None else None,
                error=outcome.error or None,
            )
        rec = self.tracer.get(request_id)
        body["trace"] = rec.as_dict() if rec is not None else None
        return body

    def recent_requests(self, limit: int = 100) -> list[RequestOutcome]:
        """The most recent finished requests, newest first."""
        return list(reversed(self.outcomes))[:limit]

    def slowest_requests(self, limit: int = 20) -> list[RequestOutcome]:
        """The slowest of the recent finished requests, slowest first."""
        return sorted(self.outcomes, key=lambda o: o.latency, reverse=True)[:limit]

    def add_request_observer(self, observe: Callable[[RequestOutcome], None]) -> None:
        """Call ``observe(outcome)`` for every request that ends from now on (the control
        plane's latency metrics). It must not block or raise."""
        self._observers.append(observe)

    def _ingress(self, req: Request, payload: bytes) -> None:
        frame = encode(
            FrameKind.DATA,
            [req.rid],
            self.pipeline.input,
            payload,
            flags=FrameFlags.TRACED if req.trace is not None else 0,
            max_frame_size=self.limits.max_frame_size,
        )
        self.relay.ingress(req, frame)

    async def submit(
        self, payload: bytes, *, timeout: float | None = None, traceparent: str | None = None
    ) -> AsyncGenerator[RequestEvent, None]:
        """In-process ingress (the HTTP control plane uses it). See RuntimeCommands.
        Closing the iterator before ``done`` or ``error`` cancels the request."""
        sink = LocalSink()
        req = self._admit(sink, payload, timeout=timeout, traceparent=traceparent)
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
                if self.requests.get(req.rid) is req:
                    self.ledger.fail(req.rid, "its consumer went away", status="cancelled")
                    self.ledger.settle()

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

    def _autoscale(self, stage: str, instances: int, reason: str) -> None:
        if self.supervisor.closing or self.supervisor.launcher is None:
            return
        self.supervisor.scale(stage, instances, by="autoscaler", reason=reason)

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
                gauges=MappingProxyType(dict(i.gauges)),
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
                autoscale=(
                    (policy.min, policy.max)
                    if (policy := self.supervisor.autoscaled.get(s.name)) is not None
                    else None
                ),
                metrics=tuple(
                    HistogramSnapshot(
                        name, BUCKETS[name], tuple(h["buckets"]), h["sum"], h["count"]
                    )
                    for name, h in sorted(s.metrics.items())
                ),
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
            requests_cancelled=ledger.cancelled,
            requests_timed_out=ledger.timed_out,
            frames_relayed=self.relay.frames_relayed,
            max_inflight_requests=self.limits.max_inflight_requests,
            scale_events=self.supervisor.scale_events,
            scale_log=tuple(self.supervisor.scale_log),
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


def check_timeout(timeout: object) -> float:
    """A request timeout in seconds: a positive number up to a day. Raises ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"timeout must be in (0, {MAX_TIMEOUT_SECONDS:g}] seconds, got {timeout!r}"
        )
    return float(timeout)


_MAX_OPTIONS = 4096  # bytes of a SUBMIT's options


def parse_request_options(raw: bytes) -> dict[str, Any]:
    """The options a client sent with SUBMIT (see ``FrameKind.SUBMIT``): ``timeout``
    (seconds) and ``traceparent`` (W3C). Raises ValueError naming what is wrong."""
    if not raw:
        return {}
    if len(raw) > _MAX_OPTIONS:
        raise ValueError(f"request options of {len(raw)} bytes; the limit is {_MAX_OPTIONS}")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request options are not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("request options must be a JSON object")
    unknown = set(body) - {"timeout", "traceparent"}
    if unknown:
        raise ValueError(
            f"unknown request option(s) {', '.join(sorted(unknown))}; allowed: timeout, traceparent"
        )
    out: dict[str, Any] = {}
    if body.get("timeout") is not None:
        out["timeout"] = check_timeout(body["timeout"])
    tp = body.get("traceparent")
    if tp is not None:
        if not isinstance(tp, str) or len(tp) > 256:
            raise ValueError("traceparent must be a string (W3C trace context)")
        out["traceparent"] = tp
    return out
