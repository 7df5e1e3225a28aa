"""Regression tests for faults the runtime, the SDK and the client must survive.

Most tests drive a real :class:`~alto.dataplane.Runtime` with hand-written fake peers
(instances and clients) over ``socket.socketpair()``: the test decides every byte an
instance sends, so malformed frames, bogus acknowledgements and oversized errors are
exact. The others run whole pipelines in-process with :func:`alto.testing.open_pipeline`
(stage functions defined here, imported as ``test_runtime_faults:...``), and one runs real
processes with :func:`alto.serve` (marked ``slow``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

import alto
from alto import ConfigError, load_pipeline
from alto._config import DeploymentConfig, RuntimeLimits
from alto._worker import _OUT_HIGH_WATER, _Output
from alto.dataplane._frames import NEED_DATA, Frame, FrameDecoder, FrameKind, encode
from alto.dataplane._runtime import Runtime
from alto.dataplane._stats import InstanceState
from alto.examples.demo_pb2 import Item, Number, Square, Total
from alto.testing import open_pipeline

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
TIMEOUT = 5.0  # bound on every wait for something that must happen


# --------------------------------------------------------------------------- pipelines

# a -> b -> sink. Nothing is stateful or idempotent, so both stages take the relay's fast
# path (runs of frames, coalesced ACKs). The entries are never imported: fake peers play
# the instances.
AB = """\
[pipeline]
name = "faults"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.mid]
type = "alto.examples.demo_pb2:Item"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.a]
entry = "test_runtime_faults:unused"
inputs = ["numbers"]
outputs = ["mid"]
[stages.b]
entry = "test_runtime_faults:unused"
inputs = ["mid"]
outputs = ["out"]
"""

# A non-fan-out stage writes twice with one key path into a queue read by a fan-out stage.
COLLIDE = """\
[pipeline]
name = "collide"
input = "numbers"
outputs = ["counts"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.mid]
type = "alto.examples.demo_pb2:Item"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.counts]
type = "alto.examples.demo_pb2:Total"
[stages.twice]
entry = "test_runtime_faults:twice"
inputs = ["numbers"]
outputs = ["mid"]
[stages.fan]
entry = "test_runtime_faults:Fan"
inputs = ["mid"]
outputs = ["items"]
fanout = true
[stages.cnt]
entry = "alto.aggregate:Count"
inputs = ["items"]
outputs = ["counts"]
stateful = true
aggregate_level = 2
options = { output = "counts" }
"""

# generate (fan-out) -> total (stateful, level 1) -> again (stateful, level LEVEL)
AFTER_AGG = """\
[pipeline]
name = "afteragg"
input = "numbers"
outputs = ["totals2"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.totals]
type = "alto.examples.demo_pb2:Total"
[queues.totals2]
type = "alto.examples.demo_pb2:Total"
[stages.generate]
entry = "alto.examples.demo:Generate"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.total]
entry = "alto.aggregate:Sum"
inputs = ["items"]
outputs = ["totals"]
stateful = true
aggregate_level = 1
options = { field = "value", output = "totals", output_field = "total", count_field = "count" }
[stages.again]
entry = "alto.aggregate:Sum"
inputs = ["totals"]
outputs = ["totals2"]
stateful = true
aggregate_level = LEVEL
options = { field = "total", output = "totals2", output_field = "total", count_field = "count" }
"""

# One idempotent stage; real processes.
IDEMPOTENT = """\
[pipeline]
name = "NAME"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.echo]
entry = "test_runtime_faults:write_then_crash"
inputs = ["numbers"]
outputs = ["out"]
idempotent = true
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def demo_pipeline(tmp_path: Path) -> Path:
    """configs/demo.toml without the generator's delay."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    assert "options = { delay = 0.05 }" in text
    return write(tmp_path, text.replace("options = { delay = 0.05 }", "options = { delay = 0 }"))


# --------------------------------------------------------------------------- stages


async def twice(msg: Number, ctx: alto.Context) -> None:
    """Not a fan-out stage, yet writes two messages with its input's key path."""
    await ctx.write("mid", Item(value=1))
    await ctx.write("mid", Item(value=2))


class Fan:
    async def process(self, msg: Item, ctx: alto.Context) -> None:
        await ctx.write("items", Item(value=msg.value))


async def write_then_crash(msg: Number, ctx: alto.Context) -> None:
    """Writes its output; the first instance to get here then dies (exactly once), after
    its output has left the process."""
    await ctx.write("out", Square(value=msg.value, instance=ctx.instance))
    try:  # O_EXCL: one instance, once, across processes
        os.close(os.open(os.environ["ALTO_TEST_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    # No checkpoint since the write: the output is still in the worker's buffer. Wait
    # until its flusher has sent it (the flusher sets ``drained`` once the buffer is empty).
    out = ctx._out
    out.drained = anyio.Event()
    await out.drained.wait()
    os._exit(1)


# --------------------------------------------------------------------------- fake peers


def make_runtime(pipeline: Path, **limits: Any) -> Runtime:
    """A runtime with no launcher: fake peers connect as its instances."""
    deployment = DeploymentConfig("<test>", RuntimeLimits(**limits), {})
    return Runtime(load_pipeline(pipeline), deployment, token=TOKEN)


class Peer:
    """One end of a socketpair whose other end the runtime serves (as it would an
    accepted connection). The test sends raw bytes and reads decoded frames."""

    def __init__(self, nursery: trio.Nursery, runtime: Runtime) -> None:
        mine, theirs = socket.socketpair()
        self.sock = trio.socket.from_stdlib_socket(mine)
        nursery.start_soon(runtime.handle_connection, trio.socket.from_stdlib_socket(theirs))
        self.decoder = FrameDecoder(1 << 30)
        self.id = 0  # the instance id from WELCOME

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def hello(self, **body: Any) -> Frame:
        payload = json.dumps({"token": TOKEN, **body}).encode()
        await self.send(encode(FrameKind.HELLO, [0], payload=payload))
        frame = await self.expect()
        if frame.kind == FrameKind.WELCOME and body.get("role") == "instance":
            self.id = json.loads(frame.payload)["instance"]
        return frame

    async def instance(self, stage: str, iid: int | None = None) -> Peer:
        frame = await self.hello(role="instance", stage=stage, instance=iid)
        assert frame.kind == FrameKind.WELCOME, frame
        return self

    async def client(self) -> Peer:
        frame = await self.hello(role="client")
        assert frame.kind == FrameKind.WELCOME, frame
        return self

    async def next(self) -> Frame | None:
        """The next frame, or None at EOF."""
        while True:
            ev = self.decoder.next_event()
            if ev is NEED_DATA:
                self.decoder.receive_data(await self.sock.recv(1 << 20))
                continue
            assert ev is None or isinstance(ev, Frame)
            return ev

    async def expect(self, kind: FrameKind | None = None) -> Frame:
        """The next frame (of ``kind``: frames of other kinds are skipped)."""
        with trio.fail_after(TIMEOUT):
            while True:
                frame = await self.next()
                assert frame is not None, f"EOF while waiting for {kind}"
                if kind is None or frame.kind == kind:
                    return frame

    async def expect_eof(self) -> list[Frame]:
        """Read until the runtime closes this connection; return what came before."""
        frames = []
        with trio.fail_after(TIMEOUT):
            while (frame := await self.next()) is not None:
                frames.append(frame)
        return frames

    async def pump(self, seconds: float = 0.05) -> list[Frame]:
        """What arrives within ``seconds`` (for checking that nothing does)."""
        frames: list[Frame] = []
        with trio.move_on_after(seconds):
            while (frame := await self.next()) is not None:
                frames.append(frame)
        return frames


@asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[Callable[[], Peer]]:
    """Yield a factory of peers connected to ``runtime``; cancel everything on exit."""
    peers: list[Peer] = []
    async with trio.open_nursery() as nursery:

        def connect() -> Peer:
            peer = Peer(nursery, runtime)
            peers.append(peer)
            return peer

        try:
            yield connect
        finally:
            nursery.cancel_scope.cancel()
    for peer in peers:
        peer.sock.close()


async def one_request(client: Peer, corr: int, a: Peer, b: Peer) -> None:
    """A request through AB, played by fake instances of a and b, completes."""
    await client.send(encode(FrameKind.SUBMIT, [corr], "numbers", b""))
    accepted = await client.expect(FrameKind.ACCEPTED)
    assert accepted.key_path[0] == corr
    rid = accepted.key_path[1]
    frame = await a.expect(FrameKind.DATA)
    assert frame.key_path == (rid,)
    await a.send(encode(FrameKind.DATA, [rid], "mid", b"") + encode(FrameKind.ACK, [rid]))
    frame = await b.expect(FrameKind.DATA)
    assert frame.key_path == (rid,) and frame.queue == "mid"
    out = Square(value=corr).SerializeToString()
    await b.send(encode(FrameKind.DATA, [rid], "out", out) + encode(FrameKind.ACK, [rid]))
    result = await client.expect()
    assert (result.kind, result.key_path, result.payload) == (FrameKind.DATA, (rid,), out)
    assert (await client.expect()).kind == FrameKind.DONE


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.001)


# --------------------------------------------------------------------------- B5


async def test_malformed_frame_after_a_run_still_delivers_the_run(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        client = await connect().client()
        await client.send(encode(FrameKind.SUBMIT, [1], "numbers", b""))
        rid = (await client.expect(FrameKind.ACCEPTED)).key_path[1]
        assert (await a.expect(FrameKind.DATA)).key_path == (rid,)
        # a's output for b (a run of the relay's fast path), then, in the same send, a
        # frame whose header claims more bytes than the frame has
        bad = struct.pack("<IBBBBH", 20, FrameKind.DATA, 0, 200, 1, 0) + bytes(14)
        await a.send(encode(FrameKind.DATA, [rid], "mid", b"payload") + bad)
        # what was counted as sent to b is sent
        frame = await b.expect(FrameKind.DATA)
        assert (frame.key_path, frame.queue, frame.payload) == ((rid,), "mid", b"payload")
        await a.expect_eof()  # the malformed connection is closed
        assert rt.instances[a.id].state == InstanceState.CRASHED
        error = await client.expect(FrameKind.ERROR)
        assert error.key_path == (rid,)
        assert b"frame header lengths exceed the frame" in error.payload
        # the runtime goes on: a new instance of a serves the next request
        a2 = await connect().instance("a")
        await one_request(client, 2, a2, b)


# --------------------------------------------------------------------------- B3


async def test_backpressure_with_in_process_ingress_does_not_deadlock(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB), credits=1, backlog_limit=2)
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        finished: list[str] = []

        async def http_request() -> None:  # what the HTTP ingress does
            async for ev in rt.submit(b""):
                if ev.kind in ("done", "error"):
                    finished.append(ev.kind)

        async def respond(peer: Peer, queue: str) -> None:  # a prompt instance
            while (frame := await peer.next()) is not None:
                if frame.kind == FrameKind.DATA:
                    path = list(frame.key_path)
                    await peer.send(
                        encode(FrameKind.DATA, path, queue, b"") + encode(FrameKind.ACK, path)
                    )

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(http_request)
            await trio.testing.wait_all_tasks_blocked()
            assert len(rt.instances[a.id].backlog) > 2  # the ingress overfilled a's backlog
            # Any batch b's reader handles must not make it wait for a backlog it did not
            # fill (a's, filled by the ingress).
            await b.send(encode(FrameKind.CLOSE, [999]))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(respond, a, "mid")
            nursery.start_soon(respond, b, "out")
            with trio.fail_after(TIMEOUT):
                while len(finished) < 10:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert finished == ["done"] * 10
        assert not rt.requests
        assert all(not i.backlog and i.credits_in_use == 0 for i in rt.instances.values())


# --------------------------------------------------------------------------- B4


@pytest.mark.parametrize("stage", [["x"], {"a": 1}])
async def test_hello_with_a_non_string_stage_is_refused(tmp_path: Path, stage: object) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        peer = connect()
        frame = await peer.hello(role="instance", stage=stage)
        assert frame.kind == FrameKind.REFUSED
        assert b"stage" in frame.payload
        await peer.expect_eof()
        # the runtime goes on
        a = await connect().instance("a")
        b = await connect().instance("b")
        await one_request(await connect().client(), 1, a, b)


async def test_submit_too_large_once_re_encoded_is_refused(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB), max_frame_size=1024)
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        client = await connect().client()
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


async def test_huge_stage_error_is_truncated(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        client = await connect().client()
        await client.send(encode(FrameKind.SUBMIT, [1], "numbers", b""))
        rid = (await client.expect(FrameKind.ACCEPTED)).key_path[1]
        await a.expect(FrameKind.DATA)
        # what a worker sends when stage code raised with a 100 KB message
        await a.send(
            encode(FrameKind.ERROR, [rid], payload=b"e" * 100_000) + encode(FrameKind.ACK, [rid])
        )
        error = await client.expect(FrameKind.ERROR)
        assert error.key_path == (rid,)
        message = error.payload.decode()
        assert message.startswith(f"stage 'a' instance {a.id}: eeee")
        assert 4096 <= len(message) < 4096 + 100, len(message)
        assert "more characters" in message
        assert rid not in rt.requests
        await one_request(client, 2, a, b)  # the runtime and the instance go on


# --------------------------------------------------------------------------- R3


async def test_coalesced_ack_beyond_the_unacknowledged_is_a_protocol_error(
    tmp_path: Path,
) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        client = await connect().client()
        await client.send(encode(FrameKind.SUBMIT, [1], "numbers", b""))
        rid = (await client.expect(FrameKind.ACCEPTED)).key_path[1]
        await a.expect(FrameKind.DATA)
        await a.send(encode(FrameKind.DATA, [rid], "mid", b"") + encode(FrameKind.ACK, [rid]))
        await b.expect(FrameKind.DATA)
        # b holds one unacknowledged frame and acknowledges five
        await b.send(encode(FrameKind.ACK, [rid], payload=(5).to_bytes(4, "little")))
        await b.expect_eof()
        inst = rt.instances[b.id]
        assert inst.state == InstanceState.CRASHED
        assert inst.last_error == "protocol error: ACK of 5 frames, but 1 are unacknowledged"
        assert inst.credits_in_use == 0 and inst.queue_depth == 0
        error = await client.expect(FrameKind.ERROR)
        assert error.key_path == (rid,)
        assert b"ACK of 5 frames, but 1 are unacknowledged" in error.payload
        # other requests go on, through another instance of b
        b2 = await connect().instance("b")
        await one_request(client, 2, a, b2)


# --------------------------------------------------------------------------- R5


async def test_draining_the_last_instance_of_a_stage_is_refused(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance("a")
        b = await connect().instance("b")
        with pytest.raises(ValueError, match="last of stage 'b'"):
            await rt.drain(b.id)
        assert rt.instances[b.id].state == InstanceState.READY
        assert rt.stages["b"].target_instances == 1
        assert await b.pump() == []  # no STOP
        # with a second instance, draining one is fine
        b2 = await connect().instance("b")
        await rt.drain(b.id)
        assert rt.instances[b.id].state == InstanceState.DRAINING
        assert (await b.expect()).kind == FrameKind.STOP
        await one_request(await connect().client(), 1, a, b2)


# --------------------------------------------------------------------------- B6


async def test_client_submit_left_early_leaves_the_client_usable(tmp_path: Path) -> None:
    async with open_pipeline(demo_pipeline(tmp_path), instances={"square": 2}) as p:
        with trio.fail_after(TIMEOUT):
            async with aclosing(p.submit(Number(value=3))) as results:
                seen = []
                async for result in results:
                    seen.append(result)
                    break  # the consumer wants only the first result
            assert [r.queue for r in seen] == ["partials"]
            # the first request's later results and DONE arrive for a submit() that has
            # returned; the client's reader must not die of it
            res = await p.run(Number(value=2))
            assert [r.message.total for r in res if isinstance(r.message, Total)] == [1]
            await wait_until(lambda: not p.runtime.requests)
            res = await p.run(Number(value=4))
            assert [r.message.total for r in res if isinstance(r.message, Total)] == [14]


# --------------------------------------------------------------------------- B8


async def test_runtime_submit_closed_after_accepted_does_not_leak(tmp_path: Path) -> None:
    async with open_pipeline(demo_pipeline(tmp_path)) as p:
        rt = p.runtime
        rt.limits = dataclasses.replace(rt.limits, max_inflight_requests=1)
        events = rt.submit(Number(value=3).SerializeToString())
        first = await anext(events)
        assert first.kind == "accepted"
        await events.aclose()  # e.g. the HTTP client went away
        await wait_until(lambda: not rt.requests)  # the request ran to its end
        assert rt.statistics().requests_completed == 1
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


# --------------------------------------------------------------------------- B9


@pytest.mark.parametrize("instances", [{}, {"fan": 2}])
async def test_two_writes_with_one_key_path_into_a_fan_out_stage_fail(
    tmp_path: Path, instances: dict[str, int]
) -> None:
    async with open_pipeline(write(tmp_path, COLLIDE), instances=instances) as p:
        with trio.fail_after(TIMEOUT), pytest.raises(alto.RequestFailed) as info:
            await p.run(Number(value=3))
        assert "stage 'twice' instance" in info.value.message
        assert "fan-out" in info.value.message
        assert "second message with key path [1] to queue 'mid'" in info.value.message
        await wait_until(lambda: not p.runtime.requests)


# --------------------------------------------------------------------------- B10


async def test_stateful_stage_after_a_stateful_stage(tmp_path: Path) -> None:
    # Outputs of a stateful stage carry its group's key path (depth = its level): a level
    # deeper than that downstream is a configuration error, not a failure of every request.
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, AFTER_AGG.replace("LEVEL", "2"), "deep.toml"))
    assert info.value.key == "stages.again.aggregate_level"
    assert "depth 1" in info.value.message
    # At level 1 it works, with exact results.
    path = write(tmp_path, AFTER_AGG.replace("LEVEL", "1"))
    async with open_pipeline(path, instances={"total": 2, "again": 2}) as p:
        values = [1, 2, 5, 9, 12]  # (0 items: no group, no aggregate)
        out: dict[int, list[alto.Result]] = {}

        async def one(v: int) -> None:
            out[v] = await p.run(Number(value=v))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for v in values:
                    nursery.start_soon(one, v)
    for v in values:
        (result,) = out[v]  # one aggregate per request
        assert result.queue == "totals2" and len(result.key_path) == 1
        assert isinstance(result.message, Total)
        assert (result.message.total, result.message.count) == (sum(range(v)), 1)


# --------------------------------------------------------------------------- B7


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


# --------------------------------------------------------------------------- B1


@pytest.mark.slow
async def test_idempotent_stage_that_crashes_after_writing_fails_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"idem-{os.getpid()}-{tmp_path.name[-20:]}"
    pipeline = write(tmp_path, IDEMPOTENT.replace("NAME", name))
    deploy = write(
        tmp_path, "[runtime]\nstop_timeout = 2.0\n[stages.echo]\ninstances = 2\n", "d.toml"
    )
    # the workers import this module
    monkeypatch.setenv(
        "PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    marker = tmp_path / "crashed"
    monkeypatch.setenv("ALTO_TEST_MARKER", str(marker))
    results: list[alto.Result] = []
    async with trio.open_nursery() as nursery:
        info: alto.ServeInfo = await nursery.start(
            lambda task_status: alto.serve(
                pipeline,
                deploy,
                http=None,
                write_discovery=False,
                handle_signals=False,
                task_status=task_status,
            )
        )
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as c:
            with trio.fail_after(30):
                with pytest.raises(alto.RequestFailed) as err:
                    async for r in c.submit(Number(value=7)):
                        results.append(r)
                # the instance wrote, then died: retrying would write the output twice
                assert "stage 'echo' instance" in err.value.message
                assert "crashed" in err.value.message
                assert marker.exists()
                assert [r.message.value for r in results] == [7]  # written once, not again
                assert info.runtime.statistics().frames_retried == 0
                # the surviving instance serves the next request, once
                again = await c.run(Number(value=8))
        assert [(r.queue, r.message.value) for r in again] == [("out", 8)]
        states = sorted(str(i.state) for i in info.runtime.instances.values())
        assert states == ["crashed", "ready"]
        nursery.cancel_scope.cancel()


async def test_ended_instances_are_forgotten_past_a_history(tmp_path: Path) -> None:
    runtime = make_runtime(demo_pipeline(tmp_path))
    ids = [runtime.supervisor.new_instance("square").id for _ in range(40)]
    for iid in ids:
        runtime.instance_lost(runtime.instances[iid], "gone", quiet=True)
    kept = [i.instance_id for i in runtime.statistics().instances if i.stage == "square"]
    assert kept == ids[-16:]  # the most recent 16 ended records stay for the operator


async def test_requests_are_refused_once_shutdown_begins(tmp_path: Path) -> None:
    runtime = make_runtime(demo_pipeline(tmp_path))
    runtime.begin_shutdown()
    with pytest.raises(alto.OverloadedError, match="shutting down"):
        async for _ in runtime.submit(b""):
            pass
    assert runtime.statistics().requests_refused == 1
