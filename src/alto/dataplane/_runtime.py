"""The central runtime: relays frames between stage instances and clients.

One Trio task reads each connection; one writes it. A reader parses *every complete frame
of each receive* and routes it, appending to per-destination buffers, and only then wakes
the writers: never an await per frame (docs/relay.md has the measurements behind this).
The runtime reads headers only; payloads stay opaque bytes.

Routing per edge (design.md):

* into a stateful stage with aggregation level L: the group key is the key path's first L
  ids, i.e. the byte slice ``frame[10:10 + 8 * L]``. An open group is pinned to the
  instance chosen when its first item arrived and stays there until the runtime closes it
  (invariant 1), whatever the scheduler's ring does meanwhile;
* into other stages: the stage's scheduler chooses, with the prompt key as the key when
  the frame carries one (prompt-sticky), else with no key (round robin, least outstanding).

Accounting (invariant 3). A *live entry* is a frame routed to a stage and not yet
acknowledged by the instance that processes it. Stage code acknowledges an input only
after it has written all outputs for it, on the same ordered connection, so when the
runtime reads the ACK it has already counted the children. A request is complete when it
has no live entries (and hence no open groups). A group ``(S, P)`` of a stateful stage S is
complete when no live entry at a stage upstream of S can still produce an item under P:

* an entry whose key path starts with P, or
* an entry at an *ancestor* path A of P whose child ``P[:len(A)+1]`` is still open (the
  producer has not closed that child stream with a LAST item or a CLOSE frame).

Then the runtime sends GROUP_CLOSED for P to the pinned instance, behind the group's last
item on the same connection; that frame is itself a live entry until acknowledged, so the
aggregator's emission is counted before the request can finish.

Memory is bounded (invariant 5): each instance holds at most ``credits`` unacknowledged
frames; the rest wait in its backlog; a reader whose destination backlog passes
``backlog_limit`` stops reading (backpressure) until it drains; and the ingress refuses
requests past ``max_inflight_requests``.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import trio

from .._config import DeploymentConfig, PipelineConfig, StageConfig, resolve
from .._errors import AltoError, OverloadedError, RemoteProtocolError
from ._frames import HEADER, FrameKind, encode, parse
from ._schedulers import NoInstanceError, Scheduler, load_scheduler
from ._stats import (
    InstanceState,
    InstanceStatistics,
    RequestEvent,
    RuntimeStatistics,
    StageStatistics,
)

log = logging.getLogger("alto.runtime")

__all__ = ["Runtime"]

_DATA = FrameKind.DATA
_ACK = FrameKind.ACK
_CLOSE = FrameKind.CLOSE
_ERROR = FrameKind.ERROR
_SUBMIT = FrameKind.SUBMIT
_HELLO = FrameKind.HELLO
_LAST = 1
_U32 = struct.Struct("<I")
_RECV_SIZE = 256 * 1024  # relay-notes: 256 KiB did best (16 KiB and 1 MiB were 30-35% slower)
_CLIENT_OUT_LIMIT = 8 * 1024 * 1024  # unsent result bytes for one client before it is cut off
_MAX_ERROR = 4096  # characters of an error message kept (logs, clients)
_MAX_RESTARTS = 5  # crashes of one stage within _RESTART_WINDOW before it is not replaced
_RESTART_WINDOW = 60.0


class _Conn:
    """One socket: a buffered writer task and a parking lot to wake it."""

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self.sock = sock
        self.name = name
        self.out = bytearray()
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.out += data
            if self._lot:
                self._lot.unpark_all()

    async def writer(self) -> None:
        sock = self.sock
        try:
            while True:
                while not self.out:
                    if self.closed:
                        return
                    await self._lot.park()
                data, self.out = self.out, bytearray()
                view = memoryview(data)
                while view:
                    n = await sock.send(view)
                    view = view[n:]
        except OSError as exc:  # the peer went away; its reader notices too
            log.debug("%s: write failed: %s", self.name, exc)
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self._lot.unpark_all()

    def abort(self) -> None:
        """Close and shut the socket down, so that the peer sees the end at once."""
        self.close()
        self.out = bytearray()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Sink:
    """Where a request's results go: a client connection or an in-process consumer."""

    def result(self, rid: int, frame: bytes) -> None:
        raise NotImplementedError

    def done(self, rid: int) -> None:
        raise NotImplementedError

    def error(self, rid: int, message: str) -> None:
        raise NotImplementedError


class _ConnSink(_Sink):
    def __init__(self, conn: _Conn, corr: int) -> None:
        self.conn, self.corr = conn, corr

    def done(self, rid: int) -> None:
        self.conn.send(encode(FrameKind.DONE, [rid]))

    def result(self, rid: int, frame: bytes) -> None:
        if len(self.conn.out) > _CLIENT_OUT_LIMIT:
            # Memory is bounded (invariant 5): a client that does not read its results is
            # disconnected rather than buffered for without end.
            log.error(
                "a client left %d bytes of results unread; disconnecting it", len(self.conn.out)
            )
            self.conn.abort()
            return
        self.conn.send(frame)

    def error(self, rid: int, message: str) -> None:
        self.conn.send(encode(FrameKind.ERROR, [rid], payload=message.encode()))


class _LocalSink(_Sink):
    """In-process consumer (the HTTP ingress): events in a deque, a lot to wake the reader."""

    LIMIT = 65536  # unread events; past it the request's stream ends in an error

    def __init__(self) -> None:
        self.events: deque[RequestEvent] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.finished = False

    def _push(self, ev: RequestEvent) -> None:
        self.events.append(ev)
        self.lot.unpark_all()

    def result(self, rid: int, frame: bytes) -> None:
        if self.finished:
            return
        if len(self.events) >= self.LIMIT:
            self.error(rid, f"the consumer of this request left {self.LIMIT} results unread")
            return
        f = parse(frame, 0, len(frame))
        self._push(
            RequestEvent("result", rid, f.queue, f.key_path, f.payload, time=trio.current_time())
        )

    def done(self, rid: int) -> None:
        self.finished = True
        self._push(RequestEvent("done", rid, time=trio.current_time()))

    def error(self, rid: int, message: str) -> None:
        self.finished = True
        self._push(RequestEvent("error", rid, message=message, time=trio.current_time()))


class _Request:
    __slots__ = (
        "closed",
        "closed_groups",
        "groups",
        "live",
        "live_total",
        "rid",
        "sink",
        "sub",
        "t0",
    )

    def __init__(self, rid: int, sink: _Sink | None, t0: float) -> None:
        self.rid = rid
        self.sink = sink
        self.t0 = t0
        self.live_total = 0
        self.live: dict[tuple[int, bytes], int] = {}
        self.sub: dict[tuple[int, bytes], int] = {}
        self.closed: set[bytes] = set()
        self.groups: dict[tuple[int, bytes], _Instance] = {}
        self.closed_groups: set[tuple[int, bytes]] = set()


class _Instance:
    def __init__(self, iid: int, stage: _Stage, credits: int) -> None:
        self.id = iid
        self.stage = stage
        self.credits = credits
        self.state = InstanceState.STARTING
        self.conn: _Conn | None = None
        self.inflight = 0
        self.depth = 0
        self.backlog: deque[bytes] = deque()
        self.open_groups = 0
        self.frames_in = 0
        self.frames_out = 0
        self.pid: int | None = None
        self.last_error: str | None = None
        self.req_counts: dict[int, int] = {}
        self.unblocked = trio.lowlevel.ParkingLot()
        self.exit_code: int | None = None
        self.stopped = trio.Event()
        # Idempotent stages: the frames in flight by key path, kept until acknowledged so
        # a crash can hand them to another instance, and the paths that already produced
        # output (those cannot be retried without duplicates).
        self.retained: dict[bytes, deque[bytes]] | None = {} if stage.retains else None
        self.started: set[bytes] = set()


class _Stage:
    def __init__(self, index: int, cfg: StageConfig, scheduler: Scheduler) -> None:
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.scheduler = scheduler
        self.instances: dict[int, _Instance] = {}
        self.loads: dict[int, int] = {}
        self.groups: dict[bytes, _Instance] = {}
        self.level = cfg.aggregate_level or 0
        self.retains = cfg.idempotent
        self.key_end = 10 + 8 * self.level
        self.up: tuple[int, ...] = ()
        self.track_levels: tuple[int, ...] = ()  # levels of stateful stages downstream
        self.tracked = False
        self.tracks_children = False
        self.child_tag = 0
        self.target = 1
        self.crash_times: list[float] = []
        self.frames_processed = 0
        self.errors = 0


class Runtime:
    """The dataplane of one pipeline. Use :meth:`serve` in a nursery::

        runtime = Runtime(pipeline, deployment, token=token)
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.serve, socket_path)

    Instances are spawned by a launcher (``alto.dataplane._launcher``) through the
    ``spawn`` callback, or connect on their own (remote instances over TCP).
    """

    def __init__(
        self,
        pipeline: PipelineConfig,
        deployment: DeploymentConfig,
        *,
        token: str,
        spawn: Callable[[str, int], Any] | None = None,
        stop_instance: Callable[[int], Any] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.deployment = deployment
        self.limits = deployment.runtime
        self.token = token
        self._spawn = spawn
        self._stop_instance = stop_instance
        self.stages: dict[str, _Stage] = {}
        for i, (name, cfg) in enumerate(pipeline.stages.items()):
            opts = dict(cfg.scheduler_options)
            self.stages[name] = _Stage(i, cfg, load_scheduler(cfg.scheduler, **opts))
        by_index = list(self.stages.values())
        for st in by_index:
            st.up = tuple(sorted(self.stages[u].index for u in pipeline.upstream(st.name)))
            st.target = deployment.instances(st.name)
        for st in by_index:
            levels = {s.level for s in by_index if s.cfg.stateful and st.index in s.up}
            st.track_levels = tuple(sorted(levels))
            st.tracked = bool(levels)
            # A closed child matters only to groups at least as deep as the child.
            st.tracks_children = st.cfg.fanout and bool(levels) and max(levels) > st.cfg.input_depth
        # A fan-out child id is tagged with the stage only where two fan-out stages receive
        # paths of the same depth: there, equal counters would name different streams.
        depth_count: dict[int, int] = {}
        for st in by_index:
            if st.cfg.fanout:
                depth_count[st.cfg.input_depth] = depth_count.get(st.cfg.input_depth, 0) + 1
        for st in by_index:
            if st.cfg.fanout and depth_count[st.cfg.input_depth] > 1:
                st.child_tag = (st.index + 1) << 40
        self._by_index = by_index
        # queue name bytes -> destination stage, or None for a sink queue
        self.routes: dict[bytes, _Stage | None] = {}
        for q in pipeline.queues:
            dst = pipeline.consumer.get(q)
            self.routes[q.encode()] = self.stages[dst] if dst else None
        self.entry_stage = self.stages[pipeline.consumer[pipeline.input]]
        self.instances: dict[int, _Instance] = {}
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._rids = itertools.count(1)
        self._dirty: set[_Request] = set()
        self._overfull: list[_Instance] = []
        self.frames_relayed = 0
        self.requests_submitted = 0
        self.requests_completed = 0
        self.requests_failed = 0
        self.requests_refused = 0
        self.scale_events = 0
        self.frames_dropped = 0
        self.frames_retried = 0
        self.restarts = 0
        self.closing = False  # set by begin_shutdown(): losses are then expected
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        listeners: Iterable[trio.socket.SocketType],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on the given listening sockets until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for sock in listeners:
                nursery.start_soon(self._accept_loop, sock)
            task_status.started()

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:  # EMFILE, ENOBUFS...: back off as trio.serve_listeners does
                log.error("accept failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                _keepalive(sock)
            self._nursery.start_soon(self._handle, sock)

    def new_instance_id(self, stage: str) -> int:
        """Reserve an id for an instance of ``stage`` about to be spawned."""
        st = self.stages[stage]
        iid = next(self._ids)
        inst = _Instance(iid, st, self.deployment.credits(stage))
        self.instances[iid] = inst
        st.instances[iid] = inst
        return iid

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        conn = _Conn(sock, "connection")
        try:
            with sock:
                hello = await self._read_hello(sock)
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
                    finally:
                        conn.close()
        except (OSError, trio.BrokenResourceError) as exc:
            log.debug("%s: %s", conn.name, exc)
        except Exception:  # one connection's failure must never take the runtime down
            log.exception("%s: unexpected error; closing this connection", conn.name)

    async def _read_hello(
        self, sock: trio.socket.SocketType
    ) -> tuple[dict[str, Any], bytes] | None:
        buf = b""
        with trio.move_on_after(10):
            while len(buf) < 4 or len(buf) < 4 + _U32.unpack_from(buf)[0]:
                if len(buf) >= 4 and _U32.unpack_from(buf)[0] > 65536:
                    log.warning("refused a connection: first frame too large")
                    return None
                chunk = await sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            size = _U32.unpack_from(buf)[0]
            try:
                f = parse(buf, 0, size + 4)
                if f.kind != _HELLO:
                    raise RemoteProtocolError(f"expected HELLO, got {f.kind.name}")
                body = json.loads(f.payload)
                if not isinstance(body, dict):
                    raise RemoteProtocolError("HELLO payload is not a JSON object")
            except (RemoteProtocolError, ValueError) as exc:
                log.warning("refused a connection: %s", exc)
                return None
            return body, buf[size + 4 :]
        log.warning("refused a connection: no HELLO within 10 s")
        return None

    # ------------------------------------------------------------------ instances

    async def _serve_instance(self, conn: _Conn, body: dict[str, Any], rest: bytes) -> None:
        stage_name = body.get("stage")
        iid_field = body.get("instance")
        if not isinstance(stage_name, str) or not (iid_field is None or type(iid_field) is int):
            conn.send(
                encode(
                    FrameKind.REFUSED,
                    [0],
                    payload=b"HELLO needs stage: str and instance: int or null",
                )
            )
            return
        if stage_name not in self.stages:
            conn.send(
                encode(FrameKind.REFUSED, [0], payload=f"unknown stage {stage_name!r}".encode())
            )
            return
        st = self.stages[stage_name]
        iid = body.get("instance")
        inst = self.instances.get(iid) if isinstance(iid, int) else None
        if inst is None or inst.stage is not st or inst.state != InstanceState.STARTING:
            if iid is not None:
                conn.send(
                    encode(FrameKind.REFUSED, [0], payload=f"unknown instance {iid!r}".encode())
                )
                return
            inst = self.instances[self.new_instance_id(st.name)]  # a remote instance
            st.target = max(
                st.target,
                sum(
                    1
                    for i in st.instances.values()
                    if i.state in (InstanceState.READY, InstanceState.STARTING)
                ),
            )
        inst.conn = conn
        inst.pid = body.get("pid")
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
        inst.state = InstanceState.READY
        st.loads[inst.id] = inst.depth
        st.scheduler.add_instance(inst.id)
        log.info("instance %s/%d ready (pid %s)", st.name, inst.id, inst.pid)
        reason = ""  # stays empty when the runtime itself is cancelled (shutting down)
        try:
            await self._read_loop(conn, inst, rest)
            reason = "connection closed"
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("%s: %s; closing the connection", conn.name, reason)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        finally:
            if inst.state not in (InstanceState.STOPPED, InstanceState.CRASHED):
                if reason:
                    if inst.exit_code is not None:
                        reason = f"{reason} (process exited with code {inst.exit_code})"
                    self.instance_lost(inst, reason)
                else:  # cancelled: the whole runtime is ending, a quiet stop
                    self.instance_lost(inst, "the runtime is shutting down", quiet=True)

    async def _read_loop(self, conn: _Conn, inst: _Instance | None, rest: bytes) -> None:
        """Receive into one buffer and handle every complete frame of each receive."""
        sock = conn.sock
        buf = bytearray(_RECV_SIZE)
        end = len(rest)
        buf[:end] = rest
        max_size = self.limits.max_frame_size
        handle_client = self._client_frame
        while True:
            self._overfull.clear()  # left by callers that do not read (ingress, retries)
            if inst is not None:
                off = self._scan_instance(inst, buf, end)
            else:
                off = 0
                while end - off >= 18:
                    size = _U32.unpack_from(buf, off)[0]
                    fend = off + 4 + size
                    if fend > end:
                        break
                    h = _checked_header(buf, off, size, max_size)
                    handle_client(conn, buf, off, fend, h)
                    off = fend
            if end - off >= 4 and _U32.unpack_from(buf, off)[0] + 4 > max_size:
                raise RemoteProtocolError(
                    f"frame of {_U32.unpack_from(buf, off)[0] + 4} bytes exceeds the limit of {max_size}"
                )
            if off:
                buf[: end - off] = buf[off:end]
                end -= off
            if end >= 4:
                need = 4 + _U32.unpack_from(buf, 0)[0]
                if need > len(buf) and need <= max_size:
                    buf.extend(bytes(need - len(buf)))
            self._after_batch()
            if self._overfull:
                overfull, self._overfull = self._overfull, []
                await self._wait_overfull(conn, overfull)
            if inst is not None and inst.state in (InstanceState.STOPPED, InstanceState.CRASHED):
                return  # declared lost meanwhile: its later frames must not count
            n = await sock.recv_into(memoryview(buf)[end:])
            if n == 0:
                if end:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of a frame ({end} bytes)"
                    )
                return
            end += n

    def _scan_instance(self, inst: _Instance, buf: bytearray, end: int) -> int:
        """Handle every complete frame in ``buf[:end]`` from an instance; return the
        offset of the first incomplete one.

        The hot path. DATA into a pinned group or a keyless stage and ACK of an untracked
        stage are handled inline (relay-notes: per-frame work is the ceiling at 100 B, so
        no calls, one unpack, dict lookups only); everything else goes to the general
        methods below, which do the same and more. Consecutive frames for one destination
        leave as one slice of the receive buffer (a *run*), so a batch of N frames costs
        one copy and one append, not N; any other action first flushes the run, so the
        order on every connection is the order of arrival.
        """
        max_size = self.limits.max_frame_size
        unpack = HEADER.unpack_from
        unpack_count = _U32.unpack_from
        requests = self.requests
        routes = self.routes
        st = inst.stage
        src_tracked = st.tracked or st.retains  # their ACKs take the general path
        src_children = st.tracks_children  # their DATA with LAST does
        src_general = st.retains  # all their DATA does (it marks inputs as started)
        off = 0
        n_in = 0
        run_conn: _Conn | None = None  # the destination of the run buf[run_start:off]
        run_start = 0
        # Caches for runs of frames alike, valid within this scan (groups close only after
        # it; a request that fails meanwhile is no longer in ``requests``): the last queue
        # name and its route, and the last level-1 group (its key is the request id).
        last_q = b"\x00"  # no queue name is a NUL byte
        last_dst: _Stage | None = None
        last_rid = -1
        last_inst: _Instance | None = None
        relayed = 0
        try:
            while end - off >= 18:
                h = unpack(buf, off)
                size = h[0]
                fend = off + 4 + size
                if fend > end:
                    break
                if (
                    size < 14
                    or size + 4 > max_size
                    or h[4] == 0
                    or 10 + 8 * h[4] + h[3] + h[5] > size + 4
                ):
                    _checked_header(buf, off, size, max_size)
                n_in += 1
                kind = h[1]
                if kind == _DATA and not src_general and not (src_children and h[2] & _LAST):
                    rid = h[6]
                    req = requests.get(rid)
                    q0 = off + 10 + 8 * h[4]
                    if h[3] == len(last_q) and buf.startswith(last_q, q0):
                        dst = last_dst
                    else:
                        last_q = bytes(buf[q0 : q0 + h[3]])
                        dst = last_dst = routes.get(last_q)
                    inst2: _Instance | None = None
                    if req is not None and dst is not None and not dst.tracked and not dst.retains:
                        if dst.level == 1:
                            if rid == last_rid and last_inst is not None and last_inst.stage is dst:
                                inst2 = last_inst
                            else:
                                inst2 = dst.groups.get(bytes(buf[off + 10 : off + 18]))
                                last_rid, last_inst = rid, inst2
                        elif dst.level:
                            if h[4] >= dst.level:
                                inst2 = dst.groups.get(bytes(buf[off + 10 : off + dst.key_end]))
                        elif not h[5]:
                            try:
                                inst2 = dst.instances[dst.scheduler.choose(None, dst.loads)]
                            except NoInstanceError:
                                inst2 = None
                    if inst2 is not None and req is not None and dst is not None:
                        relayed += 1
                        req.live_total += 1
                        inst2.depth += 1
                        dst.loads[inst2.id] = inst2.depth
                        rc = inst2.req_counts
                        rc[rid] = rc.get(rid, 0) + 1
                        conn2 = inst2.conn
                        if (
                            inst2.inflight < inst2.credits
                            and not inst2.backlog
                            and conn2 is not None
                        ):
                            inst2.inflight += 1
                            inst2.frames_out += 1
                            if run_conn is not conn2:
                                if run_conn is not None:
                                    run_conn.send(buf[run_start:off])
                                run_conn, run_start = conn2, off
                        else:
                            if run_conn is not None:
                                run_conn.send(buf[run_start:off])
                                run_conn = None
                            inst2.backlog.append(bytes(buf[off:fend]))
                            if len(inst2.backlog) > self.limits.backlog_limit:
                                self._overfull.append(inst2)
                        off = fend
                        continue
                    if run_conn is not None:
                        run_conn.send(buf[run_start:off])
                        run_conn = None
                    last_inst = None  # the general path may open or fail groups
                    self._route(st, buf, off, fend, h)
                elif run_conn is not None:
                    run_conn.send(buf[run_start:off])
                    run_conn = None
                    n_in -= 1
                    continue  # handle this frame again, with no run open
                elif kind == _ACK and not src_tracked:
                    # Coalesced: an untracked stage may acknowledge n frames of one request
                    # with one ACK whose payload is n (u32); no payload means 1.
                    rid = h[6]
                    p = off + 10 + 8 * h[4] + h[3] + h[5]
                    n = unpack_count(buf, p)[0] if fend - p >= 4 else 1
                    if not 0 < n <= inst.inflight:
                        raise RemoteProtocolError(
                            f"ACK of {n} frames, but {inst.inflight} are unacknowledged"
                        )
                    self._credit_back(inst, rid, n)
                    req = requests.get(rid)
                    if req is not None:
                        req.live_total -= n
                        if req.live_total <= 0:
                            self._dirty.add(req)
                    self._maybe_finish_drain(inst)
                else:
                    last_inst = None
                    self._instance_frame(inst, buf, off, fend, h)
                off = fend
        finally:
            # Also when a malformed frame ends the scan: what was counted as sent is sent.
            if run_conn is not None:
                run_conn.send(buf[run_start:off])
            inst.frames_in += n_in
            self.frames_relayed += relayed
        return off

    def _credit_back(self, inst: _Instance, rid: int, n: int) -> None:
        """``n`` frames of request ``rid`` on ``inst`` were acknowledged: give the credits
        back, lower its queue depth, and send what waited in its backlog."""
        inst.inflight -= n
        inst.depth -= n
        st = inst.stage
        st.loads[inst.id] = inst.depth
        st.frames_processed += n
        rc = inst.req_counts
        c = rc.get(rid, 0) - n
        if c > 0:
            rc[rid] = c
        else:
            rc.pop(rid, None)
        if inst.backlog:
            self._refill(inst)

    def _maybe_finish_drain(self, inst: _Instance) -> None:
        """A draining instance with no work and no pinned group left gets STOP."""
        if inst.state == InstanceState.DRAINING and inst.depth == 0 and inst.open_groups == 0:
            self._finish_drain(inst)

    def _refill(self, inst: _Instance) -> None:
        """Credits came back: move frames from the backlog to the connection."""
        conn = inst.conn
        assert conn is not None
        while inst.backlog and inst.inflight < inst.credits:
            conn.send(inst.backlog.popleft())
            inst.inflight += 1
            inst.frames_out += 1
        if inst.unblocked and len(inst.backlog) <= self.limits.backlog_limit // 2:
            inst.unblocked.unpark_all()

    def _instance_frame(
        self, inst: _Instance, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        kind = h[1]
        rid = h[6]
        st = inst.stage
        if kind in (_DATA, _CLOSE) and inst.retained:
            path = bytes(buf[off + 10 : off + 10 + 8 * h[4]])
            for k in range(h[4], 0, -1):  # the input this output descends from
                if path[: 8 * k] in inst.retained:
                    inst.started.add(path[: 8 * k])
                    break
        if kind == _DATA:
            self._route(st, buf, off, fend, h)
        elif kind == _ACK:
            self._ack(inst, buf, off, fend, h)
        elif kind == _CLOSE:
            req = self.requests.get(rid)
            if req is not None and st.tracks_children:
                req.closed.add(bytes(buf[off + 10 : off + 10 + 8 * h[4]]))
                self._dirty.add(req)
        elif kind == _ERROR:
            st.errors += 1
            msg = bytes(buf[off + 10 + 8 * h[4] + h[3] + h[5] : fend]).decode("utf-8", "replace")
            inst.last_error = msg[:_MAX_ERROR]
            self.fail_request(rid, f"stage {st.name!r} instance {inst.id}: {msg}")
        else:
            raise RemoteProtocolError(
                f"unexpected {FrameKind(kind).name if kind in FrameKind._value2member_map_ else kind} frame from an instance"
            )

    def _route(
        self, src: _Stage | None, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        """Route one DATA frame (``h`` is its unpacked header)."""
        rid = h[6]
        req = self.requests.get(rid)
        if req is None:  # the request failed or was never admitted
            self.frames_dropped += 1
            return
        depth = h[4]
        q0 = off + 10 + 8 * depth
        qname_bytes = bytes(buf[q0 : q0 + h[3]])
        dst = self.routes.get(qname_bytes)
        if dst is None and qname_bytes not in self.routes:
            qname = bytes(buf[q0 : q0 + h[3]]).decode("ascii", "replace")
            self.fail_request(
                rid,
                f"stage {src.name if src else 'ingress'!r} wrote to unknown queue {qname!r}; queues: {', '.join(self.pipeline.queues)}",
            )
            return
        if src is not None and h[2] & _LAST and src.tracks_children:
            req.closed.add(bytes(buf[off + 10 : off + 10 + 8 * depth]))
            self._dirty.add(req)
        self.frames_relayed += 1
        frame = bytes(buf[off:fend])
        if dst is None:  # a sink queue: straight to the client
            if req.sink is not None:
                req.sink.result(rid, frame)
            return
        if dst.level:
            if depth < dst.level:
                self.fail_request(
                    rid,
                    f"frame for stateful stage {dst.name!r} has key path depth {depth} < its aggregation level {dst.level}",
                )
                return
            key = frame[10 : dst.key_end]
            inst = dst.groups.get(key)
            if inst is None:
                gk = (dst.index, key)
                if gk in req.closed_groups:
                    self.fail_request(
                        rid,
                        f"stage {src.name if src else 'ingress'!r} wrote an item for group {_path_str(key)} of stage {dst.name!r} after that group was closed",
                    )
                    return
                try:
                    inst = dst.instances[dst.scheduler.choose(key, dst.loads)]
                except NoInstanceError:
                    self.fail_request(rid, f"no instance of stage {dst.name!r} is available")
                    return
                dst.groups[key] = inst
                inst.open_groups += 1
                req.groups[gk] = inst
                self._dirty.add(req)
        else:
            pk = None
            if h[5]:
                k0 = q0 + h[3]
                pk = frame[k0 - off : k0 - off + h[5]]
            try:
                inst = dst.instances[dst.scheduler.choose(pk, dst.loads)]
            except NoInstanceError:
                self.fail_request(rid, f"no instance of stage {dst.name!r} is available")
                return
        self._add_live(req, dst, frame, depth)
        self._dispatch(inst, rid, frame)

    def _add_live(self, req: _Request, st: _Stage, frame: bytes, depth: int) -> None:
        req.live_total += 1
        if st.tracked:
            path = frame[10 : 10 + 8 * depth]
            k = (st.index, path)
            req.live[k] = req.live.get(k, 0) + 1
            for lvl in st.track_levels:
                if depth >= lvl:
                    k = (st.index, path[: 8 * lvl])
                    req.sub[k] = req.sub.get(k, 0) + 1

    def _dispatch(self, inst: _Instance, rid: int, frame: bytes) -> None:
        inst.depth += 1
        inst.stage.loads[inst.id] = inst.depth
        rc = inst.req_counts
        rc[rid] = rc.get(rid, 0) + 1
        if inst.retained is not None:
            inst.retained.setdefault(frame[10 : 10 + 8 * frame[7]], deque()).append(frame)
        if inst.inflight < inst.credits and not inst.backlog:
            inst.inflight += 1
            inst.frames_out += 1
            assert inst.conn is not None
            inst.conn.send(frame)
        else:
            inst.backlog.append(frame)
            if len(inst.backlog) > self.limits.backlog_limit:
                self._overfull.append(inst)

    def _ack(
        self, inst: _Instance, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        rid = h[6]
        p = off + 10 + 8 * h[4] + h[3] + h[5]
        if fend - p >= 4 and _U32.unpack_from(buf, p)[0] != 1:
            raise RemoteProtocolError(
                "this stage's ACKs must name one frame each (coalesce_acks is off)"
            )
        if inst.inflight <= 0:
            raise RemoteProtocolError("ACK with no unacknowledged frame")
        st = inst.stage
        self._credit_back(inst, rid, 1)
        if inst.retained:
            path = bytes(buf[off + 10 : off + 10 + 8 * h[4]])
            dq = inst.retained.get(path)
            if dq:
                dq.popleft()
                if not dq:
                    del inst.retained[path]
                    inst.started.discard(path)
        req = self.requests.get(rid)
        if req is not None:
            req.live_total -= 1
            if st.tracked:
                depth = h[4]
                path = bytes(buf[off + 10 : off + 10 + 8 * depth])
                k = (st.index, path)
                n = req.live.get(k, 0) - 1
                if n > 0:
                    req.live[k] = n
                else:
                    req.live.pop(k, None)
                for lvl in st.track_levels:
                    if depth >= lvl:
                        k = (st.index, path[: 8 * lvl])
                        n = req.sub.get(k, 0) - 1
                        if n > 0:
                            req.sub[k] = n
                        else:
                            req.sub.pop(k, None)
                self._dirty.add(req)
            elif req.live_total == 0:
                self._dirty.add(req)
        self._maybe_finish_drain(inst)

    def _after_batch(self) -> None:
        """Close complete groups and finish complete requests touched by the last batch."""
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            for req in dirty:
                if self.requests.get(req.rid) is not req:
                    continue
                if req.groups:
                    for (sidx, key), inst in list(req.groups.items()):
                        if self._group_complete(req, self._by_index[sidx], key):
                            self._close_group(req, sidx, key, inst)
                if req.live_total == 0 and not req.groups:
                    self._complete(req)

    def _group_complete(self, req: _Request, st: _Stage, key: bytes) -> bool:
        live, sub, closed = req.live, req.sub, req.closed
        for t in st.up:
            if (t, key) in sub:
                return False
        for k in range(1, st.level):
            if key[: 8 * (k + 1)] in closed:
                continue
            anc = key[: 8 * k]
            for t in st.up:
                if (t, anc) in live:
                    return False
        return True

    def _close_group(self, req: _Request, sidx: int, key: bytes, inst: _Instance) -> None:
        st = self._by_index[sidx]
        del req.groups[(sidx, key)]
        req.closed_groups.add((sidx, key))
        if st.groups.get(key) is inst:
            del st.groups[key]
        inst.open_groups -= 1
        frame = encode(FrameKind.GROUP_CLOSED, struct.unpack(f"<{len(key) // 8}Q", key))
        self._add_live(req, st, frame, len(key) // 8)
        self._dispatch(inst, req.rid, frame)
        self._dirty.add(req)

    def _complete(self, req: _Request) -> None:
        del self.requests[req.rid]
        self.requests_completed += 1
        if req.sink is not None:
            req.sink.done(req.rid)

    async def _wait_overfull(self, conn: _Conn, overfull: list[_Instance]) -> None:
        """Backpressure: stop reading this connection until the backlogs it filled drain.

        ``overfull`` is what this reader's last batch filled: the list is taken between
        the batch and the first await, so no other reader's entries are in it.
        """
        limit = self.limits.backlog_limit
        while overfull:
            inst = overfull.pop()
            if inst.conn is conn:  # never wait for our own acknowledgements
                continue
            while len(inst.backlog) > limit // 2 and inst.state in (
                InstanceState.READY,
                InstanceState.DRAINING,
            ):
                await inst.unblocked.park()

    # ------------------------------------------------------------------ failures

    def fail_request(self, rid: int, message: str) -> None:
        """End a request with an error naming its cause; its later frames are dropped."""
        req = self.requests.pop(rid, None)
        if req is None:
            return
        if len(message) > _MAX_ERROR:
            message = message[:_MAX_ERROR] + f"... ({len(message) - _MAX_ERROR} more characters)"
        self.requests_failed += 1
        log.warning("request %d failed: %s", rid, message)
        for (sidx, key), inst in req.groups.items():
            st = self._by_index[sidx]
            if st.groups.get(key) is inst:
                del st.groups[key]
            inst.open_groups -= 1
            self._maybe_finish_drain(inst)
        req.groups.clear()
        if req.sink is not None:
            req.sink.error(rid, message)

    def instance_lost(self, inst: _Instance, reason: str, *, quiet: bool = False) -> None:
        """An instance exited or its connection broke: fail its work (invariant 4).

        A drained instance (no work, no pinned group) that goes away has stopped; so has
        every instance when the runtime itself shuts down (``quiet``). Anything else crashed.
        """
        st = inst.stage
        quiet = quiet or self.closing
        expected = quiet or (
            inst.state == InstanceState.DRAINING and inst.depth == 0 and inst.open_groups == 0
        )
        inst.state = InstanceState.STOPPED if expected else InstanceState.CRASHED
        if not expected:
            inst.last_error = reason
            log.error("instance %s/%d lost: %s", st.name, inst.id, reason)
        if inst.id in st.scheduler.instances:
            st.scheduler.remove_instance(inst.id)
        st.loads.pop(inst.id, None)
        pinned = {
            req.rid
            for req in self.requests.values()
            for (sidx, _), i in req.groups.items()
            if i is inst
        }
        retry: list[bytes] = []
        if inst.retained is not None:  # idempotent: retry what had not started
            doomed = set(pinned)
            for path, frames in inst.retained.items():
                if path in inst.started:
                    doomed.add(struct.unpack_from("<Q", path)[0])
                else:
                    retry.extend(frames)
            inst.retained.clear()
            inst.started.clear()
        else:
            doomed = pinned | set(inst.req_counts)
        what = "stopped" if quiet else "crashed"
        for rid in doomed:
            self.fail_request(rid, f"stage {st.name!r} instance {inst.id} {what}: {reason}")
        inst.req_counts.clear()
        inst.backlog.clear()
        inst.unblocked.unpark_all()
        inst.depth = inst.inflight = 0
        if inst.conn is not None:
            inst.conn.close()
        inst.stopped.set()
        self._forget_old(st)
        if not expected and self._spawn is not None and self._nursery is not None:
            self._nursery.start_soon(self._replace_crashed, st)
        for frame in retry:
            rid = struct.unpack_from("<Q", frame, 10)[0]
            if rid not in self.requests:
                continue
            try:
                other = st.instances[st.scheduler.choose(None, st.loads)]
            except NoInstanceError:
                self.fail_request(
                    rid,
                    f"stage {st.name!r} instance {inst.id} crashed ({reason}) and no other instance can retry its work",
                )
                continue
            log.info(
                "retrying a frame of request %d on %s/%d (idempotent stage)", rid, st.name, other.id
            )
            self.frames_retried += 1
            self._dispatch(other, rid, frame)
        self._after_batch()

    # ------------------------------------------------------------------ clients

    async def _serve_client(self, conn: _Conn, rest: bytes) -> None:
        conn.name = "client"
        conn.send(
            encode(
                FrameKind.WELCOME,
                [0],
                payload=json.dumps(
                    {
                        "pipeline": self.pipeline.name,
                        "input": self.pipeline.input,
                        "queues": {
                            q: c.type
                            for q, c in self.pipeline.queues.items()
                            if q in self.pipeline.outputs or q == self.pipeline.input
                        },
                    }
                ).encode(),
            )
        )
        try:
            await self._read_loop(conn, None, rest)
        except RemoteProtocolError as exc:
            log.error("client connection: protocol error: %s; closing it", exc)
        finally:
            for req in self.requests.values():  # keep running; nobody to tell
                if isinstance(req.sink, _ConnSink) and req.sink.conn is conn:
                    req.sink = None

    def _client_frame(
        self, conn: _Conn, buf: bytearray, off: int, fend: int, h: tuple[int, ...]
    ) -> None:
        if h[1] != _SUBMIT:
            raise RemoteProtocolError(f"clients may only send SUBMIT frames, got kind {h[1]}")
        corr = h[6]
        payload = bytes(buf[off + 10 + 8 * h[4] + h[3] + h[5] : fend])
        try:
            rid = self._admit(_ConnSink(conn, corr), len(payload))
        except (OverloadedError, ValueError) as exc:
            conn.send(encode(FrameKind.REFUSED, [corr], payload=str(exc).encode()))
            return
        conn.send(encode(FrameKind.ACCEPTED, [corr, rid]))
        self._ingress(rid, payload)

    def _admit(self, sink: _Sink, payload_size: int) -> int:
        """Register a new request. Raises OverloadedError past the in-flight limit and
        ValueError when its input cannot travel as one frame."""
        size = 18 + len(self.pipeline.input) + payload_size
        if size > self.limits.max_frame_size:
            raise ValueError(
                f"the input is too large: {size} bytes as a frame, the limit is {self.limits.max_frame_size}"
            )
        if self.closing:
            self.requests_refused += 1
            raise OverloadedError("the runtime is shutting down", retry_after=5.0)
        if len(self.requests) >= self.limits.max_inflight_requests:
            self.requests_refused += 1
            raise OverloadedError(
                f"{len(self.requests)} requests in flight, the limit is {self.limits.max_inflight_requests}",
                retry_after=1.0,
            )
        rid = next(self._rids)
        self.requests[rid] = _Request(rid, sink, trio.current_time())
        self.requests_submitted += 1
        return rid

    def _ingress(self, rid: int, payload: bytes) -> None:
        frame = encode(
            FrameKind.DATA,
            [rid],
            self.pipeline.input,
            payload,
            max_frame_size=self.limits.max_frame_size,
        )
        self._route(None, bytearray(frame), 0, len(frame), HEADER.unpack_from(frame, 0))
        self._after_batch()

    async def submit(self, payload: bytes) -> AsyncIterator[RequestEvent]:
        """In-process ingress (the HTTP control plane uses it). See RuntimeCommands."""
        sink = _LocalSink()
        rid = self._admit(sink, len(payload))
        try:
            self._ingress(rid, payload)
            yield RequestEvent("accepted", rid, time=trio.current_time())
            while True:
                while sink.events:
                    ev = sink.events.popleft()
                    yield ev
                    if ev.kind in ("done", "error"):
                        return
                await sink.lot.park()
        finally:
            req = self.requests.get(rid)
            if req is not None and req.sink is sink:
                req.sink = None

    def input_type(self) -> Any:
        return self.queue_type(self.pipeline.input)

    def queue_type(self, queue: str) -> Any:
        return resolve(self.pipeline.queues[queue].type, what="message type")

    # ------------------------------------------------------------------ scaling

    def active_instances(self, stage: str) -> list[_Instance]:
        return [
            i for i in self.stages[stage].instances.values()
            if i.state in (InstanceState.READY, InstanceState.STARTING)
        ]  # fmt: skip

    async def scale(self, stage: str, instances: int) -> None:
        """Spawn or drain instances until ``stage`` has ``instances`` of them."""
        if stage not in self.stages:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(self.stages)}")
        if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
        st = self.stages[stage]
        st.target = instances
        active = self.active_instances(stage)
        if instances > len(active):
            if self._spawn is None:
                raise AltoError("this runtime has no launcher: start instances yourself")
            for _ in range(instances - len(active)):
                iid = self.new_instance_id(stage)
                self.scale_events += 1
                try:
                    await self._spawn(stage, iid)
                except BaseException as exc:
                    inst = self.instances[iid]
                    inst.state = InstanceState.CRASHED
                    inst.last_error = f"could not be started: {exc}"
                    inst.stopped.set()
                    raise
        elif instances < len(active):
            # drain the instances with the least pinned work first
            victims = sorted(
                active, key=lambda i: (i.state == InstanceState.READY, i.open_groups, i.depth)
            )
            for inst in victims[: len(active) - instances]:
                self.scale_events += 1
                self._begin_drain(inst)

    async def drain(self, instance_id: int) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(f"unknown instance {instance_id}")
        if inst.state in (InstanceState.READY, InstanceState.STARTING):
            active = self.active_instances(inst.stage.name)
            if len(active) <= 1:
                raise ValueError(
                    f"instance {instance_id} is the last of stage {inst.stage.name!r}; "
                    "scale the stage up before draining it"
                )
            self.scale_events += 1
            inst.stage.target = len(active) - 1
            self._begin_drain(inst)

    def _begin_drain(self, inst: _Instance) -> None:
        st = inst.stage
        inst.state = InstanceState.DRAINING
        if inst.id in st.scheduler.instances:
            st.scheduler.remove_instance(inst.id)
        log.info(
            "draining instance %s/%d (%d pinned groups, depth %d)",
            st.name,
            inst.id,
            inst.open_groups,
            inst.depth,
        )
        self._maybe_finish_drain(inst)

    def _forget_old(self, st: _Stage, keep: int = 16) -> None:
        """Keep the records of only the last ``keep`` ended instances of a stage, so that
        scaling up and down for days does not grow the runtime (or its statistics)."""
        ended = [
            i for i in st.instances.values()
            if i.state in (InstanceState.STOPPED, InstanceState.CRASHED)
        ]  # fmt: skip
        for inst in ended[: max(0, len(ended) - keep)]:
            del st.instances[inst.id]
            self.instances.pop(inst.id, None)

    def begin_shutdown(self) -> None:
        """The runtime is about to stop its instances: their exits are not crashes."""
        self.closing = True

    async def _replace_crashed(self, st: _Stage) -> None:
        """Keep a stage at its target after a crash, as a supervisor would: spawn a
        replacement after a back-off, and give up (logged) after ``_MAX_RESTARTS`` crashes
        of one stage within ``_RESTART_WINDOW`` seconds, so broken stage code cannot loop."""
        now = trio.current_time()
        st.crash_times = [t for t in st.crash_times if now - t < _RESTART_WINDOW] + [now]
        if len(st.crash_times) > _MAX_RESTARTS:
            log.error(
                "stage %s crashed %d times within %d s; not restarting it (scale it to retry)",
                st.name, len(st.crash_times), _RESTART_WINDOW,
            )  # fmt: skip
            return
        await trio.sleep(min(8.0, 0.25 * 2 ** (len(st.crash_times) - 1)))
        if self.closing or self._spawn is None or len(self.active_instances(st.name)) >= st.target:
            return
        iid = self.new_instance_id(st.name)
        log.info("replacing a crashed instance of %s with %s/%d", st.name, st.name, iid)
        self.restarts += 1
        try:
            await self._spawn(st.name, iid)
        except Exception as exc:
            inst = self.instances[iid]
            inst.state = InstanceState.CRASHED
            inst.last_error = f"could not be started: {exc}"
            inst.stopped.set()

    def _finish_drain(self, inst: _Instance) -> None:
        if inst.conn is not None:
            inst.conn.send(encode(FrameKind.STOP, [0]))
        if self._stop_instance is not None:
            self._stop_instance(inst.id)

    def instance_exited(self, iid: int, returncode: int | None) -> None:
        """The launcher's report that an instance process ended."""
        inst = self.instances.get(iid)
        if inst is None or inst.state in (InstanceState.STOPPED, InstanceState.CRASHED):
            return
        inst.exit_code = returncode
        if inst.conn is not None:
            # Its reader still has to read what it sent before it died (outputs, ACKs);
            # the connection's EOF follows the exit, and the reader declares it lost then.
            return
        self.instance_lost(inst, f"process exited with code {returncode} before it connected")

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> RuntimeStatistics:
        insts = tuple(
            InstanceStatistics(
                instance_id=i.id,
                stage=i.stage.name,
                state=i.state,
                queue_depth=i.depth,
                credits=i.credits,
                backlog=len(i.backlog),
                open_groups=i.open_groups,
                frames_in=i.frames_in,
                frames_out=i.frames_out,
                pid=i.pid,
                last_error=i.last_error,
                credits_in_use=i.inflight,
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
                instances=tuple(
                    i.id
                    for i in s.instances.values()
                    if i.state not in (InstanceState.STOPPED, InstanceState.CRASHED)
                ),
                target_instances=s.target,
                frames_processed=s.frames_processed,
                errors=s.errors,
            )
            for s in self._by_index
        )
        return RuntimeStatistics(
            pipeline=self.pipeline.name,
            time=trio.current_time(),
            stages=stages,
            instances=insts,
            requests_in_flight=len(self.requests),
            requests_submitted=self.requests_submitted,
            requests_completed=self.requests_completed,
            requests_failed=self.requests_failed,
            requests_refused=self.requests_refused,
            frames_relayed=self.frames_relayed,
            max_inflight_requests=self.limits.max_inflight_requests,
            scale_events=self.scale_events,
            edges=self.pipeline.edges(),
        )

    def pinned_groups(self) -> dict[str, dict[bytes, int]]:
        """Open groups per stateful stage: key-path bytes -> instance id (for tests)."""
        return {s.name: {k: i.id for k, i in s.groups.items()} for s in self._by_index if s.level}


def _keepalive(sock: trio.socket.SocketType) -> None:
    """TCP peers on other machines: no Nagle delay, and a dead peer (host gone, cable out)
    noticed within about 25 s by kernel keepalives instead of never, so that its work fails
    with an error rather than hanging."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    except OSError as exc:
        log.debug("could not set TCP keepalive: %s", exc)


def _checked_header(buf: bytearray, off: int, size: int, max_size: int) -> tuple[int, ...]:
    """Unpack and validate a complete frame's header. Raises RemoteProtocolError."""
    if size + 4 > max_size:
        raise RemoteProtocolError(f"frame of {size + 4} bytes exceeds the limit of {max_size}")
    if size < 14:
        raise RemoteProtocolError(f"frame of {size + 4} bytes is shorter than a header")
    h = HEADER.unpack_from(buf, off)
    if h[4] == 0:
        raise RemoteProtocolError("frame with an empty key path")
    if 10 + 8 * h[4] + h[3] + h[5] > size + 4:
        raise RemoteProtocolError("frame header lengths exceed the frame")
    return h


def _path_str(key: bytes) -> str:
    return "[" + ", ".join(str(x) for x in struct.unpack(f"<{len(key) // 8}Q", key)) + "]"
