"""Aggregation operators for stateful stages (the library the paper's section 6.1 asks for).

Each operator is a class usable directly as a stateful stage's ``entry``; its keyword
options come from the stage's ``options`` table. State is kept per aggregation group
(``ctx.group``, the key path's first ``aggregate_level`` ids) and emitted when the runtime
says the group is complete (``group_closed``), then dropped::

    [stages.total]
    entry = "alto.aggregate:Sum"
    inputs = ["squares"]
    outputs = ["totals"]
    stateful = true
    aggregate_level = 1
    options = { field = "value", output = "totals", output_field = "total", count_field = "count" }

Operators: :class:`Sum`, :class:`Count`, :class:`TopK`, :class:`Filter`, :class:`Collect`.
Fields are protobuf field names; a wrong name is a StageError at the first item that
names the message type and its fields. Subclass :class:`GroupAggregator` for your own.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from ._config import resolve
from ._errors import StageError
from ._stage import Context

__all__ = ["Collect", "Count", "Filter", "GroupAggregator", "Sum", "TopK"]

S = TypeVar("S")


def _field(msg: Message, name: str, ctx: Context | None = None) -> Any:
    try:
        return getattr(msg, name)
    except AttributeError:
        fields = ", ".join(f.name for f in msg.DESCRIPTOR.fields)
        raise StageError(
            ctx.stage if ctx else "aggregate",
            ctx.instance if ctx else None,
            f"{msg.DESCRIPTOR.full_name} has no field {name!r}; fields: {fields}",
        ) from None


class GroupAggregator(Generic[S]):
    """Keeps one state per open group; subclasses define initial/update/emit."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.groups: dict[tuple[int, ...], S] = {}

    def initial(self) -> S:
        raise NotImplementedError

    def update(self, state: S, msg: Message) -> S:
        raise NotImplementedError

    async def emit(self, state: S, ctx: Context) -> None:
        raise NotImplementedError

    async def process(self, msg: Message, ctx: Context) -> None:
        g = ctx.group
        state = self.groups.get(g)
        self.groups[g] = self.update(self.initial() if state is None else state, msg)

    async def group_closed(self, ctx: Context) -> None:
        state = self.groups.pop(ctx.key_path, None)
        await self.emit(self.initial() if state is None else state, ctx)

    async def group_cancelled(self, ctx: Context) -> None:
        """The group's request was cancelled: drop its state without emitting."""
        self.groups.pop(ctx.key_path, None)


class Sum(GroupAggregator[tuple[float, int]]):
    """Sum ``field`` over the group; emit ``output_field`` (and ``count_field`` if given,
    and the emitting instance's id in ``instance_field`` if given)."""

    def __init__(
        self,
        field: str,
        output: str,
        output_field: str = "total",
        count_field: str | None = None,
        instance_field: str | None = None,
    ) -> None:
        super().__init__(output)
        self.field, self.output_field, self.count_field = field, output_field, count_field
        self.instance_field = instance_field

    def initial(self) -> tuple[float, int]:
        return (0, 0)

    def update(self, state: tuple[float, int], msg: Message) -> tuple[float, int]:
        return (state[0] + _field(msg, self.field), state[1] + 1)

    async def emit(self, state: tuple[float, int], ctx: Context) -> None:
        fields: dict[str, Any] = {self.output_field: state[0]}
        if self.count_field:
            fields[self.count_field] = state[1]
        if self.instance_field:
            fields[self.instance_field] = ctx.instance
        await ctx.write(self.output, ctx.message(self.output, **fields))


class Count(GroupAggregator[int]):
    """Count the group's items; emit ``output_field``."""

    def __init__(self, output: str, output_field: str = "count") -> None:
        super().__init__(output)
        self.output_field = output_field

    def initial(self) -> int:
        return 0

    def update(self, state: int, msg: Message) -> int:
        return state + 1

    async def emit(self, state: int, ctx: Context) -> None:
        await ctx.write(self.output, ctx.message(self.output, **{self.output_field: state}))


class TopK(GroupAggregator[list[tuple[float, int, bytes]]]):
    """Keep the ``k`` items with the largest ``score_field``; emit them best first, one
    message each (the output queue must carry the input's message type)."""

    def __init__(self, k: int, score_field: str, output: str) -> None:
        super().__init__(output)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.score_field = k, score_field
        self._tie = itertools.count()

    def initial(self) -> list[tuple[float, int, bytes]]:
        return []

    def update(
        self, state: list[tuple[float, int, bytes]], msg: Message
    ) -> list[tuple[float, int, bytes]]:
        item = (float(_field(msg, self.score_field)), -next(self._tie), msg.SerializeToString())
        if len(state) < self.k:
            heapq.heappush(state, item)
        else:
            heapq.heappushpop(state, item)
        return state

    async def emit(self, state: list[tuple[float, int, bytes]], ctx: Context) -> None:
        for _, _, data in sorted(state, reverse=True):
            msg = ctx.message(self.output)
            msg.ParseFromString(data)
            await ctx.write(self.output, msg)


class Filter(GroupAggregator[list[bytes]]):
    """Keep items for which ``predicate`` (``module:function``, msg -> bool) holds; emit
    them in arrival order when the group closes."""

    def __init__(self, predicate: str, output: str) -> None:
        super().__init__(output)
        self.predicate = resolve(predicate, what="filter predicate")

    def initial(self) -> list[bytes]:
        return []

    def update(self, state: list[bytes], msg: Message) -> list[bytes]:
        if self.predicate(msg):
            state.append(msg.SerializeToString())
        return state

    async def emit(self, state: list[bytes], ctx: Context) -> None:
        for data in state:
            msg = ctx.message(self.output)
            msg.ParseFromString(data)
            await ctx.write(self.output, msg)


class Collect(GroupAggregator[list[Message]]):
    """Gather the group's items into the repeated field ``field`` of one output message."""

    def __init__(self, output: str, field: str = "items") -> None:
        super().__init__(output)
        self.field = field

    def initial(self) -> list[Message]:
        return []

    def update(self, state: list[Message], msg: Message) -> list[Message]:
        state.append(msg)
        return state

    async def emit(self, state: list[Message], ctx: Context) -> None:
        out = ctx.message(self.output)
        _field(out, self.field).extend(state)
        await ctx.write(self.output, out)
