"""Connections and sinks: the runtime's side of every socket, and where results go.

* :class:`Conn` wraps one accepted socket with an output buffer and one writer task:
  the relay appends to ``out`` synchronously (never an await per frame) and wakes the
  writer, which sends everything buffered in one call (docs/relay.md).
* :func:`read_hello` reads the first frame of a connection, which must be HELLO (JSON:
  token, role, ...); the runtime answers WELCOME or REFUSED (see ``_runtime``). The
  other side of that handshake, shared by the client, the worker and the tests, is
  :mod:`alto.dataplane._peer`.
* A *sink* is where a request's results go: a client connection (:class:`ConnSink`) or an
  in-process consumer such as the HTTP ingress (:class:`LocalSink`). Both are bounded: a
  consumer that stops reading fails its request (``result()`` answers False and says why
  in ``refusal``) instead of growing the runtime's memory (design invariant 5).
"""

from __future__ import annotations

import json
import logging
import socket
from collections import deque
from typing import Any

import trio

from .._errors import RemoteProtocolError
from ._frames import SIZE, FrameKind, encode, parse
from ._stats import RequestEvent

log = logging.getLogger("alto.runtime")

__all__ = ["CLIENT_OUT_LIMIT", "Conn", "ConnSink", "LocalSink", "Sink", "read_hello"]

CLIENT_OUT_LIMIT = 8 * 1024 * 1024  # unsent result bytes for one client before it is cut off
HELLO_TIMEOUT = 10.0  # seconds a new connection has to say HELLO
MAX_HELLO = 65536  # bytes: a HELLO is a small JSON object


class Conn:
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
        """Send what is buffered, then stop the writer."""
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


class Sink:
    """Where a request's results go."""

    refusal = ""  # why the last result() was refused

    def result(self, rid: int, frame: bytes) -> bool:
        """Deliver one result frame. False: the consumer cannot take it (``refusal``
        says why) and the request must fail."""
        raise NotImplementedError

    def done(self, rid: int) -> None:
        raise NotImplementedError

    def error(self, rid: int, message: str) -> None:
        raise NotImplementedError


class ConnSink(Sink):
    """A client connection: results leave as the DATA frames the stages wrote."""

    def __init__(self, conn: Conn, corr: int) -> None:
        self.conn, self.corr = conn, corr

    def result(self, rid: int, frame: bytes) -> bool:
        if len(self.conn.out) > CLIENT_OUT_LIMIT:
            # A client that does not read its results is disconnected rather than buffered
            # for without end.
            self.refusal = (
                f"the client left {len(self.conn.out)} bytes of results unread; it was disconnected"
            )
            log.error("%s", self.refusal)
            self.conn.abort()
            return False
        self.conn.send(frame)
        return True

    def done(self, rid: int) -> None:
        self.conn.send(encode(FrameKind.DONE, [rid]))

    def error(self, rid: int, message: str) -> None:
        self.conn.send(encode(FrameKind.ERROR, [rid], payload=message.encode()))


class LocalSink(Sink):
    """In-process consumer (the HTTP ingress): events in a deque, a lot to wake the reader."""

    LIMIT = 65536  # unread events; past it the request fails

    def __init__(self) -> None:
        self.events: deque[RequestEvent] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.finished = False

    def _push(self, ev: RequestEvent) -> None:
        self.events.append(ev)
        self.lot.unpark_all()

    def result(self, rid: int, frame: bytes) -> bool:
        if self.finished:
            return True
        if len(self.events) >= self.LIMIT:
            self.refusal = f"the consumer of this request left {self.LIMIT} results unread"
            return False
        f = parse(frame, 0, len(frame))
        self._push(
            RequestEvent("result", rid, f.queue, f.key_path, f.payload, time=trio.current_time())
        )
        return True

    def done(self, rid: int) -> None:
        if not self.finished:
            self.finished = True
            self._push(RequestEvent("done", rid, time=trio.current_time()))

    def error(self, rid: int, message: str) -> None:
        if not self.finished:
            self.finished = True
            self._push(RequestEvent("error", rid, message=message, time=trio.current_time()))


async def read_hello(sock: trio.socket.SocketType) -> tuple[dict[str, Any], bytes] | None:
    """Read the first frame of a new connection: HELLO with a JSON object.

    Returns the object and whatever bytes followed it, or None (logged) when the peer
    sent something else, too much, nothing within :data:`HELLO_TIMEOUT`, or closed.
    """
    buf = b""
    with trio.move_on_after(HELLO_TIMEOUT):
        while len(buf) < 4 or len(buf) < 4 + SIZE.unpack_from(buf)[0]:
            if len(buf) >= 4 and SIZE.unpack_from(buf)[0] > MAX_HELLO:
                log.warning("refused a connection: first frame too large")
                return None
            chunk = await sock.recv(MAX_HELLO)
            if not chunk:
                return None
            buf += chunk
        whole = 4 + SIZE.unpack_from(buf)[0]
        try:
            f = parse(buf, 0, whole)
            if f.kind != FrameKind.HELLO:
                raise RemoteProtocolError(f"expected HELLO, got {f.kind.name}")
            body = json.loads(f.payload)
            if not isinstance(body, dict):
                raise RemoteProtocolError("HELLO payload is not a JSON object")
        except (RemoteProtocolError, ValueError) as exc:
            log.warning("refused a connection: %s", exc)
            return None
        return body, buf[whole:]
    log.warning("refused a connection: no HELLO within %s s", HELLO_TIMEOUT)
    return None


def set_tcp_options(sock: trio.socket.SocketType) -> None:
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
