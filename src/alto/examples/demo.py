"""The demo pipeline: fan out, transform on several instances, aggregate per request.

``generate`` (fan-out) turns ``Number(value=n)`` into the items 0..n-1, pausing
``delay`` seconds between items the way an LM emits tokens; ``square`` (stateless, many
instances) squares each and also streams it back to the client; ``total`` (stateful,
``alto.aggregate:Sum`` at level 1) sums the squares of each request and emits when the
runtime closes the request's group. The answer is sum(i*i for i in range(n)).
"""

from __future__ import annotations

import anyio

from .._stage import Context
from .demo_pb2 import Item, Number, Square


class Generate:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def process(self, msg: Number, ctx: Context) -> None:
        if msg.value < 0:
            raise ValueError(f"value must be >= 0, got {msg.value}")
        for i in range(msg.value):
            await ctx.write("items", Item(value=i))
            if self.delay:
                await anyio.sleep(self.delay)


async def square(msg: Item, ctx: Context) -> None:
    sq = Square(value=msg.value * msg.value, instance=ctx.instance)
    await ctx.write("squares", sq)
    await ctx.write("partials", sq)
