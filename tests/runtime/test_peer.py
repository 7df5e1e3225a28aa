"""The outside end of a runtime connection: the handshake every peer shares
(``alto.dataplane._peer``), the client, and the worker's output buffer."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from runtime_helpers import TIMEOUT, demo_pipeline, wait_until

from alto import AuthenticationError
from alto._errors import RemoteProtocolError
from alto._worker import _OUT_HIGH_WATER, _Output
from alto.dataplane import FrameKind, encode
from alto.dataplane._frames import PROTOCOL_VERSION
from alto.dataplane._peer import PeerConnection
from alto.examples.demo_pb2 import Number, Total
from alto.testing import FakePeer, open_pipeline

# --------------------------------------------------------------------------- the handshake


def scripted_peer(*chunks: bytes) -> tuple[PeerConnection, list[bytes]]:
    """A PeerConnection over a runtime that answers with ``chunks``, then EOF."""
    sent: list[bytes] = []
    answers = list(chunks)

    async def send_all(data: bytes) -> None:
        sent.append(data)

    async def receive_some() -> bytes:
        await trio.lowlevel.checkpoint()
        return answers.pop(0) if answers else b""

    return PeerConnection(send_all, receive_some), sent


async def test_handshake_sends_hello_and_returns_welcome() -> None:
    welcome = encode(FrameKind.WELCOME, [0], payload=b'{"instance": 3, "credits": 8}')
    peer, sent = scripted_peer(welcome[:5], welcome[5:])  # in two receives
    body = await peer.handshake({"token": "t", "role": "instance", "stage": "a"})
    assert body == {"instance": 3, "credits": 8}
    (hello,) = sent
    assert hello[4] == FrameKind.HELLO
    assert json.loads(hello[18:]) == {
        "protocol": PROTOCOL_VERSION,
        "token": "t",
        "role": "instance",
        "stage": "a",
    }


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (
            encode(FrameKind.REFUSED, [0], payload=b"unknown stage 'x'; stages: a, b"),
            AuthenticationError,
            "the runtime refused the connection: unknown stage 'x'; stages: a, b",
        ),
        (b"", AuthenticationError, "closed the connection during the handshake"),
        (encode(FrameKind.DONE, [0]), RemoteProtocolError, "expected WELCOME, got DONE"),
        (
            encode(FrameKind.WELCOME, [0], payload=b"[1, 2]"),
            RemoteProtocolError,
            "WELCOME payload is not a JSON object",
        ),
        (
            encode(FrameKind.WELCOME, [0], payload=b"{}")[:12],
            RemoteProtocolError,
            r"connection closed in the middle of a frame \(12 bytes\)",
        ),
    ],
    ids=["refused", "closed", "another-frame", "not-an-object", "cut-off"],
)
async def test_handshake_failures_say_what_went_wrong(
    answer: bytes, error: type[Exception], match: str
) -> None:
    peer, _ = scripted_peer(answer)
    with pytest.raises(error, match=match):
        await peer.handshake({"token": "t", "role": "client"})


# --------------------------------------------------------------------------- the client


async def test_client_submit_left_early_leaves_the_client_usable(tmp_path: Path) -> None:
    async with open_pipeline(demo_pipeline(tmp_path), instances={"square": 2}) as p:
        with trio.fail_after(TIMEOUT):
            results = p.submit(Number(value=3))
            assert isinstance(results, AsyncGenerator)  # (typed as an iterator)
            async with aclosing(results):
                seen = []
                async for result in results:
                    seen.append(result)
                    break  # the consumer wants only the first result
            assert [r.queue for r in seen] == ["partials"]
            # the first request's later frames arrive for a submit() that has returned;
            # the client's reader must not die of them
            res = await p.run(Number(value=2))
            assert [r.message.total for r in res if isinstance(r.message, Total)] == [1]
            await wait_until(lambda: not p.runtime.requests)
            res = await p.run(Number(value=4))
            assert [r.message.total for r in res if isinstance(r.message, Total)] == [14]


async def test_a_peer_of_another_protocol_version_is_refused_with_a_clear_error(
    tmp_path: Path,
) -> None:
    async with open_pipeline(demo_pipeline(tmp_path)) as p, trio.open_nursery() as n:
        peer = FakePeer.attach(p.runtime, n)
        payload = json.dumps({"protocol": 1, "token": p.runtime.token, "role": "client"})
        await peer.send(encode(FrameKind.HELLO, [0], payload=payload.encode()))
        refused = await peer.expect()
        assert refused.kind == FrameKind.REFUSED
        assert b"speaks alto protocol 2, the peer 1" in refused.payload
        n.cancel_scope.cancel()


async def test_a_submit_left_before_it_was_accepted_is_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    text = demo_pipeline(tmp_path).read_text().replace("delay = 0", "delay = 0.5")
    (tmp_path / "slow.toml").write_text(text)
    async with open_pipeline(tmp_path / "slow.toml") as p:
        client = p.client
        real_send = client._stream.send_all
        with trio.CancelScope() as scope:

            async def send_then_leave(data: bytes | bytearray | memoryview) -> None:
                await real_send(data)
                scope.cancel()  # the caller gives up right after sending SUBMIT

            client._stream.send_all = send_then_leave  # type: ignore[method-assign]
            async with aclosing(client.submit(Number(value=20))) as results:
                async for _ in results:
                    pass
        client._stream.send_all = real_send  # type: ignore[method-assign]
        with trio.fail_after(TIMEOUT):
            while p.runtime.statistics().requests_cancelled != 1:
                await trio.sleep(0.01)
        stats = p.runtime.statistics()
        assert stats.requests_completed == 0 and stats.requests_in_flight == 0


# --------------------------------------------------------------------------- the worker's
# output buffer


class _MemoryByteSend(anyio.abc.ByteSendStream):
    """A byte stream into an anyio memory object stream of size 0: a send waits for the
    reader."""

    def __init__(self, send: anyio.abc.ObjectSendStream[bytes]) -> None:
        self._send = send

    async def send(self, item: bytes) -> None:
        await self._send.send(item)

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()


async def test_output_buffer_wakes_every_writer_over_the_high_water_mark() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](0)
    out = _Output(_MemoryByteSend(send), 64 << 20)  # type: ignore[arg-type]
    chunk = b"x" * (_OUT_HIGH_WATER + 1)
    done: list[str] = []

    async def writer(name: str) -> None:
        await out.send(chunk)  # past the high-water mark: waits until drained
        done.append(name)

    received = 0

    async def reader() -> None:
        nonlocal received
        async for data in receive:
            received += len(data)

    async with send, receive, trio.open_nursery() as nursery:
        nursery.start_soon(out.flusher)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer, "A")
        await trio.testing.wait_all_tasks_blocked()  # A waits; the flusher sends A's bytes
        nursery.start_soon(writer, "B")
        await trio.testing.wait_all_tasks_blocked()  # B waits too
        assert done == []
        nursery.start_soon(reader)
        with trio.fail_after(TIMEOUT):
            while len(done) < 2:
                await trio.sleep(0.001)
        assert sorted(done) == ["A", "B"]
        assert received == 2 * len(chunk)
        nursery.cancel_scope.cancel()
