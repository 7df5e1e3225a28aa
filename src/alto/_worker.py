"""A stage instance process: connect to the runtime, process frames, write outputs.

Started by the launcher as ``python -m alto._worker`` with its settings in the
environment (``ALTO_ADDRESS``, ``ALTO_TOKEN``, ``ALTO_PIPELINE``, ``ALTO_STAGE``,
``ALTO_INSTANCE``), or by hand on another machine with ``alto worker``. Runs on anyio under
the stage's backend (trio or asyncio).

Outputs and acknowledgements go into one ordered buffer that a single flusher task sends:
while it is sending, later writes pile up and leave in the next send (batching without a
timer), and an input's ACK always follows its outputs on the wire (design.md invariant 3).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections import OrderedDict
from typing import Any

import anyio
from anyio.abc import ByteStream

from ._config import PipelineConfig, StageConfig, load_pipeline, resolve
from ._errors import AltoError, RemoteProtocolError, StageError, truncate_error
from ._stage import Context, StageHandler, StageInfo
from ._telemetry import InputRecord, MetricDeltas, now
from .dataplane._frames import Frame, FrameFlags, FrameKind, encode
from .dataplane._peer import PeerConnection
from .dataplane._tls import client_context_from_env

log = logging.getLogger("alto.worker")

_OUT_HIGH_WATER = 4 * 1024 * 1024
_TRACED = FrameFlags.TRACED
_CANCELLED_KEPT = 65536  # cancelled request ids remembered (their frames may still arrive)
_STATS_INTERVAL = 1.0  # seconds between STATS frames (when there is something to say)


class SetupFailed(AltoError):
    """The stage's ``setup()`` raised (logged with its traceback, reported to the
    runtime; the original exception is its ``__cause__``); a worker process exits with
    code 1."""


class _Output:
    def __init__(
        self, stream: ByteStream, max_frame_size: int, coalesce_acks: bool = False
    ) -> None:
        self.stream = stream
        self.max_frame_size = max_frame_size
        self.coalesce_acks = coalesce_acks
        self.acks: dict[int, int] = {}  # request id -> frames done, sent at the next flush
        self.buf = bytearray()
        self.wake = anyio.Event()
        self.drained = anyio.Event()
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.send_nowait(data)
        if len(self.buf) > _OUT_HIGH_WATER:
            if self.drained.is_set():  # one event for all writers waiting now
                self.drained = anyio.Event()
            await self.drained.wait()

    def send_nowait(self, data: bytes) -> None:
        self.buf += data
        self.wake.set()

    def ack(self, key_path: tuple[int, ...]) -> None:
        """Acknowledge one input. Where the runtime allows it, acknowledgements of one
        request are coalesced into one ACK carrying a count, appended at the next flush:
        still after every output written so far, which is all the order requires."""
        if self.coalesce_acks:
            rid = key_path[0]
            self.acks[rid] = self.acks.get(rid, 0) + 1
            self.wake.set()
        else:
            self.send_nowait(encode(FrameKind.ACK, key_path))

    def _take_acks(self) -> None:
        if self.acks:
            acks, self.acks = self.acks, {}
            for rid, n in acks.items():
                self.buf += encode(FrameKind.ACK, (rid,), payload=n.to_bytes(4, "little"))

    async def flusher(self) -> None:
        while True:
            self._take_acks()
            if not self.buf:
                self.drained.set()
                if self.closed:
                    return
                self.wake = anyio.Event()
                await self.wake.wait()
                continue
            data, self.buf = bytes(self.buf), bytearray()
            await self.stream.send(data)

    async def finish(self) -> None:
        self.closed = True
        self.wake.set()


async def connect(address: str) -> ByteStream:
    """``unix:/path`` or ``HOST:PORT``; over TLS when ``ALTO_TLS_CA`` names the PEM file
    of the CA (or the runtime's certificate) to trust (``alto worker --tls-ca``).

    Raises ConfigError when that file cannot be used, OSError (ssl.SSLError included)
    when the runtime cannot be reached or the TLS handshake fails.
    """
    if address.startswith("unix:"):
        return await anyio.connect_unix(address[5:])
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = client_context_from_env()
    if ctx is None:
        return await anyio.connect_tcp(host, int(port))
    # Not standard-compatible: a runtime that drops the connection without close_notify
    # ends it as EOF does (frames are length-prefixed, truncation is still detected).
    return await anyio.connect_tcp(host, int(port), ssl_context=ctx, tls_standard_compatible=False)


def peer_connection(stream: ByteStream) -> PeerConnection:
    """The shared peer protocol (``alto.dataplane._peer``) over an anyio byte stream."""

    async def receive_some() -> bytes:
        try:
            return await stream.receive(256 * 1024)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b""

    return PeerConnection(stream.send, receive_some)


class Worker:
    def __init__(
        self,
        pipeline: PipelineConfig,
        stage: StageConfig,
        address: str,
        token: str,
        instance: int | None,
    ) -> None:
        self.pipeline = pipeline
        self.stage = stage
        self.address = address
        self.token = token
        self.instance = instance
        self.in_types = {
            q: resolve(pipeline.queues[q].type, what="message type") for q in stage.inputs
        }
        self.out_types = {
            q: resolve(pipeline.queues[q].type, what="message type") for q in stage.outputs
        }
        self.handler = StageHandler(
            stage.name,
            resolve(stage.entry, what="stage entry"),
            dict(stage.options),
            stage.stateful,
        )
        self.metrics = MetricDeltas()
        # Cancellation: the scopes of the inputs running per request, the requests the
        # runtime cancelled (bounded: their frames in transit are skipped), and for stateful
        # stages the groups each request has open here.
        self._running: dict[int, set[anyio.CancelScope]] = {}
        self._cancelled: OrderedDict[int, None] = OrderedDict()
        self._groups: dict[int, set[tuple[int, ...]]] = {}

    async def run(self) -> None:
        stream = await connect(self.address)
        async with stream:
            await self._serve(stream)

    async def _serve(self, stream: ByteStream) -> None:
        peer = peer_connection(stream)
        welcome = await peer.handshake(
            {
                "token": self.token,
                "role": "instance",
                "stage": self.stage.name,
                "instance": self.instance,
                "pid": os.getpid(),
            }
        )
        self.instance = int(welcome["instance"])
        log.info(
            "stage %s instance %d connected (pid %d, %s backend)",
            self.stage.name, self.instance, os.getpid(), self.stage.backend,
        )  # fmt: skip
        peer.decoder.max_frame_size = int(welcome["max_frame_size"])
        options = welcome.get("options")
        if isinstance(options, dict) and options != dict(self.stage.options):
            # This instance's slot has options of its own (the deployment's
            # instance_options: e.g. its own engine server's base_url).
            self.handler = StageHandler(
                self.stage.name,
                resolve(self.stage.entry, what="stage entry"),
                options,
                self.stage.stateful,
            )
        try:
            await self.handler.setup()
        except Exception as exc:
            # The traceback is written first: once the runtime hears of the failure it
            # stops every instance, this one included, and output not yet written is lost.
            log.error("stage %s: setup failed", self.stage.name, exc_info=True)
            # Said before the connection closes, so that the runtime's "failed to start"
            # names the cause, not only the exit code.
            detail = truncate_error(f"setup failed: {type(exc).__name__}: {exc}")
            with anyio.CancelScope(shield=True):
                await stream.send(encode(FrameKind.ERROR, [0], payload=detail.encode()))
            raise SetupFailed(detail) from exc
        try:
            await stream.send(encode(FrameKind.READY, [0]))
            await self._serve_ready(stream, peer, welcome)
        finally:
            with anyio.CancelScope(shield=True):
                await self.handler.aclose()

    async def _serve_ready(
        self, stream: ByteStream, peer: PeerConnection, welcome: dict[str, Any]
    ) -> None:
        assert self.instance is not None
        out = _Output(
            stream, peer.decoder.max_frame_size, bool(welcome.get("coalesce_acks", False))
        )
        info = StageInfo(
            self.stage.name,
            self.instance,
            self.stage.fanout,
            self.out_types,
            int(welcome.get("child_tag", 0)),
            self.stage.aggregate_level or 0,
            frozenset(q for q in self.stage.outputs if self.pipeline.feeds_fanout(q)),
            {
                q: resolve(self.pipeline.queues[q].prompt or "", what="prompt function")
                for q in self.stage.outputs
                if self.pipeline.queues[q].prompt
            },
        )
        limit = anyio.Semaphore(1 if self.stage.stateful else self.stage.concurrency)
        reporting = anyio.CancelScope()
        async with anyio.create_task_group() as flush_tg:
            flush_tg.start_soon(out.flusher)
            flush_tg.start_soon(self._report_metrics, out, reporting)
            async with anyio.create_task_group() as tg:
                while True:
                    frame = await peer.next_frame()
                    if frame is None:
                        log.info("runtime closed the connection")
                        tg.cancel_scope.cancel()
                        break
                    kind = frame.kind
                    if kind in (FrameKind.DATA, FrameKind.GROUP_CLOSED):
                        record = InputRecord(now(), bool(frame.flags & _TRACED))
                        # Stateful stages: one at a time and in order. The limiter is taken
                        # here, before the next frame is read, so order is kept.
                        if self.stage.stateful:
                            await limit.acquire()
                        tg.start_soon(self._process, frame, record, info, out, limit)
                    elif kind == FrameKind.CANCEL:
                        rid = frame.key_path[0]
                        self._cancel(rid)
                        if self.stage.stateful:
                            await limit.acquire()  # in order with the group's items
                            tg.start_soon(self._drop_groups, rid, info, out, limit)
                    elif kind == FrameKind.STOP:
                        break
                    else:
                        raise RemoteProtocolError(f"unexpected {kind.name} frame from the runtime")
            reporting.cancel()
            await out.finish()  # the flusher sends what is buffered, then returns

    def _cancel(self, rid: int) -> None:
        """The runtime cancelled request ``rid``: stop its running inputs, skip the rest."""
        self._cancelled[rid] = None
        while len(self._cancelled) > _CANCELLED_KEPT:
            self._cancelled.popitem(last=False)
        for scope in self._running.get(rid, ()):
            scope.cancel()

    async def _process(
        self,
        frame: Frame,
        record: InputRecord,
        info: StageInfo,
        out: _Output,
        limit: anyio.Semaphore,
    ) -> None:
        if not self.stage.stateful:
            await limit.acquire()
        try:
            key_path = frame.key_path
            rid = key_path[0]
            if rid in self._cancelled:
                out.ack(key_path)  # its request ended: nothing to do but give the credit back
                return
            record.started = now()
            ctx = Context(info, out, key_path, record, self.metrics)
            closing = frame.kind == FrameKind.GROUP_CLOSED
            status = "ok"
            scope = anyio.CancelScope()
            running = self._running.setdefault(rid, set())
            running.add(scope)
            try:
                with scope:
                    try:
                        if closing:
                            ctx.closing_group = True
                            self._groups.get(rid, set()).discard(key_path)
                            await self.handler.group_closed(ctx)
                        else:
                            if self.stage.stateful:
                                self._groups.setdefault(rid, set()).add(ctx.group)
                            msg = self.in_types[frame.queue].FromString(frame.payload)
                            await self.handler.process(msg, ctx)
                    except Exception as exc:
                        status = "error"
                        # A StageError already names stage and instance; the runtime adds them.
                        detail = truncate_error(  # an error frame must stay small
                            exc.message
                            if isinstance(exc, StageError)
                            else f"{type(exc).__name__}: {exc}"
                        )
                        if not isinstance(exc, StageError):
                            traceback.print_exc()
                        out.send_nowait(encode(FrameKind.ERROR, key_path, payload=detail.encode()))
            finally:
                running.discard(scope)
                if not running:
                    self._running.pop(rid, None)
            if scope.cancelled_caught:
                status = "cancelled"
            ended = now()
            record.observe(self.metrics, ended)
            if record.traced:
                # Before the ACK: the runtime has every span when the request completes.
                out.send_nowait(
                    encode(
                        FrameKind.SPAN,
                        key_path,
                        payload=record.span(
                            info.name,
                            info.instance,
                            key_path,
                            "group_closed" if closing else "process",
                            ended,
                            status,
                        ),
                    )
                )
            out.ack(key_path)
        finally:
            limit.release()

    async def _drop_groups(
        self, rid: int, info: StageInfo, out: _Output, limit: anyio.Semaphore
    ) -> None:
        """A stateful stage's request was cancelled: drop its open groups, emitting nothing."""
        try:
            for key_path in self._groups.pop(rid, ()):
                ctx = Context(info, out, key_path)
                ctx.closing_group = True
                try:
                    await self.handler.group_cancelled(ctx)
                except Exception:
                    traceback.print_exc()
        finally:
            limit.release()

    async def _report_metrics(self, out: _Output, scope: anyio.CancelScope) -> None:
        """Send the metric deltas about once a second (when there are any)."""
        with scope:
            last_gauges: dict[str, float] = {}
            while True:
                await anyio.sleep(_STATS_INTERVAL)
                try:
                    gauges = self.handler.statistics()
                except Exception:  # a broken statistics() must not stop the instance
                    log.exception("the stage's statistics() failed")
                    gauges = {}
                payload = self.metrics.take(gauges if gauges != last_gauges else None)
                last_gauges = gauges
                if payload is not None:
                    out.send_nowait(encode(FrameKind.STATS, [0], payload=payload))


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("ALTO_LOG_LEVEL", "INFO"),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = os.environ
    try:
        pipeline = load_pipeline(env["ALTO_PIPELINE"])
        stage = pipeline.stages[env["ALTO_STAGE"]]
        inst = env.get("ALTO_INSTANCE")
        worker = Worker(
            pipeline, stage, env["ALTO_ADDRESS"], env["ALTO_TOKEN"], int(inst) if inst else None
        )
    except KeyError as exc:
        sys.exit(f"alto worker: missing setting {exc}")
    except Exception as exc:
        sys.exit(f"alto worker: {type(exc).__name__}: {exc}")
    failed = False
    try:
        anyio.run(worker.run, backend=stage.backend)
    except* SetupFailed:
        failed = True  # its traceback is logged already
    except* KeyboardInterrupt:
        pass
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
