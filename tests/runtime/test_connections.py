"""The runtime's side of its connections (``alto.dataplane._connections`` and the runtime's
handshake and client handling): HELLO, clients, and where results go (the sinks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
import trio
import trio.testing
from runtime_helpers import (
    AB,
    ROOT,
    TIMEOUT,
    TOKEN,
    demo_pipeline,
    make_runtime,
    one_request,
    serving,
    wait_until,
    write,
)

from alto.dataplane import FrameKind, RequestEvent, encode
from alto.dataplane._connections import LocalSink
from alto.examples.demo_pb2 import Number, Square, Total
from alto.testing import FakePeer, open_pipeline

# --------------------------------------------------------------------------- the handshake


@pytest.mark.parametrize("stage", [["x"], {"a": 1}])
async def test_hello_with_a_non_string_stage_is_refused(tmp_path: Path, stage: object) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        peer = connect()
        frame = await peer.hello(TOKEN, role="instance", stage=stage)
        assert frame.kind == FrameKind.REFUSED
        assert b"stage" in frame.payload
        await peer.expect_eof()
        # the runtime goes on
        a = await connect().instance(TOKEN, "a")
        b = await connect().instance(TOKEN, "b")
        await one_request(await connect().client(TOKEN), 1, a, b)


# --------------------------------------------------------------------------- clients


async def test_a_client_sending_a_bad_frame_loses_only_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # design.md: "a malformed or oversized frame closes that connection with a logged
    # error and never takes the runtime down".
    async with open_pipeline(ROOT / "configs" / "demo.toml") as p:
        async with trio.open_nursery() as n:
            peer = await FakePeer.attach(p.runtime, n).client(p.runtime.token)
            await peer.send(encode(FrameKind.ACK, [1]))  # clients may only SUBMIT (and CANCEL)
            assert await peer.expect_eof() == []
            peer.close()
        results = await p.run(Number(value=3))  # the runtime goes on
    assert [r.message.total for r in results if isinstance(r.message, Total)] == [5]


async def test_submit_too_large_once_re_encoded_is_refused(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB), max_frame_size=1024)
    async with serving(rt) as connect:
        a = await connect().instance(TOKEN, "a")
        b = await connect().instance(TOKEN, "b")
        client = await connect().client(TOKEN)
        # Within the limit as sent (an empty queue name); 7 bytes over it as the DATA
        # frame on queue "numbers" that the ingress makes of it.
        big = encode(FrameKind.SUBMIT, [7], "", b"x" * (1024 - 18), max_frame_size=1024)
        assert len(big) == 1024
        await client.send(big)
        refused = await client.expect()
        assert refused.kind == FrameKind.REFUSED and refused.key_path == (7,)
        assert b"too large" in refused.payload and b"1024" in refused.payload
        assert rt.requests == {}  # nothing admitted, nothing leaked
        assert rt.statistics().requests_submitted == 0
        await one_request(client, 8, a, b)  # the same connection goes on
        assert rt.requests == {}


# --------------------------------------------------------------------------- the in-process
# ingress (LocalSink)


async def test_runtime_submit_closed_after_accepted_does_not_leak(tmp_path: Path) -> None:
    async with open_pipeline(demo_pipeline(tmp_path)) as p:
        rt = p.runtime
        rt.limits = dataclasses.replace(rt.limits, max_inflight_requests=1)
        events = rt.submit(Number(value=3).SerializeToString())
        assert isinstance(events, AsyncGenerator)  # (typed as an iterator)
        first = await anext(events)
        assert first.kind == "accepted"
        await events.aclose()  # e.g. the HTTP client went away: nobody waits for it now
        assert not rt.requests  # cancelled at once, its slot free
        stats = rt.statistics()
        assert (stats.requests_cancelled, stats.requests_completed, stats.requests_failed) == (
            1,
            0,
            0,
        )
        # the instances are told, and acknowledge what they held
        await wait_until(lambda: all(i.queue_depth == 0 for i in rt.instances.values()))
        with trio.fail_after(TIMEOUT):
            kinds = []
            totals = []
            async for ev in rt.submit(Number(value=4).SerializeToString()):
                kinds.append(ev.kind)
                if ev.kind == "result" and ev.queue == "totals":
                    totals.append(Total.FromString(ev.payload).total)
        assert kinds[0] == "accepted" and kinds[-1] == "done"
        assert totals == [14]
        assert not rt.requests and rt.statistics().requests_refused == 0


async def test_a_consumer_that_stops_reading_fails_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalSink, "LIMIT", 4)
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance(TOKEN, "a")
        b = await connect().instance(TOKEN, "b")
        events = rt.submit(b"")  # what the HTTP ingress does
        accepted = await anext(events)
        rid = accepted.request_id
        sink = rt.requests[rid].sink
        assert isinstance(sink, LocalSink)
        await a.expect(FrameKind.DATA)
        await a.send(encode(FrameKind.DATA, [rid], "mid", b"") + encode(FrameKind.ACK, [rid]))
        await b.expect(FrameKind.DATA)
        # ten results of one input, and the consumer reads none of them meanwhile
        results = [
            encode(FrameKind.DATA, [rid], "out", Square(value=i).SerializeToString())
            for i in range(10)
        ]
        await b.send(b"".join(results) + encode(FrameKind.ACK, [rid]))
        await wait_until(lambda: rid not in rt.requests)
        stats = rt.statistics()
        # the request failed rather than buffering without end, and it did not complete
        assert (stats.requests_failed, stats.requests_completed) == (1, 0)
        seen: list[RequestEvent] = []
        with trio.fail_after(TIMEOUT):
            async for ev in events:
                seen.append(ev)
        assert [ev.kind for ev in seen] == ["result"] * 4 + ["error"]
        assert seen[-1].message == "the consumer of this request left 4 results unread"
        assert not sink.events  # no "done" after the error
        assert rt.instances[b.id].queue_depth == 0  # b's ACK still gave its credit back
