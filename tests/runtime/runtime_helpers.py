"""What the runtime tests share: small pipelines, a runtime with no launcher, and fake peers.

Most runtime tests drive a real :class:`~alto.dataplane.Runtime` with
:class:`alto.testing.FakePeer` instances and clients over ``socket.socketpair()``: the test
decides every byte an instance sends, so malformed frames, bogus acknowledgements and
oversized errors are exact. The pipelines here are never run by workers: their entries
are never imported.

Imported as ``runtime_helpers`` (pytest's default ``prepend`` import mode puts this
directory, which has no ``__init__.py``, on ``sys.path`` for the test modules next to it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from alto import load_pipeline
from alto._config import DeploymentConfig, RuntimeLimits
from alto.dataplane import FrameKind, Runtime, encode
from alto.examples.demo_pb2 import Square
from alto.testing import FakePeer

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
TIMEOUT = 5.0  # bound on every wait for something that must happen

# a -> b -> sink. Nothing is stateful or idempotent, so both stages take the relay's fast
# path (runs of frames, coalesced ACKs).
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
entry = "runtime_helpers:never_imported"
inputs = ["numbers"]
outputs = ["mid"]
[stages.b]
entry = "runtime_helpers:never_imported"
inputs = ["mid"]
outputs = ["out"]
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


def make_runtime(pipeline: Path, **limits: Any) -> Runtime:
    """A runtime with no launcher: fake peers connect as its instances."""
    deployment = DeploymentConfig("<test>", RuntimeLimits(**limits), {})
    return Runtime(load_pipeline(pipeline), deployment, token=TOKEN)


@asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[Callable[[], FakePeer]]:
    """Yield a factory of fake peers served by ``runtime`` (as accepted connections);
    cancel everything and close every peer on exit."""
    peers: list[FakePeer] = []
    async with trio.open_nursery() as nursery:

        def connect() -> FakePeer:
            peer = FakePeer.attach(runtime, nursery)
            peers.append(peer)
            return peer

        try:
            yield connect
        finally:
            nursery.cancel_scope.cancel()
    for peer in peers:
        peer.close()


async def one_request(client: FakePeer, corr: int, a: FakePeer, b: FakePeer) -> None:
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
