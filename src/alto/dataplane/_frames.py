"""The alto frame codec: bytes in, frames out, and no I/O at all (as h11 does).

Wire format (little endian)::

    offset size  field
    0      4     size       bytes that follow this field (so a frame is 4 + size bytes)
    4      1     kind       FrameKind
    5      1     flags      FrameFlags
    6      1     qlen       length of the queue name
    7      1     depth      number of ids in the key path (>= 1; path[0] is the request id)
    8      2     pklen      length of the prompt key
    10     8*depth          key path, u64 each: [request, child, grandchild, ...]
    ..     qlen             queue name (ASCII)
    ..     pklen            prompt key (UTF-8 bytes, opaque to the runtime)
    ..     rest             payload (protobuf bytes; the runtime never decodes it)

Why this layout: the relay's per-frame work must stay at one ``struct.unpack_from`` and a
few slices (see ``docs/relay.md``). The request id sits at a fixed offset (10), and the key
path is contiguous, so the aggregation key of level L is the byte slice
``frame[10 : 10 + 8 * L]`` and is hashed without decoding any id.

Limits: frames larger than ``max_frame_size`` (default 16 MiB, as gRPC's default message
limit is 4 MiB and Kafka's 1 MiB: alto carries token embeddings, so a little more) are a
:class:`RemoteProtocolError` when received and a :class:`LocalProtocolError` when built.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from .._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER",
    "MIN_FRAME_SIZE",
    "NEED_DATA",
    "PATH_OFFSET",
    "PROTOCOL_VERSION",
    "SIZE",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FrameKind",
    "check_header",
    "encode",
    "encode_path",
    "frame_size",
    "payload_offset",
]

# The fixed header, unpacked in one call wherever frames are scanned; name the fields
# where you unpack it: ``size, kind, flags, qlen, depth, pklen, rid = HEADER.unpack_from(...)``
# (measured faster than indexing the tuple). ``rid`` is path[0], the request id.
HEADER: Final = struct.Struct("<IBBBBHQ")
SIZE: Final = struct.Struct("<I")  # the length prefix alone
PATH_OFFSET: Final = 10  # bytes before the key path: size(4) kind flags qlen depth pklen(2)
MIN_FRAME_SIZE: Final = PATH_OFFSET + 8  # a header with a one-id key path and nothing else
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
# The version of this protocol (frame kinds, HELLO/WELCOME fields) that peers say in
# HELLO. A runtime refuses an instance or client of another version with an error naming
# both, rather than failing later on a frame one of them does not know.
PROTOCOL_VERSION: Final = 2
MAX_DEPTH: Final = 255


class FrameKind(enum.IntEnum):
    DATA = 1  # a partial output on its way to a queue
    ACK = 2  # an instance finished the frame with this key path (frees a credit)
    CLOSE = 3  # a producer closed the child stream at this key path: no more items under it
    GROUP_CLOSED = 4  # runtime -> stateful instance: the group at this key path is complete
    DONE = 5  # runtime -> client: the request finished
    ERROR = 6  # stage -> runtime: processing failed; runtime -> client: the request failed
    HELLO = 7  # first frame of every connection: JSON {token, role, ...}
    WELCOME = 8  # runtime's answer to HELLO: JSON {instance, credits, ...}
    # client -> runtime: a new request; path[0] is the client's correlation id, the payload
    # the input message; the prompt-key field carries the request's options as a JSON
    # object (``timeout``: seconds; ``traceparent``: W3C trace context), or is empty
    SUBMIT = 9
    # 10 is unused: results reach a client as the DATA frames their stage wrote, unchanged
    REFUSED = 11  # runtime -> client: the request was refused (overload); payload says why
    ACCEPTED = 12  # runtime -> client: path = [correlation id, request id]
    STOP = 13  # runtime -> instance: finish in-flight work and exit
    # runtime -> instance: drop every input of request path[0] (it ended); client ->
    # runtime: the client no longer wants request path[0]
    CANCEL = 14
    SPAN = 15  # instance -> runtime: JSON timings of one processed input of a traced request
    STATS = 16  # instance -> runtime: JSON metric deltas (histograms) since the last STATS
    READY = 17  # instance -> runtime: set up (model loaded): it may be sent work from now on


class FrameFlags(enum.IntFlag):
    NONE = 0
    LAST = 1  # DATA: this item is the only/last one of its child stream (closes the child)
    # DATA, GROUP_CLOSED: the request is traced; the instance reports a SPAN for this
    # input and marks its outputs TRACED too
    TRACED = 2


_KNOWN_FLAGS: Final = int(FrameFlags.LAST | FrameFlags.TRACED)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    key_path: tuple[int, ...]
    queue: str = ""
    payload: bytes = b""
    prompt_key: bytes = b""
    flags: FrameFlags = FrameFlags.NONE

    @property
    def request_id(self) -> int:
        return self.key_path[0]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


def frame_size(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    """The whole size (length prefix included) of the frame starting at ``buf[off]``;
    needs only its first 4 bytes."""
    size: int = SIZE.unpack_from(buf, off)[0]
    return size + 4


def payload_offset(off: int, depth: int, qlen: int, pklen: int) -> int:
    """Where the payload of the frame at ``off`` starts, from its header fields."""
    return off + PATH_OFFSET + 8 * depth + qlen + pklen


def check_header(
    buf: bytes | bytearray | memoryview, off: int, max_frame_size: int
) -> tuple[int, int, int, int, int, int, int]:
    """Unpack and validate the header of the complete frame at ``buf[off]``.

    Raises RemoteProtocolError when the frame is oversized, shorter than a header, has an
    empty key path, or its header's lengths run past its end.
    """
    whole = frame_size(buf, off)
    if whole > max_frame_size:
        raise RemoteProtocolError(f"frame of {whole} bytes exceeds the limit of {max_frame_size}")
    if whole < MIN_FRAME_SIZE:
        raise RemoteProtocolError(f"frame of {whole} bytes is shorter than a header")
    h: tuple[int, int, int, int, int, int, int] = HEADER.unpack_from(buf, off)
    _size, _kind, _flags, qlen, depth, pklen, _rid = h
    if depth == 0:
        raise RemoteProtocolError("frame with an empty key path")
    if PATH_OFFSET + 8 * depth + qlen + pklen > whole:
        raise RemoteProtocolError("frame header lengths exceed the frame")
    return h


def encode_path(path: tuple[int, ...] | list[int]) -> bytes:
    """The key path's wire bytes; also the runtime's key for groups and children."""
    return struct.pack(f"<{len(path)}Q", *path)


def encode(
    kind: FrameKind,
    key_path: tuple[int, ...] | list[int],
    queue: str = "",
    payload: bytes = b"",
    prompt_key: bytes = b"",
    flags: int = 0,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    """Build one frame's bytes.

    Raises LocalProtocolError when the frame cannot be represented: an empty key path or
    one deeper than 255, an id outside u64, a queue name that is not ASCII or longer than
    255 bytes, a prompt key over 65535 bytes, or a frame over ``max_frame_size``.
    """
    depth = len(key_path)
    if not 1 <= depth <= MAX_DEPTH:
        raise LocalProtocolError(f"key path must have 1..{MAX_DEPTH} ids, got {depth}")
    try:
        qbytes = queue.encode("ascii")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"queue name {queue!r} is not ASCII") from exc
    if len(qbytes) > 255:
        raise LocalProtocolError(f"queue name {queue[:20]!r}... longer than 255 bytes")
    if len(prompt_key) > 0xFFFF:
        raise LocalProtocolError("prompt key longer than 65535 bytes")
    try:
        path_bytes = struct.pack(f"<{depth}Q", *key_path)
    except struct.error as exc:
        raise LocalProtocolError(f"key path {key_path!r} holds an id outside 0..2**64-1") from exc
    size = PATH_OFFSET - 4 + len(path_bytes) + len(qbytes) + len(prompt_key) + len(payload)
    if size + 4 > max_frame_size:
        raise LocalProtocolError(f"frame of {size + 4} bytes exceeds the limit of {max_frame_size}")
    return b"".join(
        (
            struct.pack("<IBBBBH", size, kind, flags, len(qbytes), depth, len(prompt_key)),
            path_bytes,
            qbytes,
            prompt_key,
            payload,
        )
    )


def parse(buf: bytes | bytearray | memoryview, off: int, end: int) -> Frame:
    """Decode the complete frame at ``buf[off:end]`` (``end`` is the frame's end).

    Raises RemoteProtocolError when the frame is inconsistent.
    """
    _size, kind, flags, qlen, depth, pklen, _rid = HEADER.unpack_from(buf, off)
    if depth == 0:
        raise RemoteProtocolError("frame with an empty key path")
    try:
        fkind = FrameKind(kind)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame kind {kind}") from None
    p = off + PATH_OFFSET
    q = p + 8 * depth
    k = q + qlen
    d = k + pklen
    if d > end:
        raise RemoteProtocolError(
            f"frame header claims {d - off} bytes of key path, queue and prompt key "
            f"but the frame has {end - off}"
        )
    path = struct.unpack_from(f"<{depth}Q", buf, p)
    try:
        queue = bytes(buf[q:k]).decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("queue name is not ASCII") from None
    return Frame(
        fkind, path, queue, bytes(buf[d:end]), bytes(buf[k:d]), FrameFlags(flags & _KNOWN_FLAGS)
    )


class FrameDecoder:
    """Sans-IO decoder: feed bytes with :meth:`receive_data`, take frames with
    :meth:`next_event` until it returns :data:`NEED_DATA`.

    ``receive_data(b"")`` signals EOF; afterwards :meth:`next_event` returns ``None``, or
    raises RemoteProtocolError if a frame was cut off mid-way. Consumed bytes are dropped
    once per :meth:`receive_data`, not once per frame, so a receive holding many frames
    costs one copy.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._start = 0
        self._eof = False

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not yet parsed, and whether EOF was seen."""
        return bytes(self._buf[self._start :]), self._eof

    def receive_data(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        if not data:
            self._eof = True
        else:
            if self._eof:
                raise LocalProtocolError("receive_data after EOF")
            self._buf += data

    def next_event(self) -> Frame | _NeedData | None:
        """The next frame, NEED_DATA, or ``None`` at a clean EOF.

        Raises RemoteProtocolError: the peer sent an oversized, malformed or truncated
        frame; the connection must be closed.
        """
        buf, off = self._buf, self._start
        avail = len(buf) - off
        if avail >= 4:
            whole = frame_size(buf, off)
            if whole > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {whole} bytes exceeds the limit of {self.max_frame_size}"
                )
            if whole < MIN_FRAME_SIZE:
                raise RemoteProtocolError(f"frame of {whole} bytes is shorter than a header")
            if avail >= whole:
                frame = parse(buf, off, off + whole)
                self._start = off + whole
                return frame
        if self._eof:
            if avail:
                raise RemoteProtocolError(
                    f"connection closed in the middle of a frame ({avail} bytes)"
                )
            return None
        return NEED_DATA
