"""An example third-party alto scheduler: the power of two choices.

Sample two instances at random and send the frame to the less loaded one (Mitzenmacher,
"The Power of Two Choices in Randomized Load Balancing", 2001): the maximum queue falls
from ``log n / log log n`` for one random choice to ``log log n / log 2``, while each
decision reads two loads instead of all ``n`` as least-outstanding does. That matters when
the loads are stale or costly to read, as with many runtimes sharing one stage.

It is registered in this package's ``pyproject.toml``::

    [project.entry-points."alto.schedulers"]
    power-of-two = "alto_example_scheduler:PowerOfTwo"
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

# Subclass the base and raise its error so that alto treats this policy like a built-in.
from alto.dataplane import NoInstanceError, Scheduler

__all__ = ["PowerOfTwo"]


class PowerOfTwo(Scheduler):
    """Of two instances drawn at random, the one with fewer outstanding frames.

    Options:
        seed: seeds this policy's own ``random.Random``, so a run can be replayed (the
            global generator is shared with user code and would not be).
    """

    name = "power-of-two"
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType({"seed": 0})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # random() is the cheapest draw; randrange() costs several times more per frame.
        self._random = random.Random(self.options["seed"]).random

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        ids = self.instances
        n = len(ids)
        if n < 2:
            if not n:
                raise NoInstanceError()
            return ids[0]
        # Two distinct indices: draw the second from the n - 1 others.
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        if j >= i:
            j += 1
        a, b = ids[i], ids[j]
        return a if loads[a] <= loads[b] else b
