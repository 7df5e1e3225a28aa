"""The frame codec with bytes alone, as h11's tests/test_io.py: no sockets, no tasks.

Frames are fed whole, a byte at a time, several to one chunk and cut anywhere; the decoder
must give back exactly what was encoded, say NEED_DATA until a frame is complete, return
``None`` at a clean EOF, and raise RemoteProtocolError (never anything else) for truncated,
oversized, inconsistent or random input. Building a frame that the wire cannot carry is a
LocalProtocolError.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alto import LocalProtocolError, RemoteProtocolError
from alto.dataplane import NEED_DATA, Frame, FrameDecoder, FrameFlags, FrameKind, encode
from alto.dataplane._frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    PATH_OFFSET,
    encode_path,
    parse,
)

U64_MAX = 2**64 - 1


def decode_all(
    chunks: list[bytes], *, eof: bool = True, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> list[Frame]:
    """Feed ``chunks`` one by one, draining frames after each; then EOF if asked."""
    dec = FrameDecoder(max_frame_size)
    frames: list[Frame] = []

    def drain() -> None:
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA or ev is None:
                return
            assert isinstance(ev, Frame)
            frames.append(ev)

    for c in chunks:
        dec.receive_data(c)
        drain()
    if eof:
        dec.receive_data(b"")
        drain()
        assert dec.next_event() is None
    return frames


def raw_frame(
    *,
    kind: int = FrameKind.DATA,
    flags: int = 0,
    qlen: int | None = None,
    depth: int | None = None,
    pklen: int | None = None,
    path: tuple[int, ...] = (1,),
    queue: bytes = b"q",
    prompt_key: bytes = b"",
    payload: bytes = b"",
    size: int | None = None,
) -> bytes:
    """A frame built by hand, so that its header can lie about its lengths."""
    body = struct.pack(
        "<BBBBH",
        kind,
        flags,
        len(queue) if qlen is None else qlen,
        len(path) if depth is None else depth,
        len(prompt_key) if pklen is None else pklen,
    )
    body += b"".join(struct.pack("<Q", x) for x in path) + queue + prompt_key + payload
    return struct.pack("<I", len(body) if size is None else size) + body


SAMPLE = [
    Frame(FrameKind.DATA, (7,), "numbers", b"\x08\x0a"),
    Frame(FrameKind.DATA, (7, 0), "items", b"", flags=FrameFlags.LAST),
    Frame(FrameKind.ACK, (7, 0, 3)),
    Frame(FrameKind.DATA, (7, 1, 2), "bm25", b"tok" * 50, prompt_key=b"\xff\x00prompt"),
    Frame(FrameKind.CLOSE, (U64_MAX, 0)),
    Frame(FrameKind.HELLO, (0,), payload=b'{"token": "x"}'),
]


def enc(f: Frame, **kw: int) -> bytes:
    return encode(f.kind, f.key_path, f.queue, f.payload, f.prompt_key, f.flags, **kw)


SAMPLE_BYTES = b"".join(enc(f) for f in SAMPLE)


# ---------------------------------------------------------------- well-formed input


def test_layout_matches_the_documented_wire_format() -> None:
    data = encode(FrameKind.DATA, [5, 6], "ab", b"PAY", b"pk", FrameFlags.LAST)
    size, kind, flags, qlen, depth, pklen, rid = HEADER.unpack_from(data)
    assert size == len(data) - 4
    assert (kind, flags, qlen, depth, pklen, rid) == (FrameKind.DATA, 1, 2, 2, 2, 5)
    # the key path sits contiguous at a fixed offset: the relay hashes this slice
    assert data[PATH_OFFSET : PATH_OFFSET + 16] == encode_path((5, 6))
    assert data[PATH_OFFSET + 16 :] == b"ab" + b"pk" + b"PAY"
    assert parse(data, 0, len(data)) == Frame(
        FrameKind.DATA, (5, 6), "ab", b"PAY", b"pk", FrameFlags.LAST
    )


def test_whole_frames() -> None:
    for f in SAMPLE:
        assert decode_all([enc(f)]) == [f]


def test_one_byte_at_a_time() -> None:
    data = SAMPLE_BYTES
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        while (ev := dec.next_event()) is not NEED_DATA:
            assert isinstance(ev, Frame)
            frames.append(ev)
    assert frames == SAMPLE
    dec.receive_data(b"")
    assert dec.next_event() is None


def test_many_frames_in_one_chunk() -> None:
    assert decode_all([SAMPLE_BYTES]) == SAMPLE


def test_need_data_until_the_frame_is_complete() -> None:
    data = enc(SAMPLE[3])
    dec = FrameDecoder()
    assert dec.next_event() is NEED_DATA
    dec.receive_data(data[:3])  # not even the size
    assert dec.next_event() is NEED_DATA
    dec.receive_data(data[3:-1])
    assert dec.next_event() is NEED_DATA
    assert dec.next_event() is NEED_DATA  # asking again changes nothing
    dec.receive_data(data[-1:])
    assert dec.next_event() == SAMPLE[3]
    assert dec.next_event() is NEED_DATA


def test_trailing_data() -> None:
    first, second = enc(SAMPLE[0]), enc(SAMPLE[3])
    dec = FrameDecoder()
    assert dec.trailing_data == (b"", False)
    dec.receive_data(first + second[:10])
    assert dec.next_event() == SAMPLE[0]
    assert dec.next_event() is NEED_DATA
    assert dec.trailing_data == (second[:10], False)
    dec.receive_data(second[10:])
    assert dec.trailing_data == (second, False)
    assert dec.next_event() == SAMPLE[3]
    assert dec.trailing_data == (b"", False)
    dec.receive_data(b"")
    assert dec.trailing_data == (b"", True)


def test_clean_eof() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"")
    assert dec.next_event() is None
    assert dec.next_event() is None  # stays at EOF
    dec = FrameDecoder()
    dec.receive_data(enc(SAMPLE[0]))
    dec.receive_data(b"")
    assert dec.next_event() == SAMPLE[0]  # frames received before EOF still come out
    assert dec.next_event() is None


def test_receive_after_eof_is_a_local_error() -> None:
    dec = FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"x")


@pytest.mark.parametrize("cut", [1, 3, 4, 10, 17, 18, 30])
def test_eof_mid_frame(cut: int) -> None:
    data = enc(SAMPLE[3])
    assert cut < len(data)
    dec = FrameDecoder()
    dec.receive_data(data[:cut])
    assert dec.next_event() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dec.next_event()
    assert dec.trailing_data == (data[:cut], True)


def test_limits_that_still_fit() -> None:
    path = tuple(range(255))
    f = Frame(FrameKind.DATA, path, "q" * 255, b"p", b"k" * 0xFFFF, FrameFlags.LAST)
    assert decode_all([enc(f)]) == [f]
    f = Frame(FrameKind.DATA, (0, U64_MAX), "")
    assert decode_all([enc(f)]) == [f]
    f = Frame(FrameKind.STOP, (0,))  # the smallest frame: a header and one id
    assert len(enc(f)) == HEADER.size
    assert decode_all([enc(f)]) == [f]


# ---------------------------------------------------------------- size limits


def test_oversized_frame_is_refused_from_its_size_field_alone() -> None:
    limit = 1024
    ok = encode(FrameKind.DATA, [1], "q", b"x" * (limit - 19))
    assert len(ok) == limit
    assert decode_all([ok], max_frame_size=limit)[0].payload == b"x" * (limit - 19)
    big = encode(FrameKind.DATA, [1], "q", b"x" * (limit - 18))
    dec = FrameDecoder(limit)
    dec.receive_data(big[:4])  # the size is enough to know; nothing more is buffered
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 1024"):
        dec.next_event()


def test_encoding_an_oversized_frame_is_a_local_error() -> None:
    limit = 1024
    encode(FrameKind.DATA, [1], "q", b"x" * (limit - 19), max_frame_size=limit)
    with pytest.raises(LocalProtocolError, match="exceeds the limit of 1024"):
        encode(FrameKind.DATA, [1], "q", b"x" * (limit - 18), max_frame_size=limit)


def test_size_field_smaller_than_a_header() -> None:
    for size in range(HEADER.size - 4):
        dec = FrameDecoder()
        dec.receive_data(struct.pack("<I", size) + bytes(size))
        with pytest.raises(RemoteProtocolError, match="shorter than a header"):
            dec.next_event()


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "data",
    [
        raw_frame(qlen=200),  # the queue name runs past the frame
        raw_frame(pklen=1000),  # the prompt key runs past the frame
        raw_frame(depth=3, path=(1, 2)),  # the key path runs past the frame
        raw_frame(depth=9, path=(1,), queue=b"q" * 60),  # ... over the queue's bytes: caught
    ],
    ids=["qlen", "pklen", "depth", "depth-over-queue"],
)
def test_header_lengths_exceeding_the_frame(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="frame header claims"):
        decode_all([data])


def test_header_lengths_may_be_shorter_than_the_frame() -> None:
    # what the header does not claim is payload
    f = decode_all([raw_frame(qlen=0, queue=b"", payload=b"rest")])[0]
    assert (f.queue, f.payload) == ("", b"rest")


@pytest.mark.parametrize("kind", [0, 10, 18, 99, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"unknown frame kind {kind}"):
        decode_all([raw_frame(kind=kind)])


def test_empty_key_path_on_the_wire() -> None:
    # depth 0: the header still has room for path[0] (the request id's fixed offset)
    with pytest.raises(RemoteProtocolError, match="empty key path"):
        decode_all([raw_frame(depth=0, path=(1,))])


def test_non_ascii_queue_on_the_wire() -> None:
    with pytest.raises(RemoteProtocolError, match="not ASCII"):
        decode_all([raw_frame(queue="é".encode())])


def test_unknown_flag_bits_are_dropped() -> None:
    f = decode_all([raw_frame(flags=0xFF)])[0]
    assert f.flags == FrameFlags.LAST | FrameFlags.TRACED


def test_bad_frame_after_good_ones() -> None:
    dec = FrameDecoder()
    dec.receive_data(enc(SAMPLE[0]) + raw_frame(kind=99))
    assert dec.next_event() == SAMPLE[0]
    with pytest.raises(RemoteProtocolError):
        dec.next_event()


# ---------------------------------------------------------------- what encode refuses


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_path": []}, "1..255 ids, got 0"),
        ({"key_path": list(range(256))}, "1..255 ids, got 256"),
        ({"key_path": [-1]}, "outside 0..2\\*\\*64-1"),
        ({"key_path": [1, 2**64]}, "outside 0..2\\*\\*64-1"),
        ({"queue": "queue-é"}, "not ASCII"),
        ({"queue": "q" * 256}, "longer than 255 bytes"),
        ({"prompt_key": b"k" * 0x10000}, "longer than 65535 bytes"),
    ],
    ids=[
        "empty-path",
        "deep-path",
        "negative-id",
        "id-over-u64",
        "non-ascii",
        "long-queue",
        "long-pk",
    ],
)
def test_encode_refuses(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"kind": FrameKind.DATA, "key_path": [1], "queue": "q"} | kwargs
    with pytest.raises(LocalProtocolError, match=match):
        encode(**args)  # type: ignore[arg-type]


def test_protocol_errors_are_alto_errors() -> None:
    import alto

    assert issubclass(LocalProtocolError, alto.ProtocolError)
    assert issubclass(RemoteProtocolError, alto.ProtocolError)
    assert issubclass(alto.ProtocolError, alto.AltoError)


# ---------------------------------------------------------------- properties

ids = st.integers(0, U64_MAX)
frames = st.builds(
    Frame,
    kind=st.sampled_from(FrameKind),
    key_path=st.lists(ids, min_size=1, max_size=8).map(tuple),
    queue=st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=40),
    payload=st.binary(max_size=300),
    prompt_key=st.binary(max_size=40),
    flags=st.sampled_from(FrameFlags),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=10), st.lists(st.integers(0, 10**6), max_size=30))
def test_round_trip_under_any_chunking(fs: list[Frame], cuts: list[int]) -> None:
    data = b"".join(enc(f) for f in fs)
    chunks = [c for c in split(data, cuts) if c]  # an empty chunk would mean EOF
    assert decode_all(chunks) == fs
    assert b"".join(chunks) == data


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        # garbage behind a plausible header is more interesting than pure noise
        st.tuples(
            st.integers(14, 300), st.binary(min_size=6, max_size=6), st.binary(max_size=300)
        ).map(lambda t: struct.pack("<I", t[0]) + t[1] + t[2]),
        # a valid frame followed by garbage
        st.tuples(frames, st.binary(max_size=100)).map(lambda t: enc(t[0]) + t[1]),
    ),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_garbage_raises_only_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    chunks = [c for c in split(data, cuts) if c]
    try:
        decode_all(chunks, max_frame_size=4096)
    except RemoteProtocolError:
        pass
