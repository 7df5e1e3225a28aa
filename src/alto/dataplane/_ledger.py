"""The ledger: every rule about when a group is complete and when a request is done.

This module owns the paper's correctness story (design invariant 3); the relay reports
what it saw (an entry routed to a stage, an acknowledgement, a closed child stream, a
group opened) and the ledger decides, once per received batch in :meth:`Ledger.settle`,
which groups close and which requests finish. docs/architecture.md ("Accounting") explains
the rules; here is the vocabulary:

* a *live entry* is a frame routed to a stage and not yet acknowledged by the instance
  that processes it. Stage code acknowledges an input only after it has written every
  output for it, on the same ordered connection, so when the ACK is read its children
  have already been counted;
* a request is *done* when it has no live entry (and hence no open group): the ledger
  tells its sink;
* a group ``(S, P)`` of a stateful stage S (P: the key-path prefix at S's level) is
  *complete* when no live entry at a stage upstream of S can still produce an item under
  P: no entry whose path starts with P, and no entry at an ancestor path A of P whose
  child ``P[:len(A)+1]`` is still open (its producer has not closed that child stream
  with a LAST item or a CLOSE frame). Then the ledger has GROUP_CLOSED dispatched to the
  pinned instance, behind the group's last item on the same connection. GROUP_CLOSED is
  itself a live entry until acknowledged, so what the aggregator emits is counted before
  the request can finish;
* exact-path and prefix counts are kept only for stages that can hold a stateful group
  open (``Stage.tracked``), and only at the levels those groups use; for every other
  stage the ledger keeps one number per request, ``live_total``.

The relay's fast path inlines two of these rules for frames into and ACKs from untracked
stages (``live_total += 1`` on dispatch, ``live_total -= n`` and marking the request
dirty on a coalesced ACK). ``tests/runtime/test_relay.py`` checks, property-based, that
the fast and the general path leave the ledger in the same state.

A request that fails (a stage error, a crashed instance, a client that stopped reading,
its deadline passing) or is cancelled (its client went away or asked) leaves the ledger
at once: its pins are released, the ``ended`` callback lets the relay drop its queued
frames and tell the instances holding its work, and its later frames find no request and
are discarded by the relay. Every request that leaves, whichever way, is reported once
to ``finished`` as a :class:`~alto.dataplane.RequestOutcome` (latency metrics, the list
of recent requests).
"""

from __future__ import annotations

import itertools
import logging
import math
import struct
from collections.abc import Callable
from typing import Any

import trio

from .._errors import OverloadedError, truncate_error
from ._connections import Sink
from ._frames import PATH_OFFSET, FrameFlags, FrameKind, encode
from ._stats import RequestOutcome
from ._topology import Instance, Stage, Topology

log = logging.getLogger("alto.runtime")

__all__ = ["Ledger", "Request"]


class Request:
    """One admitted request and its accounting."""

    __slots__ = (
        "admitted_at",
        "closed",
        "closed_groups",
        "deadline",
        "first_result_at",
        "groups",
        "key",
        "live",
        "live_total",
        "results",
        "rid",
        "sink",
        "sub",
        "trace",
    )

    def __init__(self, rid: int, sink: Sink | None, admitted_at: float) -> None:
        self.rid = rid
        self.key = struct.pack("<Q", rid)  # path[0] as frame bytes
        self.sink = sink
        self.admitted_at = admitted_at  # trio.current_time() at admission
        self.first_result_at: float | None = None
        self.results = 0  # frames delivered to its sink
        self.deadline = math.inf  # trio time past which it fails ("deadline exceeded")
        self.trace: Any = None  # its TraceRecord when the request is traced (see _tracing)
        self.live_total = 0  # live entries of this request, at every stage
        # Tracked stages only: live entries by (stage index, exact path) ...
        self.live: dict[tuple[int, bytes], int] = {}
        # ... and by (stage index, path prefix at a level some stateful stage groups by).
        self.sub: dict[tuple[int, bytes], int] = {}
        self.closed: set[bytes] = set()  # child paths whose producer closed them
        self.groups: dict[tuple[int, bytes], Instance] = {}  # open groups -> pinned instance
        self.closed_groups: set[tuple[int, bytes]] = set()


def _path_str(key: bytes) -> str:
    return "[" + ", ".join(str(x) for x in struct.unpack(f"<{len(key) // 8}Q", key)) + "]"


class Ledger:
    """Requests in flight and the accounting rules. No I/O: the effects of a decision go
    through two callbacks that the runtime wires up:

    * ``dispatch(instance, rid, frame)``: send a GROUP_CLOSED frame to a pinned instance;
    * ``unpinned(instance)``: an instance lost a pinned group (a draining instance may be
      able to stop now);
    * ``ended(request)``: a request failed or was cancelled while it may still have work
      queued or in flight (the relay drops and cancels it);
    * ``finished(outcome)``: a request left the ledger, whichever way.
    """

    def __init__(self, topology: Topology) -> None:
        self.by_index = topology.by_index
        self.requests: dict[int, Request] = {}
        self.dirty: set[Request] = set()  # touched since the last settle()
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.refused = 0
        self._rids = itertools.count(1)
        self.cancelled = 0
        self.timed_out = 0
        self.dispatch: Callable[[Instance, int, bytes], None] = _unwired
        self.unpinned: Callable[[Instance], None] = _unwired
        self.ended: Callable[[Request], None] = _ignore
        self.finished: Callable[[RequestOutcome], None] = _ignore

    # ------------------------------------------------------------------ admission

    def admit(self, sink: Sink | None, now: float, *, limit: int, closing: bool) -> Request:
        """Register a new request with a fresh id.

        Raises OverloadedError when ``limit`` requests are in flight or the runtime is
        ``closing``.
        """
        if closing:
            self.refused += 1
            raise OverloadedError("the runtime is shutting down", retry_after=5.0)
        if len(self.requests) >= limit:
            self.refused += 1
            raise OverloadedError(
                f"{len(self.requests)} requests in flight, the limit is {limit}", retry_after=1.0
            )
        req = Request(next(self._rids), sink, now)
        self.requests[req.rid] = req
        self.submitted += 1
        return req

    # ------------------------------------------------------------------ entries

    def add_entry(self, req: Request, st: Stage, frame: bytes, depth: int) -> None:
        """A frame (with a key path of ``depth`` ids) was routed to stage ``st``."""
        req.live_total += 1
        if st.tracked:
            path = frame[PATH_OFFSET : PATH_OFFSET + 8 * depth]
            k = (st.index, path)
            req.live[k] = req.live.get(k, 0) + 1
            for lvl in st.track_levels:
                if depth >= lvl:
                    k = (st.index, path[: 8 * lvl])
                    req.sub[k] = req.sub.get(k, 0) + 1

    def remove_entry(self, req: Request, st: Stage, path: bytes) -> None:
        """The instance of ``st`` acknowledged one frame with key path ``path`` (bytes)."""
        req.live_total -= 1
        if st.tracked:
            k = (st.index, path)
            n = req.live.get(k, 0) - 1
            if n > 0:
                req.live[k] = n
            else:
                req.live.pop(k, None)
            depth = len(path) // 8
            for lvl in st.track_levels:
                if depth >= lvl:
                    k = (st.index, path[: 8 * lvl])
                    n = req.sub.get(k, 0) - 1
                    if n > 0:
                        req.sub[k] = n
                    else:
                        req.sub.pop(k, None)
            self.dirty.add(req)
        elif req.live_total == 0:
            self.dirty.add(req)

    def remove_entries(self, req: Request, n: int) -> None:
        """An untracked stage acknowledged ``n`` frames of ``req`` at once (a coalesced ACK)."""
        req.live_total -= n
        if req.live_total <= 0:
            self.dirty.add(req)

    def close_child(self, req: Request, path: bytes) -> None:
        """The producer of the child stream at ``path`` closed it: nothing more under it."""
        req.closed.add(path)
        self.dirty.add(req)

    # ------------------------------------------------------------------ groups

    def open_group(self, req: Request, st: Stage, key: bytes, inst: Instance) -> None:
        """Pin the new group ``key`` of stateful stage ``st`` to ``inst`` (invariant 1: it
        stays there until it closes, whatever the scheduler decides meanwhile)."""
        st.groups[key] = inst
        inst.open_groups += 1
        req.groups[(st.index, key)] = inst
        self.dirty.add(req)

    def group_closed_already(self, req: Request, st: Stage, key: bytes) -> str | None:
        """Why an item for ``key`` must not open a new group, or None.

        An item for a group that already closed is a stage bug (e.g. a write after its
        child was closed): failing the request says so, where silently opening a second
        group would split the aggregation.
        """
        if (st.index, key) in req.closed_groups:
            return f"an item for group {_path_str(key)} of stage {st.name!r} arrived after that group was closed"
        return None

    def group_complete(self, req: Request, st: Stage, key: bytes) -> bool:
        """The rule of the module docstring for group ``key`` of stage ``st``."""
        live, sub, closed = req.live, req.sub, req.closed
        for t in st.upstream:
            if (t, key) in sub:
                return False
        for k in range(1, st.level):
            if key[: 8 * (k + 1)] in closed:
                continue
            anc = key[: 8 * k]
            for t in st.upstream:
                if (t, anc) in live:
                    return False
        return True

    # ------------------------------------------------------------------ settling

    def settle(self) -> None:
        """Close the complete groups and finish the complete requests among those touched
        since the last call. The relay calls it once per received batch."""
        while self.dirty:
            dirty, self.dirty = self.dirty, set()
            for req in dirty:
                if self.requests.get(req.rid) is not req:
                    continue  # failed meanwhile
                if req.groups:
                    for (sidx, key), inst in list(req.groups.items()):
                        st = self.by_index[sidx]
                        if self.group_complete(req, st, key):
                            self._close_group(req, st, key, inst)
                if req.live_total == 0 and not req.groups:
                    self._complete(req)

    def _close_group(self, req: Request, st: Stage, key: bytes, inst: Instance) -> None:
        del req.groups[(st.index, key)]
        req.closed_groups.add((st.index, key))
        if st.groups.get(key) is inst:
            del st.groups[key]
        inst.open_groups -= 1
        depth = len(key) // 8
        path = struct.unpack(f"<{depth}Q", key)
        traced = req.trace is not None
        frame = encode(FrameKind.GROUP_CLOSED, path, flags=FrameFlags.TRACED if traced else 0)
        if traced:
            req.trace.hop("runtime", None, "", st.name, inst.id, path, kind="group_closed")
        self.add_entry(req, st, frame, depth)
        self.dispatch(inst, req.rid, frame)
        self.dirty.add(req)

    def _complete(self, req: Request) -> None:
        del self.requests[req.rid]
        self.completed += 1
        if req.sink is not None:
            req.sink.done(req.rid)
        self._report(req, "done", "")

    def _report(self, req: Request, status: str, message: str) -> None:
        self.finished(
            RequestOutcome(
                request_id=req.rid,
                status=status,
                admitted_at=req.admitted_at,
                first_result_at=req.first_result_at,
                finished_at=trio.current_time(),
                results=req.results,
                error=message,
                traced=req.trace is not None,
            )
        )

    # ------------------------------------------------------------------ failure

    def fail(self, rid: int, message: str, *, status: str = "failed") -> Request | None:
        """End request ``rid`` with an error naming its cause; release its pins; have its
        remaining work dropped. ``status``: ``failed``, ``cancelled`` (nobody waits for
        it any more) or ``timed_out`` (its deadline passed). Returns the request, or None
        when it had already ended."""
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        message = truncate_error(message)
        if status == "cancelled":
            self.cancelled += 1
            log.info("request %d cancelled: %s", rid, message)
        else:
            if status == "timed_out":
                self.timed_out += 1
            self.failed += 1
            log.warning("request %d failed: %s", rid, message)
        self.ended(req)  # while req.groups still says where its groups are pinned
        groups, req.groups = req.groups, {}
        for (sidx, key), inst in groups.items():
            st = self.by_index[sidx]
            if st.groups.get(key) is inst:
                del st.groups[key]
            inst.open_groups -= 1
            self.unpinned(inst)
        if req.sink is not None:
            req.sink.error(rid, message)
        self._report(req, status, message)
        return req

    def expire(self, now: float) -> float:
        """Fail the requests whose deadline is past ``now``; return the next deadline
        (``inf`` when none). Linear in the requests in flight: the runtime calls it when
        the earliest deadline it knows of passes, not per frame."""
        late = [req for req in self.requests.values() if req.deadline <= now]
        for req in late:
            timeout = req.deadline - req.admitted_at
            self.fail(
                req.rid,
                f"deadline exceeded: the request did not finish within {timeout:g} s",
                status="timed_out",
            )
        return min((req.deadline for req in self.requests.values()), default=math.inf)


def _ignore(*args: object) -> None:
    pass


def _unwired(*args: object) -> None:
    raise AssertionError("the runtime did not wire this ledger callback")
