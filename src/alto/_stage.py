"""The stage SDK: what stage code sees.

A stage's ``entry`` in the pipeline file names either

* an async function ``async def f(msg, ctx)`` called once per input message, or
* a class, instantiated once per instance with the stage's ``options`` as keyword
  arguments, with ``async def process(self, msg, ctx)``, and for stateful stages
  ``async def group_closed(self, ctx)`` (called after the last item of a group; ``ctx.key_path``
  is the group's key path). Optional ``async def setup(self)`` and ``async def aclose(self)``
  run at start and stop (load a model in ``setup``); optional ``async def
  group_cancelled(self, ctx)`` drops an open group's state without emitting when its
  request is cancelled (the :mod:`alto.aggregate` operators have it).

Cancellation: when a request ends early (its client went away or cancelled it, its
deadline passed, or it failed elsewhere), the runtime tells every instance holding its
inputs. The SDK then cancels the ``process()`` calls working on it (an LM generation
stops between tokens when its iterator is closed), skips its inputs still waiting, calls
``group_cancelled`` for its open groups in stateful stages, and acknowledges everything,
so credits come back; what the stage would still write is not sent.

Writing outputs::

    await ctx.write("claims", Claim(text=...))            # fan-out stage: one child per write
    async with ctx.child() as child:                       # fan-out stage: a streamed child
        async for tok in engine.generate(prompt):
            await child.write("bm25", Token(text=tok))     # every token shares one key path
    await ctx.write("squares", Square(value=v))           # other stages: the input's key path
    await alto.write(queue="bm25", obj=Token(...), id=obj_id,
                     constraints=[obj_id, claim_id, query_id])   # the paper's explicit form

Key paths are derived (design.md invariant 2): a fan-out stage appends a new id for each
output (``ctx.write``) or child stream (``ctx.child()``), and closes it (a LAST flag on a
one-item child, a CLOSE frame when a child stream ends), so the runtime knows when an
aggregation group downstream is complete. The explicit ``constraints`` form sets the key
path by hand; it must extend the input's key path, and the runtime then closes the groups
under it when the input is acknowledged (it cannot know earlier).

Concurrency: the SDK is written on anyio, so a stage process runs under trio (the default)
or under asyncio (``backend = "asyncio"`` in the pipeline file), which vLLM's and SGLang's
in-process engines require. Stateless stages process up to ``concurrency`` inputs at once
(one task each); stateful stages process their inputs one at a time in arrival order,
so a group's items and its ``group_closed`` call never race.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from google.protobuf.message import Message

from ._errors import StageError
from ._telemetry import InputRecord, MetricDeltas, now
from .dataplane._frames import FrameFlags, FrameKind, encode

__all__ = ["Child", "Context", "StageHandler", "current_context", "prefix_key", "write"]

_current: contextvars.ContextVar[Context] = contextvars.ContextVar("alto_stage_context")


class _Output(Protocol):
    """Where a context's frames go (the worker's output buffer)."""

    max_frame_size: int

    async def send(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class StageInfo:
    name: str
    instance: int
    fanout: bool
    outputs: dict[str, type[Message]]  # output queue -> message class
    child_tag: int = 0
    aggregate_level: int = 0  # stateful stages: the group is the key path's first L ids
    fanout_queues: frozenset[str] = frozenset()  # outputs that lead to a fan-out stage
    # output queue -> the prompt its LM stage will run for a message (the queue's
    # ``prompt`` in the pipeline file): writes derive their prompt key from it
    prompts: Mapping[str, Callable[[Message], str]] = field(default_factory=dict)


class Context:
    """The context of one input being processed (or one group being closed)."""

    def __init__(
        self,
        info: StageInfo,
        out: _Output,
        key_path: tuple[int, ...],
        record: InputRecord | None = None,
        metrics: MetricDeltas | None = None,
    ) -> None:
        self._info = info
        self._out = out
        self.key_path = key_path
        self._next_child = 0
        self._fed: set[str] = set()  # fan-out-feeding queues written once already
        self.closing_group = False  # set for a group_closed call
        self._record = record  # timings of this input (None outside a worker)
        self._metrics = metrics
        # Outputs of a traced input are traced too, so the whole request is.
        self._flags = FrameFlags.TRACED if record is not None and record.traced else 0

    @property
    def traced(self) -> bool:
        """Whether this input's request is traced (its spans are recorded)."""
        return bool(self._flags)

    def set_attributes(self, **attributes: str | int | float | bool) -> None:
        """Attributes of this input's span (traced requests only; e.g. model names)."""
        if self._record is not None and self._record.traced:
            self._record.attributes.update(attributes)

    async def tokens(
        self, pieces: AsyncIterator[str], *, input_tokens: int | None = None
    ) -> AsyncIterator[str]:
        """Yield what an LM engine streams, measuring it: time to first token, time per
        output token and token counts, as ``gen_ai.server.*`` metrics and, on traced
        requests, ``gen_ai.usage.*`` span attributes. One piece counts as one token.
        Closing this iterator closes ``pieces`` (the engine stops generating)."""
        t0 = now()
        first: float | None = None
        n = 0
        rec = self._record
        try:
            async for piece in pieces:
                t = now()
                if first is None:
                    first = t
                n += 1
                if rec is not None and rec.traced:
                    rec.token_times.append(t)
                yield piece
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
            end = now()
            m = self._metrics
            if m is not None:
                if first is not None:
                    m.observe("gen_ai.server.time_to_first_token", first - t0)
                    if n > 1:
                        m.observe("gen_ai.server.time_per_output_token", (end - first) / (n - 1))
                m.observe("gen_ai.client.token.usage.output", n)
                if input_tokens is not None:
                    m.observe("gen_ai.client.token.usage.input", input_tokens)
            if rec is not None and rec.traced:
                usage = rec.attributes
                usage["gen_ai.usage.output_tokens"] = usage.get("gen_ai.usage.output_tokens", 0) + n
                if input_tokens is not None:
                    usage["gen_ai.usage.input_tokens"] = (
                        usage.get("gen_ai.usage.input_tokens", 0) + input_tokens
                    )
                if first is not None:
                    usage.setdefault("gen_ai.server.time_to_first_token", round(first - t0, 6))

    @property
    def stage(self) -> str:
        return self._info.name

    @property
    def instance(self) -> int:
        return self._info.instance

    @property
    def request_id(self) -> int:
        return self.key_path[0]

    @property
    def group(self) -> tuple[int, ...]:
        """In a stateful stage: the aggregation group of this input (or the closed group)."""
        level = self._info.aggregate_level
        if not level:
            raise self._error("is not stateful, so its inputs belong to no group")
        return self.key_path[:level]

    def message(self, queue: str, **fields: Any) -> Message:
        """A new message of ``queue``'s declared type."""
        return self._queue_type(queue)(**fields)

    def _queue_type(self, queue: str) -> type[Message]:
        try:
            return self._info.outputs[queue]
        except KeyError:
            raise StageError(
                self._info.name, self._info.instance,
                f"unknown output queue {queue!r}; this stage writes: {', '.join(self._info.outputs) or '(none)'}",
            ) from None  # fmt: skip

    def _error(self, message: str) -> StageError:
        return StageError(self._info.name, self._info.instance, message)

    def _encode(
        self, queue: str, obj: Message, path: Sequence[int], prompt_key: str | None, flags: int
    ) -> bytes:
        typ = self._queue_type(queue)
        if not isinstance(obj, typ):
            raise self._error(
                f"queue {queue!r} carries {typ.DESCRIPTOR.full_name}, got {type(obj).__name__}"
            )
        if self._record is not None:
            self._record.output()
        if prompt_key is None:
            make_prompt = self._info.prompts.get(queue)
            pk = prefix_key(make_prompt(obj)) if make_prompt is not None else b""
        else:
            pk = prompt_key.encode()
        return encode(
            FrameKind.DATA,
            tuple(path),
            queue,
            obj.SerializeToString(),
            pk,
            flags | self._flags,
            max_frame_size=self._out.max_frame_size,
        )

    def _new_child(self) -> tuple[int, ...]:
        if not self._info.fanout:
            raise self._error("is not declared fanout = true, so it cannot open children")
        c = self._info.child_tag | self._next_child
        self._next_child += 1
        level = self._info.aggregate_level
        return (*(self.key_path[:level] if level else self.key_path), c)

    async def write(
        self,
        queue: str,
        obj: Message,
        *,
        id: int | None = None,
        constraints: Sequence[int] | None = None,
        prompt_key: str | None = None,
    ) -> None:
        """Send ``obj`` to ``queue``.

        In a fan-out stage each call is a new one-item child (its key path gets a new id).
        ``constraints`` (with ``id``, the request id) set the key path explicitly, as in
        the paper's interface. ``prompt_key`` lets a prompt-sticky scheduler keep the
        same prompt on the same LM instance.

        Raises StageError for an unknown queue, a message of the wrong type, or
        constraints that do not extend this input's key path.
        """
        if constraints is not None:
            path = tuple(int(c) for c in constraints)
            if id is not None and id != self.request_id:
                raise self._error(f"id={id} is not this input's request id {self.request_id}")
            if path[: len(self.key_path)] != self.key_path:
                raise self._error(
                    f"constraints {list(path)} must extend the input's key path {list(self.key_path)}"
                )
            await self._out.send(self._encode(queue, obj, path, prompt_key, 0))
        elif self._info.fanout:
            await self._out.send(
                self._encode(queue, obj, self._new_child(), prompt_key, FrameFlags.LAST)
            )
        else:
            if id is not None and id != self.request_id:
                raise self._error(f"id={id} is not this input's request id {self.request_id}")
            level = self._info.aggregate_level
            # A stateful stage writes with its group's key path (what the config counts on).
            path = self.key_path[:level] if level else self.key_path
            if queue in self._info.fanout_queues:
                if level and not self.closing_group:
                    raise self._error(
                        f"queue {queue!r} leads to a fan-out stage: a stateful stage writes to it "
                        "from group_closed (once per group), not per item"
                    )
                if queue in self._fed:
                    raise self._error(
                        f"a second message with key path {list(path)} to queue {queue!r}, which leads "
                        "to a fan-out stage: both would get the same child ids. Declare this stage "
                        "fanout = true, or give each its own key path with constraints=[...]"
                    )
                self._fed.add(queue)
            await self._out.send(self._encode(queue, obj, path, prompt_key, 0))

    def child(self) -> Child:
        """Open a child stream: many writes under one new key-path id, closed on exit."""
        return Child(self, self._new_child())


class Child:
    """A streamed fan-out child; use as ``async with ctx.child() as child``."""

    def __init__(self, ctx: Context, key_path: tuple[int, ...]) -> None:
        self._ctx = ctx
        self.key_path = key_path
        self._closed = False

    async def write(self, queue: str, obj: Message, *, prompt_key: str | None = None) -> None:
        if self._closed:
            raise self._ctx._error(f"child {list(self.key_path)} is closed")
        await self._ctx._out.send(self._ctx._encode(queue, obj, self.key_path, prompt_key, 0))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._ctx._out.send(encode(FrameKind.CLOSE, self.key_path))

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


PREFIX_BLOCK = 64  # bytes of prompt text per block of a derived prompt key
PREFIX_BLOCKS = 8  # blocks hashed at most: the key is at most 1 + 64 bytes
DERIVED = b"\x00"  # first byte of a derived key (a key a stage names never starts with NUL)


def prefix_key(prompt: str) -> bytes:
    """The prompt key alto derives from a prompt's text: a NUL byte, then a chain of 8-byte BLAKE2b hashes
    of its leading 64-byte blocks (each hash covers its block and every block before it,
    as vLLM's prefix-cache blocks and llm-d's prefix scorer chain theirs), at most 8
    blocks; a trailing partial block counts only when it is the only one.

    Two prompts that share their first k blocks share the key's first 1 + 8k bytes, which is
    what the ``prompt-affinity`` scheduler matches on (the longest prefix it has seen), so
    requests of one template reach the engine that holds that template's prefix in its
    cache without the stage naming a key.
    """
    raw = prompt.encode()
    n = min(PREFIX_BLOCKS, max(1, len(raw) // PREFIX_BLOCK))
    out = bytearray(DERIVED)  # marks the key as a chain of block hashes
    h = hashlib.blake2b(digest_size=8)
    for i in range(n):
        h.update(raw[i * PREFIX_BLOCK : (i + 1) * PREFIX_BLOCK])
        out += h.copy().digest()
    return bytes(out)


def current_context() -> Context:
    """The context of the input being processed by this task. Raises LookupError outside a stage."""
    return _current.get()


async def write(
    queue: str,
    obj: Message,
    *,
    id: int | None = None,
    constraints: Sequence[int] | None = None,
    prompt_key: str | None = None,
) -> None:
    """The paper's interface: ``write(queue="bm25", obj=Token(...), id=obj_id,
    constraints=[obj_id, claim_id, query_id])`` from inside stage code."""
    await current_context().write(queue, obj, id=id, constraints=constraints, prompt_key=prompt_key)


class StageHandler:
    """Adapts an entry point (function or class) to process / group_closed / lifecycle."""

    def __init__(self, name: str, entry: Any, options: dict[str, Any], stateful: bool) -> None:
        self.name = name
        self._obj: Any = None
        self._fn: Callable[[Any, Context], Awaitable[None]]
        self._closed: Callable[[Context], Awaitable[None]] | None = None
        self._cancelled: Callable[[Context], Awaitable[None]] | None = None
        if inspect.isclass(entry):
            try:
                self._obj = entry(**options)
            except TypeError as exc:
                raise StageError(
                    name, None, f"cannot build {entry.__name__} from options {options}: {exc}"
                ) from exc
            if not callable(getattr(self._obj, "process", None)):
                raise StageError(name, None, f"{entry.__name__} has no process(msg, ctx) method")
            self._fn = self._obj.process
            self._closed = getattr(self._obj, "group_closed", None)
            self._cancelled = getattr(self._obj, "group_cancelled", None)
        elif inspect.iscoroutinefunction(entry):
            if options:
                raise StageError(name, None, "options are only for class entry points")
            self._fn = entry
        else:
            raise StageError(
                name, None, f"entry {entry!r} is neither an async function nor a class"
            )
        if stateful and self._closed is None:
            raise StageError(
                name, None, "a stateful stage's entry must be a class with group_closed(ctx)"
            )

    async def setup(self) -> None:
        fn = getattr(self._obj, "setup", None)
        if fn is not None:
            await fn()

    async def aclose(self) -> None:
        fn = getattr(self._obj, "aclose", None)
        if fn is not None:
            await fn()

    def statistics(self) -> dict[str, float]:
        """The entry's own gauges (an optional ``statistics()`` method returning numbers
        by name, e.g. an engine's counters), reported with the instance's metrics."""
        fn = getattr(self._obj, "statistics", None)
        if fn is None:
            return {}
        return {
            str(k): float(v)
            for k, v in dict(fn()).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    async def process(self, msg: Any, ctx: Context) -> None:
        token = _current.set(ctx)
        try:
            await self._fn(msg, ctx)
        finally:
            _current.reset(token)

    async def group_closed(self, ctx: Context) -> None:
        assert self._closed is not None
        token = _current.set(ctx)
        try:
            await self._closed(ctx)
        finally:
            _current.reset(token)

    async def group_cancelled(self, ctx: Context) -> None:
        """Drop a cancelled request's open group (no-op when the entry has no hook)."""
        if self._cancelled is None:
            return
        token = _current.set(ctx)
        try:
            await self._cancelled(ctx)
        finally:
            _current.reset(token)
