"""The outside end of a runtime connection: the handshake and the receive loop, once.

Instances (``alto._worker``), clients (``alto._client``) and the tests' fake peers all
speak to the runtime the same way: send HELLO (JSON: token, role, ...), read WELCOME or
REFUSED, then read frames until EOF. :class:`PeerConnection` does that over any stream,
given two coroutine functions, so it serves trio streams, anyio streams (the worker runs
under trio or asyncio) and raw trio sockets alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .._errors import AuthenticationError, RemoteProtocolError
from ._frames import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameKind,
    encode,
)

__all__ = ["PeerConnection"]

RECEIVE_SIZE = 256 * 1024


class PeerConnection:
    """Frames to and from the runtime over one stream.

    ``send_all(data)`` sends bytes; ``receive_some()`` returns the next bytes, or ``b""``
    at EOF (translate your stream's end-of-stream and broken-connection exceptions to
    ``b""``: either way no more frames will come).
    """

    def __init__(
        self,
        send_all: Callable[[bytes], Awaitable[None]],
        receive_some: Callable[[], Awaitable[bytes]],
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.send_all = send_all
        self._receive_some = receive_some
        self.decoder = FrameDecoder(max_frame_size)

    async def next_frame(self) -> Frame | None:
        """The next frame, or None at a clean EOF.

        Raises RemoteProtocolError when the runtime sent a malformed frame or closed the
        connection in the middle of one.
        """
        while True:
            ev = self.decoder.next_event()
            if ev is NEED_DATA:
                self.decoder.receive_data(bytes(await self._receive_some()))
                continue
            assert ev is None or isinstance(ev, Frame)
            return ev

    async def handshake(self, hello: dict[str, Any]) -> dict[str, Any]:
        """Send HELLO with ``hello`` as its JSON body; return WELCOME's JSON body.

        Raises AuthenticationError when the runtime refuses (wrong token, unknown stage,
        a limit reached: the message says which) or closes the connection instead of
        answering, RemoteProtocolError when it answers with another frame.
        """
        hello = {"protocol": PROTOCOL_VERSION, **hello}
        await self.send_all(encode(FrameKind.HELLO, [0], payload=json.dumps(hello).encode()))
        frame = await self.next_frame()
        if frame is None:
            raise AuthenticationError("the runtime closed the connection during the handshake")
        if frame.kind == FrameKind.REFUSED:
            raise AuthenticationError(
                f"the runtime refused the connection: {frame.payload.decode(errors='replace')}"
            )
        if frame.kind != FrameKind.WELCOME:
            raise RemoteProtocolError(f"expected WELCOME, got {frame.kind.name}")
        body = json.loads(frame.payload)
        if not isinstance(body, dict):
            raise RemoteProtocolError("WELCOME payload is not a JSON object")
        return body
