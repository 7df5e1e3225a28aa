"""The relay: read frames, route them, dispatch them within credits, take ACKs.

One Trio task reads each connection (:meth:`Relay.read_loop`) and one writes it
(``_connections.Conn.writer``). A reader parses *every complete frame of each receive*
and handles it before it awaits anything (docs/relay.md has the measurements: a trip
through Trio's scheduler per frame would cap the relay at tens of thousands of frames per
second). Payloads stay opaque bytes; only the fixed header is read.

Routing per edge (design.md, "Routing"):

* into a stateful stage with aggregation level L: the group key is the key path's first
  L ids, i.e. the byte slice ``frame[PATH_OFFSET : PATH_OFFSET + 8 * L]``. An open group is
  pinned to the instance chosen when its first item arrived and stays there until the
  ledger closes it (invariant 1), whatever the scheduler's ring does meanwhile;
* into other stages: the stage's scheduler chooses, with the prompt key as the key when
  the frame carries one (prompt-sticky), else with no key (round robin, least outstanding).

Two paths through :meth:`Relay.scan_instance`, side by side in one loop:

* the *fast path*, inline: DATA into a pinned group or a keyless stage whose entries the
  ledger does not track, and a coalesced ACK from an untracked stage. No calls but dict
  lookups, one ``struct.unpack_from`` per frame, and consecutive frames for one
  destination leave as one slice of the receive buffer (a *run*);
* the *general path*: everything else (a group to open, a tracked or idempotent stage, a
  child stream that closes, a prompt key, errors) goes through :meth:`route` and
  :meth:`instance_frame`, which do the same and more. Before it, the open run is flushed,
  so the order on every connection is the order of arrival.

Credits and backpressure (invariant 5): an instance holds at most ``credits``
unacknowledged frames; the rest wait in its backlog in the runtime; a reader whose batch
pushed a backlog past ``backlog_limit`` stops reading (:meth:`wait_overfull`) until it
drains below half, and the kernel's socket buffers carry the pressure to the producer.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict, deque
from collections.abc import Callable

import trio

from .._config import RuntimeLimits
from .._errors import RemoteProtocolError, truncate_error
from .._telemetry import GAUGES, merge_histogram
from ._connections import Conn
from ._frames import (
    HEADER,
    MIN_FRAME_SIZE,
    PATH_OFFSET,
    SIZE,
    FrameFlags,
    FrameKind,
    check_header,
    encode,
    frame_size,
    payload_offset,
)
from ._ledger import Ledger, Request
from ._schedulers import NoInstanceError
from ._stats import InstanceState
from ._topology import Instance, Stage, Topology
from ._tracing import TraceRecord, path_of

log = logging.getLogger("alto.runtime")

__all__ = ["RECV_SIZE", "Relay"]

RECV_SIZE = 256 * 1024  # relay-notes: 256 KiB did best (16 KiB and 1 MiB were 30-35% slower)
# Traces of requests that ended with work still running (failed, cancelled, timed out):
# their instances report the cancelled inputs' spans after the end (milliseconds later),
# and those belong in the trace: they show the work done until the CANCEL arrived. As many
# as the tracer keeps recent traces; older ones are forgotten. (A trace exported through
# OpenTelemetry at the end does not get these late spans.)
ENDED_TRACES_KEPT = 256

_DATA = FrameKind.DATA
_ACK = FrameKind.ACK
_CLOSE = FrameKind.CLOSE
_ERROR = FrameKind.ERROR
_LAST = int(FrameFlags.LAST)  # plain ints: IntFlag's & runs in Python, per frame
_TRACED = int(FrameFlags.TRACED)
_SPAN = FrameKind.SPAN
_SET_UP = FrameKind.READY
_STATS = FrameKind.STATS
_READY = InstanceState.READY
_DRAINING = InstanceState.DRAINING


class Relay:
    """Moves frames between connections; keeps credits, queue depths and backlogs.

    Callbacks wired by the runtime:

    * ``on_idle(instance)``: a draining instance may have finished its work;
    * ``on_ready(instance)``: an instance finished its set-up (READY);
    * ``on_client_frame(conn, buf, off, fend, header)``: a frame from a client (SUBMIT).
    """

    def __init__(self, topology: Topology, ledger: Ledger, limits: RuntimeLimits) -> None:
        self.topology = topology
        self.ledger = ledger
        self.max_frame_size = limits.max_frame_size
        self.backlog_limit = limits.backlog_limit
        self.queues = ", ".join(q.decode() for q in topology.routes)
        # False sends every frame through the general path: the differential test of the
        # fast path runs both on the same input and compares what they did.
        self.fast_path = True
        self.frames_relayed = 0
        self.frames_discarded = 0  # frames of requests that had already ended
        self.frames_retried = 0
        self.ended_traces: OrderedDict[int, TraceRecord] = OrderedDict()
        # What the batch being handled pushed over the backlog limit (see wait_overfull).
        self.overfull: list[Instance] = []
        self.on_idle: Callable[[Instance], None] = _no_idle
        self.on_ready: Callable[[Instance], None] = _no_idle
        self.on_client_frame: Callable[[Conn, bytearray, int, int, tuple[int, ...]], None] = (
            _no_clients
        )

    # ------------------------------------------------------------------ receiving

    async def read_loop(self, conn: Conn, inst: Instance | None, rest: bytes) -> None:
        """Receive into one buffer and handle every complete frame of each receive, until
        EOF. ``inst`` is the instance behind ``conn``, or None for a client.

        Raises RemoteProtocolError when the peer sends a malformed or oversized frame or
        closes in the middle of one; OSError when the connection breaks.
        """
        sock = conn.sock
        buf = bytearray(max(RECV_SIZE, len(rest)))
        end = len(rest)
        buf[:end] = rest
        max_size = self.max_frame_size
        ledger = self.ledger
        while True:
            self.overfull.clear()  # left by callers that do not read (ingress, retries)
            off = (
                self.scan_instance(inst, buf, end)
                if inst is not None
                else self._scan_client(conn, buf, end)
            )
            if end - off >= 4 and frame_size(buf, off) > max_size:
                raise RemoteProtocolError(
                    f"frame of {frame_size(buf, off)} bytes exceeds the limit of {max_size}"
                )
            if off:
                buf[: end - off] = buf[off:end]
                end -= off
            need = frame_size(buf, 0) if end >= 4 else 0
            if need > len(buf):  # a frame larger than the buffer: grow for it
                buf.extend(bytes(need - len(buf)))
            elif len(buf) > RECV_SIZE and end <= RECV_SIZE and need <= RECV_SIZE:
                # ... and shrink back once it is through (never while it is pending: the
                # next receive would get no room and read as EOF), so that one large frame
                # does not hold max_frame_size bytes for the life of the connection.
                del buf[RECV_SIZE:]
            ledger.settle()
            if self.overfull:
                overfull, self.overfull = self.overfull, []
                await self.wait_overfull(conn, overfull)
            if inst is not None and inst.ended:
                return  # declared lost meanwhile: its later frames must not count
            n = await sock.recv_into(memoryview(buf)[end:])
            if n == 0:
                if end:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of a frame ({end} bytes)"
                    )
                return
            end += n

    def _scan_client(self, conn: Conn, buf: bytearray, end: int) -> int:
        off = 0
        max_size = self.max_frame_size
        while end - off >= MIN_FRAME_SIZE:
            fend = off + frame_size(buf, off)
            if fend > end:
                break
            h = check_header(buf, off, max_size)
            self.on_client_frame(conn, buf, off, fend, h)
            off = fend
        return off

    def scan_instance(self, inst: Instance, buf: bytearray, end: int) -> int:
        """Handle every complete frame in ``buf[:end]`` from ``inst``; return the offset of
        the first incomplete one. The hot path: see the module docstring.

        Raises RemoteProtocolError on a malformed frame; what came before it is handled.
        """
        # Everything the loop needs, bound to locals once per batch.
        max_size = self.max_frame_size
        backlog_limit = self.backlog_limit
        unpack = HEADER.unpack_from
        unpack_count = SIZE.unpack_from
        P = PATH_OFFSET
        ledger = self.ledger
        requests = ledger.requests
        dirty = ledger.dirty
        routes = self.topology.routes
        overfull = self.overfull
        st = inst.stage
        # Frames from this stage that need the general path: ACKs where the ledger tracks
        # exact paths or frames are retained; DATA of an idempotent stage (it marks inputs
        # as started); DATA closing a child that matters to a group downstream.
        acks_general = st.tracked or st.retains or not self.fast_path
        data_general = st.retains or not self.fast_path
        # DATA of a traced request always takes the general path (it records hops).
        slow_flags = (_LAST if st.tracks_children else 0) | _TRACED
        off = 0
        n_in = 0
        run_conn: Conn | None = None  # the destination of the run buf[run_start:off]
        run_start = 0
        # Caches for runs of frames alike, valid within this scan (groups close only after
        # it; a request that fails meanwhile is no longer in ``requests``): the last queue
        # name and its route, and the last level-1 group (its key is the request id).
        last_q = b"\x00"  # no queue name is a NUL byte
        last_dst: Stage | None = None
        last_rid = -1
        last_inst: Instance | None = None
        relayed = 0
        try:
            while end - off >= MIN_FRAME_SIZE:
                size, kind, flags, qlen, depth, pklen, rid = unpack(buf, off)
                fend = off + 4 + size
                if fend > end:
                    break
                if (
                    size + 4 < MIN_FRAME_SIZE
                    or size + 4 > max_size
                    or depth == 0
                    or P + 8 * depth + qlen + pklen > size + 4
                ):
                    check_header(buf, off, max_size)  # raises, naming what is wrong
                n_in += 1
                if kind == _DATA and not data_general and not flags & slow_flags:
                    # ---- fast path: DATA
                    req = requests.get(rid)
                    q0 = off + P + 8 * depth
                    if qlen == len(last_q) and buf.startswith(last_q, q0):
                        dst = last_dst
                    else:
                        last_q = bytes(buf[q0 : q0 + qlen])
                        dst = last_dst = routes.get(last_q)
                    to: Instance | None = None
                    if req is not None and dst is not None and not dst.tracked and not dst.retains:
                        if dst.level == 1:
                            if rid == last_rid and last_inst is not None and last_inst.stage is dst:
                                to = last_inst
                            else:
                                to = dst.groups.get(bytes(buf[off + P : off + P + 8]))
                                last_rid, last_inst = rid, to
                        elif dst.level:
                            if depth >= dst.level:
                                to = dst.groups.get(bytes(buf[off + P : off + dst.key_end]))
                        elif not pklen:
                            try:
                                to = dst.instances[dst.scheduler.choose(None, dst.loads)]
                            except NoInstanceError:
                                to = None
                    if to is not None and req is not None:
                        relayed += 1
                        req.live_total += 1  # the ledger's rule for an untracked entry
                        to.queue_depth += 1
                        to.stage.loads[to.id] = to.queue_depth
                        rc = to.req_counts
                        rc[rid] = rc.get(rid, 0) + 1
                        conn2 = to.conn
                        if to.credits_in_use < to.credits and not to.backlog and conn2 is not None:
                            to.credits_in_use += 1
                            to.frames_out += 1
                            if run_conn is not conn2:
                                if run_conn is not None:
                                    run_conn.send(buf[run_start:off])
                                run_conn, run_start = conn2, off
                        else:
                            if run_conn is not None:
                                run_conn.send(buf[run_start:off])
                                run_conn = None
                            to.backlog.append(bytes(buf[off:fend]))
                            if len(to.backlog) > backlog_limit:
                                overfull.append(to)
                        off = fend
                        continue
                    # ---- general path: DATA
                    if run_conn is not None:
                        run_conn.send(buf[run_start:off])
                        run_conn = None
                    last_inst = None  # the general path may open or fail groups
                    self.route(st, buf, off, fend, depth, qlen, pklen, flags, rid, inst)
                elif run_conn is not None:
                    # Anything else first ends the run, then is handled with no run open.
                    run_conn.send(buf[run_start:off])
                    run_conn = None
                    n_in -= 1
                    continue
                elif kind == _ACK and not acks_general:
                    # ---- fast path: a coalesced ACK. An untracked stage may acknowledge n
                    # frames of one request with one ACK whose payload is n (u32); no
                    # payload means 1.
                    p = payload_offset(off, depth, qlen, pklen)
                    n = unpack_count(buf, p)[0] if fend - p >= 4 else 1
                    if not 0 < n <= inst.credits_in_use:
                        raise RemoteProtocolError(
                            f"ACK of {n} frames, but {inst.credits_in_use} are unacknowledged"
                        )
                    self.credit_back(inst, rid, n)
                    req = requests.get(rid)
                    if req is not None:
                        req.live_total -= n  # the ledger's remove_entries(), inline
                        if req.live_total <= 0:
                            dirty.add(req)
                    if inst.state is _DRAINING:
                        self.on_idle(inst)
                else:
                    # ---- general path: ACK, CLOSE, ERROR
                    last_inst = None
                    self.instance_frame(inst, buf, off, fend, kind, depth, qlen, pklen, rid)
                off = fend
        finally:
            # Also when a malformed frame ends the scan: what was counted as sent is sent.
            if run_conn is not None:
                run_conn.send(buf[run_start:off])
            inst.frames_in += n_in
            self.frames_relayed += relayed
        return off

    # ------------------------------------------------------------------ the general path

    def route(
        self,
        src: Stage | None,
        buf: bytearray,
        off: int,
        fend: int,
        depth: int,
        qlen: int,
        pklen: int,
        flags: int,
        rid: int,
        src_inst: Instance | None = None,
    ) -> None:
        """Route one DATA frame from ``src`` (None: the ingress), written by ``src_inst``."""
        ledger = self.ledger
        req = ledger.requests.get(rid)
        if req is None:  # the request ended (failed) or was never admitted
            self.frames_discarded += 1
            return
        q0 = off + PATH_OFFSET + 8 * depth
        qname = bytes(buf[q0 : q0 + qlen])
        dst = self.topology.routes.get(qname)
        who = repr(src.name) if src is not None else "the ingress"
        if dst is None and qname not in self.topology.routes:
            self.fail(
                rid,
                f"stage {who} wrote to unknown queue {qname.decode('ascii', 'replace')!r}; queues: {self.queues}",
            )
            return
        if src is not None and flags & _LAST and src.tracks_children:
            ledger.close_child(req, bytes(buf[off + PATH_OFFSET : off + PATH_OFFSET + 8 * depth]))
        self.frames_relayed += 1
        frame = bytes(buf[off:fend])
        trace = req.trace if flags & _TRACED else None
        if dst is None:  # a sink queue: straight to the client
            if req.first_result_at is None:
                req.first_result_at = trio.current_time()
            req.results += 1
            if trace is not None:
                trace.hop(
                    src.name if src is not None else "ingress",
                    src_inst.id if src_inst is not None else None,
                    qname.decode(),
                    "sink",
                    None,
                    path_of(frame, 0, depth),
                )
            if req.sink is not None and not req.sink.result(rid, frame):
                self.fail(rid, req.sink.refusal)
            return
        if dst.level:
            if depth < dst.level:
                self.fail(
                    rid,
                    f"frame for stateful stage {dst.name!r} has key path depth {depth} < its aggregation level {dst.level}",
                )
                return
            key = frame[PATH_OFFSET : dst.key_end]
            inst = dst.groups.get(key)
            if inst is None:
                why = ledger.group_closed_already(req, dst, key)
                if why is not None:
                    self.fail(rid, f"stage {who} wrote {why}")
                    return
                try:
                    inst = dst.instances[dst.scheduler.choose(key, dst.loads)]
                except NoInstanceError:
                    self.fail(rid, f"no instance of stage {dst.name!r} is available")
                    return
                ledger.open_group(req, dst, key, inst)
        else:
            pk = None
            if pklen:
                k0 = q0 - off + qlen
                pk = frame[k0 : k0 + pklen]
            try:
                inst = dst.instances[dst.scheduler.choose(pk, dst.loads)]
            except NoInstanceError:
                self.fail(rid, f"no instance of stage {dst.name!r} is available")
                return
        ledger.add_entry(req, dst, frame, depth)
        if trace is not None:
            trace.hop(
                src.name if src is not None else "ingress",
                src_inst.id if src_inst is not None else None,
                qname.decode(),
                dst.name,
                inst.id,
                path_of(frame, 0, depth),
            )
        self.dispatch(inst, rid, frame)

    def instance_frame(
        self,
        inst: Instance,
        buf: bytearray,
        off: int,
        fend: int,
        kind: int,
        depth: int,
        qlen: int,
        pklen: int,
        rid: int,
    ) -> None:
        """Handle a frame from ``inst`` that the fast path does not take."""
        st = inst.stage
        if kind in (_DATA, _CLOSE) and inst.retained:
            # Idempotent stages: note that the input this output descends from started
            # (its retry would duplicate output).
            path = bytes(buf[off + PATH_OFFSET : off + PATH_OFFSET + 8 * depth])
            for k in range(depth, 0, -1):
                if path[: 8 * k] in inst.retained:
                    inst.started.add(path[: 8 * k])
                    break
        if kind == _DATA:
            flags = buf[off + 5]
            self.route(st, buf, off, fend, depth, qlen, pklen, flags, rid, inst)
        elif kind == _ACK:
            self.ack(inst, buf, off, fend, depth, qlen, pklen, rid)
        elif kind == _CLOSE:
            req = self.ledger.requests.get(rid)
            if req is not None and st.tracks_children:
                self.ledger.close_child(
                    req, bytes(buf[off + PATH_OFFSET : off + PATH_OFFSET + 8 * depth])
                )
        elif kind == _SPAN:
            req = self.ledger.requests.get(rid)
            trace = req.trace if req is not None else self.ended_traces.get(rid)
            if trace is not None:
                try:
                    trace.span(bytes(buf[payload_offset(off, depth, qlen, pklen) : fend]))
                except ValueError as exc:  # telemetry: logged, never fatal
                    log.warning("%s/%d sent a malformed SPAN: %s", st.name, inst.id, exc)
        elif kind == _STATS:
            payload = bytes(buf[payload_offset(off, depth, qlen, pklen) : fend])
            try:
                body = json.loads(payload)
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
                for name, delta in body.items():
                    if name == GAUGES:
                        if not isinstance(delta, dict) or len(delta) > 256:
                            raise ValueError("gauges must be an object of at most 256 numbers")
                        inst.gauges = {
                            str(k)[:128]: float(v)
                            for k, v in delta.items()
                            if isinstance(v, (int, float))
                        }
                    else:
                        merge_histogram(st.metrics, delta, name)
            except ValueError as exc:
                log.warning("%s/%d sent malformed STATS: %s", st.name, inst.id, exc)
        elif kind == _SET_UP:
            self.on_ready(inst)
        elif kind == _ERROR and rid == 0:
            # Not about a request: the instance says why it cannot start (its setup failed).
            p = payload_offset(off, depth, qlen, pklen)
            inst.last_error = truncate_error(bytes(buf[p:fend]).decode("utf-8", "replace"))
        elif kind == _ERROR:
            st.errors += 1
            p = payload_offset(off, depth, qlen, pklen)
            msg = bytes(buf[p:fend]).decode("utf-8", "replace")
            inst.last_error = truncate_error(msg)
            self.fail(rid, f"stage {st.name!r} instance {inst.id}: {msg}")
        else:
            name = FrameKind(kind).name if kind in FrameKind._value2member_map_ else str(kind)
            raise RemoteProtocolError(f"unexpected {name} frame from an instance")

    def ack(
        self,
        inst: Instance,
        buf: bytearray,
        off: int,
        fend: int,
        depth: int,
        qlen: int,
        pklen: int,
        rid: int,
    ) -> None:
        """An ACK through the general path: exact (one frame, its key path) for a tracked
        or idempotent stage, where coalescing is off; possibly coalesced (a count, as the
        fast path takes it) for any other stage."""
        st = inst.stage
        p = payload_offset(off, depth, qlen, pklen)
        n = SIZE.unpack_from(buf, p)[0] if fend - p >= 4 else 1
        if n != 1 and (st.tracked or st.retains):
            raise RemoteProtocolError(
                "this stage's ACKs must name one frame each (coalesce_acks is off)"
            )
        if not 0 < n <= inst.credits_in_use:
            raise RemoteProtocolError(
                f"ACK of {n} frames, but {inst.credits_in_use} are unacknowledged"
            )
        self.credit_back(inst, rid, n)
        if n != 1:
            req = self.ledger.requests.get(rid)
            if req is not None:
                self.ledger.remove_entries(req, n)
            if inst.state is _DRAINING:
                self.on_idle(inst)
            return
        path = bytes(buf[off + PATH_OFFSET : off + PATH_OFFSET + 8 * depth])
        if inst.retained:
            dq = inst.retained.get(path)
            if dq:
                dq.popleft()
                if not dq:
                    del inst.retained[path]
                    inst.started.discard(path)
        req = self.ledger.requests.get(rid)
        if req is not None:
            self.ledger.remove_entry(req, st, path)
        if inst.state is _DRAINING:
            self.on_idle(inst)

    # ------------------------------------------------------------------ dispatch and credits

    def dispatch(self, inst: Instance, rid: int, frame: bytes) -> None:
        """Send ``frame`` (of request ``rid``) to ``inst`` within its credits, or queue it
        in its backlog."""
        inst.queue_depth += 1
        inst.stage.loads[inst.id] = inst.queue_depth
        rc = inst.req_counts
        rc[rid] = rc.get(rid, 0) + 1
        if inst.retained is not None:
            depth = frame[7]
            inst.retained.setdefault(frame[PATH_OFFSET : PATH_OFFSET + 8 * depth], deque()).append(
                frame
            )
        if inst.credits_in_use < inst.credits and not inst.backlog and inst.conn is not None:
            inst.credits_in_use += 1
            inst.frames_out += 1
            inst.conn.send(frame)
        else:
            inst.backlog.append(frame)
            if len(inst.backlog) > self.backlog_limit:
                self.overfull.append(inst)

    def credit_back(self, inst: Instance, rid: int, n: int) -> None:
        """``n`` frames of request ``rid`` on ``inst`` were acknowledged: give the credits
        back, lower its queue depth, and send what waited in its backlog."""
        inst.credits_in_use -= n
        inst.queue_depth -= n
        st = inst.stage
        st.loads[inst.id] = inst.queue_depth
        st.frames_processed += n
        rc = inst.req_counts
        c = rc.get(rid, 0) - n
        if c > 0:
            rc[rid] = c
        else:
            rc.pop(rid, None)
        if inst.backlog:
            self.refill(inst)

    def refill(self, inst: Instance) -> None:
        """Credits came back: move frames from the backlog to the connection."""
        conn = inst.conn
        if conn is None:
            return
        while inst.backlog and inst.credits_in_use < inst.credits:
            conn.send(inst.backlog.popleft())
            inst.credits_in_use += 1
            inst.frames_out += 1
        if inst.unblocked and len(inst.backlog) <= self.backlog_limit // 2:
            inst.unblocked.unpark_all()

    async def wait_overfull(self, conn: Conn, overfull: list[Instance]) -> None:
        """Backpressure: stop reading ``conn`` until the backlogs it filled drain.

        ``overfull`` is what this reader's last batch filled: the list is taken between
        the batch and the first await, so no other reader's entries are in it.
        """
        limit = self.backlog_limit
        while overfull:
            inst = overfull.pop()
            if inst.conn is conn:  # never wait for our own acknowledgements
                continue
            while len(inst.backlog) > limit // 2 and inst.state in (_READY, _DRAINING):
                await inst.unblocked.park()

    # ------------------------------------------------------------------ failure

    def fail(self, rid: int, message: str) -> None:
        """Fail request ``rid`` (through the ledger)."""
        self.ledger.fail(rid, message)

    def cancel_work(self, req: Request) -> None:
        """``req`` ended (failed or cancelled): drop its frames still waiting in backlogs
        and send CANCEL to every instance that holds some of its inputs, so that they
        stop working on it (their ACKs still come back and return the credits)."""
        rid = req.rid
        if req.trace is not None:
            self.ended_traces[rid] = req.trace
            if len(self.ended_traces) > ENDED_TRACES_KEPT:
                self.ended_traces.popitem(last=False)
        cancel = encode(FrameKind.CANCEL, [rid])
        pinned = set(req.groups.values())  # they hold its groups' state
        for st in self.topology.by_index:
            for inst in st.instances.values():
                held = inst.req_counts.get(rid, 0)
                if not held:
                    if inst in pinned and inst.conn is not None:
                        inst.conn.send(cancel)
                    continue
                if inst.backlog:
                    kept: deque[bytes] = deque()
                    dropped = 0
                    for frame in inst.backlog:
                        if frame[PATH_OFFSET : PATH_OFFSET + 8] == req.key:
                            dropped += 1
                            if inst.retained is not None:
                                _forget_retained(inst, frame)
                        else:
                            kept.append(frame)
                    if dropped:
                        inst.backlog = kept
                        self.frames_discarded += dropped
                        inst.queue_depth -= dropped
                        if inst.id in st.loads:
                            st.loads[inst.id] = inst.queue_depth
                        held -= dropped
                        if held:
                            inst.req_counts[rid] = held
                        else:
                            del inst.req_counts[rid]
                        if inst.unblocked and len(inst.backlog) <= self.backlog_limit // 2:
                            inst.unblocked.unpark_all()
                if (held or inst in pinned) and inst.conn is not None:
                    inst.conn.send(cancel)
                if inst.state is _DRAINING:
                    self.on_idle(inst)

    def ingress(self, req: Request, frame: bytes) -> None:
        """Route a new request's input frame (built by the runtime) and settle."""
        _size, _kind, flags, qlen, depth, pklen, rid = HEADER.unpack_from(frame, 0)
        self.route(None, bytearray(frame), 0, len(frame), depth, qlen, pklen, flags, rid)
        self.ledger.settle()


def _forget_retained(inst: Instance, frame: bytes) -> None:
    """Remove ``frame`` (dropped from the backlog) from an idempotent instance's
    retained frames, so that a crash does not retry it."""
    assert inst.retained is not None
    depth = frame[7]
    path = frame[PATH_OFFSET : PATH_OFFSET + 8 * depth]
    dq = inst.retained.get(path)
    if dq is not None:
        for i, f in enumerate(dq):
            if f is frame:
                del dq[i]
                break
        if not dq:
            del inst.retained[path]
            inst.started.discard(path)


def _no_idle(inst: Instance) -> None:
    pass


def _no_clients(conn: Conn, buf: bytearray, off: int, fend: int, h: tuple[int, ...]) -> None:
    raise RemoteProtocolError("this connection may not send client frames")
