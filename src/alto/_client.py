"""The Python client: submit requests, get each request's results streamed back.

Trio-native::

    async with alto.open_client("demo") as client:          # reads the discovery file
        async for result in client.submit(Number(value=10)):
            print(result.queue, result.key_path, result.message)

From a plain script, wrap it in ``trio.run``. Many requests may be in flight on one
client: one connection, one reader task, one channel per request.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from google.protobuf.message import Message

from ._config import resolve
from ._errors import OverloadedError, RequestFailed, RuntimeUnavailable
from ._serve import read_discovery
from .dataplane._frames import FrameKind, encode
from .dataplane._peer import PeerConnection
from .dataplane._runtime import check_timeout
from .dataplane._tls import client_context_from_env
from .dataplane._tracing import parse_traceparent

__all__ = ["Client", "Result", "open_client"]


@dataclass(frozen=True, slots=True)
class Result:
    """One partial output that reached a sink queue."""

    request_id: int
    queue: str
    key_path: tuple[int, ...]
    message: Message


class Client:
    def __init__(self, stream: trio.abc.Stream, token: str) -> None:
        self._stream = stream
        self._token = token
        self._peer = PeerConnection(stream.send_all, self._receive_some)
        self._corr = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[Any]] = {}
        self._by_rid: dict[int, trio.MemorySendChannel[Any]] = {}
        self._types: dict[str, type[Message]] = {}
        self.pipeline = ""
        self.input_queue = ""
        self._send_lock = trio.Lock()
        # Submissions left before their ACCEPTED arrived (correlation ids): cancelled then.
        self._abandoned: set[int] = set()
        self._accepted: dict[int, int] = {}  # correlation id -> request id, not yet read
        self._closed = False

    async def _handshake(self) -> None:
        body = await self._peer.handshake({"token": self._token, "role": "client"})
        self.pipeline = body["pipeline"]
        self.input_queue = body["input"]
        self._types = {
            q: resolve(t, what="message type") for q, t in body.get("queues", {}).items()
        }

    async def _receive_some(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(256 * 1024))
        except trio.BrokenResourceError:
            return b""

    @staticmethod
    def _deliver(ch: trio.MemorySendChannel[Any], item: tuple[str, Any]) -> None:
        """Hand an event to a submit() call; one that has already returned ignores it."""
        try:
            ch.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _reader(self) -> None:
        try:
            while True:
                frame = await self._peer.next_frame()
                if frame is None:
                    break
                k = frame.kind
                if k == FrameKind.ACCEPTED:
                    corr, rid = frame.key_path[0], frame.key_path[1]
                    ch = self._pending.pop(corr, None)
                    if ch is not None:
                        self._by_rid[rid] = ch
                        self._accepted[corr] = rid  # until its submit() has read it
                        self._deliver(ch, ("accepted", rid))
                    elif corr in self._abandoned:
                        # Its submit() was left before the runtime accepted it: nobody
                        # will read its results, so it is cancelled now that it has an id.
                        self._abandoned.discard(corr)
                        await self.cancel(rid)
                elif k == FrameKind.REFUSED and frame.key_path[0] in self._abandoned:
                    self._abandoned.discard(frame.key_path[0])
                elif k == FrameKind.REFUSED:
                    ch = self._pending.pop(frame.key_path[0], None)
                    if ch is not None:
                        self._deliver(ch, ("refused", _refusal(frame.payload)))
                elif k == FrameKind.DATA:
                    ch = self._by_rid.get(frame.key_path[0])
                    if ch is not None:
                        self._deliver(ch, ("result", frame))
                elif k in (FrameKind.DONE, FrameKind.ERROR):
                    ch = self._by_rid.pop(frame.key_path[0], None)
                    if ch is not None:
                        self._deliver(
                            ch,
                            ("done", None)
                            if k == FrameKind.DONE
                            else ("error", frame.payload.decode()),
                        )
        finally:
            self._closed = True
            for ch in [*self._pending.values(), *self._by_rid.values()]:
                self._deliver(ch, ("lost", None))
            self._pending.clear()
            self._by_rid.clear()

    def message_type(self, queue: str) -> type[Message]:
        return self._types[queue]

    async def submit(
        self,
        message: Message,
        *,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> AsyncGenerator[Result, None]:
        """Submit one request; yield its results as they arrive.

        ``timeout``: seconds after which the request fails with "deadline exceeded" and
        its work is cancelled (default: the deployment's ``request_timeout``, if any).
        ``traceparent``: a W3C trace context; the request's trace continues it.
        Leaving the loop before the request is done cancels it: its remaining work stops.

        Raises OverloadedError if the runtime refused it for load, ValueError for an input
        or option it refused (too large, a timeout out of range, a malformed
        traceparent), RequestFailed if a stage failed (the message names stage and
        instance) or its deadline passed, RuntimeUnavailable if the connection was lost.
        """
        if self._closed:
            raise RuntimeUnavailable("the connection to the runtime is closed")
        options: dict[str, float | str] = {}
        if timeout is not None:
            options["timeout"] = check_timeout(timeout)
        if traceparent is not None:
            parse_traceparent(traceparent)
            options["traceparent"] = traceparent
        corr = next(self._corr)
        send, recv = trio.open_memory_channel[Any](math.inf)
        self._pending[corr] = send
        async with self._send_lock:
            await self._stream.send_all(
                encode(
                    FrameKind.SUBMIT,
                    [corr],
                    self.input_queue,
                    message.SerializeToString(),
                    json.dumps(options).encode() if options else b"",
                )
            )
        rid = 0
        finished = False
        try:
            async for kind, value in recv:
                if kind == "accepted":
                    rid = value
                    self._accepted.pop(corr, None)
                elif kind == "refused":
                    finished = True
                    reason, text, retry_after = value
                    if reason == "overloaded":
                        raise OverloadedError(text, retry_after=retry_after)
                    raise ValueError(f"the runtime refused the request: {text}")
                elif kind == "result":
                    typ = self._types.get(value.queue)
                    msg = typ.FromString(value.payload) if typ is not None else value.payload
                    yield Result(rid, value.queue, value.key_path, msg)
                elif kind == "error":
                    finished = True
                    raise RequestFailed(rid, value)
                elif kind == "lost":
                    finished = True
                    raise RuntimeUnavailable("the connection to the runtime was lost")
                else:
                    finished = True
                    return
        finally:  # also when the caller stops early: forget this request's channel
            recv.close()
            self._pending.pop(corr, None)
            if not rid:  # accepted meanwhile, but left before reading it?
                rid = self._accepted.pop(corr, 0)
            if not rid and not finished:
                self._abandoned.add(corr)  # cancelled when its ACCEPTED arrives
            if rid:
                self._by_rid.pop(rid, None)
                if not finished and not self._closed:
                    # Nobody will read its results: stop its work in the pipeline.
                    with trio.CancelScope(shield=True):
                        await self.cancel(rid)

    async def cancel(self, request_id: int) -> None:
        """Cancel one of this client's requests (its ``submit`` loop then ends with
        RequestFailed "cancelled by its client"). Unknown or finished ids are ignored."""
        if self._closed:
            return
        try:
            async with self._send_lock:
                await self._stream.send_all(encode(FrameKind.CANCEL, [request_id]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def run(
        self,
        message: Message,
        *,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> list[Result]:
        """Submit and collect every result (raises like :meth:`submit`)."""
        return [r async for r in self.submit(message, timeout=timeout, traceparent=traceparent)]


def _refusal(payload: bytes) -> tuple[str, str, float]:
    """(reason, message, retry_after) of a REFUSED frame: a JSON object (``reason``:
    ``overloaded`` or ``invalid``), or plain text from an older runtime."""
    try:
        body = json.loads(payload)
        return str(body["reason"]), str(body["message"]), float(body.get("retry_after", 1.0))
    except (ValueError, KeyError, TypeError):
        return "overloaded", payload.decode(errors="replace"), 1.0


@asynccontextmanager
async def open_client(
    pipeline: str | None = None,
    *,
    address: str | None = None,
    token: str | None = None,
    tls_ca: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to a running runtime.

    ``pipeline`` finds it through the discovery file that ``alto serve`` writes; or give
    ``address`` (``unix:/path`` or ``HOST:PORT``) and ``token``. A ``HOST:PORT`` is reached
    over TLS when ``tls_ca`` (or ``$ALTO_TLS_CA``) names the PEM file of the CA, or of the
    runtime's own certificate, to trust. Raises RuntimeUnavailable when nothing answers or
    the TLS handshake fails, AuthenticationError on a bad token (or a plain connection to a
    TLS runtime, which closes it), ConfigError when the CA file cannot be used.
    """
    if address is None:
        if pipeline is None:
            raise ValueError("give a pipeline name or an address")
        disc = read_discovery(pipeline)
        address = "unix:" + disc["socket"]
        token = token or disc["token"]
    if token is None:
        raise ValueError("a token is needed with an explicit address")
    try:
        if address.startswith("unix:"):
            stream: trio.abc.Stream = await trio.open_unix_socket(address[5:])
        else:
            host, _, port = address.rpartition(":")
            ctx = client_context_from_env(tls_ca)
            if ctx is None:
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            else:
                tls = await trio.open_ssl_over_tcp_stream(
                    host.strip("[]"), int(port), ssl_context=ctx, https_compatible=True
                )
                try:
                    await tls.do_handshake()  # here, so that a failure says what it is
                except trio.BrokenResourceError as exc:
                    await trio.aclose_forcefully(tls)
                    raise RuntimeUnavailable(
                        f"TLS handshake with the runtime at {address} failed: {exc.__cause__ or exc}"
                    ) from exc
                stream = tls
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot connect to the runtime at {address}: {exc}") from exc
    async with stream:
        client = Client(stream, token)
        await client._handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
