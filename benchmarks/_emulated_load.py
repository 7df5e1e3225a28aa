"""Shared by the emulated-GPU benchmarks (figure5.py, prompt_routing.py): Poisson load
through alto's real runtime on a virtual clock, percentiles, bounded CLI numbers, plots,
and the stages of the prompt-routing pipeline.

The virtual clock. Each load point runs a pipeline file with ``alto.testing.open_pipeline``
(the real runtime, scheduler and workers over socket pairs, in this process) under trio's
``MockClock`` with ``autojump_threshold=0``: whenever every task waits, the clock jumps to
the next deadline. The emulated engine's batch clock is the only thing that sleeps, so
minutes of emulated GPU time pass in seconds, and the time axis of every result is the
emulated GPU's: alto's own relay work costs no virtual time (it is measured on its own by
``relay_bench.py``). Start-up runs on a clock at real speed (:func:`open_virtual`): the
FacTool stages build their engine in a worker thread, and a jumping clock would pass the
runtime's 10 s HELLO deadline while the thread runs.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio
import trio.testing

import alto
from alto.engines import EmulatedEngine, GenerationParams
from alto.factool.factool_pb2 import Answer, Question
from alto.testing import InProcessPipeline, open_pipeline

# Only points whose achieved load is at least this share of the offered load count, as in
# the paper's Figures 3 and 5; and none where the ingress refused requests (more than
# max_inflight_requests in flight): the load was not sustained, whatever the ratio says.
COUNTED = 0.8


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (NaN for no data)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type`` that accepts ``kind`` values in ``[low, high]`` only."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} in {low:g}..{high:g}, got {text!r}"
            ) from None
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be in {low:g}..{high:g}, got {text}")
        return value

    return parse


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load point: Poisson arrivals at ``offered`` req/s for ``seconds``."""

    offered: float
    sent: int
    done: int
    failed: int
    achieved: float  # completed requests / (last completion - first arrival)
    p50: float
    p99: float

    @property
    def counted(self) -> bool:
        return self.achieved >= COUNTED * self.offered and not self.failed


async def poisson_load(
    run: Callable[[int], Awaitable[object]], rate: float, seconds: float, seed: int
) -> LoadResult:
    """Start ``run(i)`` for i = 0, 1, ... at Poisson arrivals of ``rate`` per second for
    ``seconds``, wait for all of them, and measure as the paper does: achieved load is the
    requests completed over the time from the first arrival to the last completion;
    latency is from a request's arrival to its completion. A request whose ``run`` raises
    an alto error (refused, failed) counts as failed, not in the latencies."""
    rng = random.Random(seed)
    latencies: list[float] = []
    failed = 0
    t0 = trio.current_time()
    last_done = t0

    async def one(i: int) -> None:
        nonlocal failed, last_done
        start = trio.current_time()
        try:
            await run(i)
        except alto.AltoError:
            failed += 1
            return
        now = trio.current_time()
        latencies.append(now - start)
        last_done = max(last_done, now)

    sent = 0
    async with trio.open_nursery() as nursery:
        at = t0
        while True:
            at += rng.expovariate(rate)
            if at - t0 >= seconds:
                break
            await trio.sleep_until(at)
            nursery.start_soon(one, sent)
            sent += 1
    achieved = len(latencies) / (last_done - t0) if last_done > t0 else 0.0
    return LoadResult(
        rate, sent, len(latencies), failed, achieved, pct(latencies, 0.5), pct(latencies, 0.99)
    )


@asynccontextmanager
async def open_virtual(
    pipeline: str | Path, instances: dict[str, int] | None = None
) -> AsyncIterator[InProcessPipeline]:
    """``open_pipeline`` under the run's MockClock: real-speed time while instances start
    (stage set-up may run threads, which an autojumping clock does not wait for), then
    virtual time that jumps whenever every task waits."""
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock):
        raise RuntimeError("run the benchmark with trio.run(..., clock=MockClock())")
    clock.autojump_threshold = math.inf
    clock.rate = 1.0
    async with open_pipeline(pipeline, instances=instances) as p:
        clock.rate = 0.0
        clock.autojump_threshold = 0.0
        yield p


def rate_sweep(start: float, factor: float, max_points: int) -> list[float]:
    """Offered loads ``start * factor**k``, rounded to 3 significant digits."""
    return [float(f"{start * factor**k:.3g}") for k in range(max_points)]


def plot_panels(
    path: str,
    title: str,
    panels: Sequence[tuple[str, str, str, dict[str, list[tuple[float, float]]]]],
) -> None:
    """One figure, one panel per ``(x label, y label, panel title, {line: [(x, y)]})``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0))
    for ax, (xlabel, ylabel, name, lines) in zip(axes, panels, strict=True):
        for label, points in lines.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3.5, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the prompt-routing pipeline ------------------------------------------------------------
#
# Two stages, as in the FacTool pipeline where an upstream stage names the prompt key of
# what it writes into an LM stage: ``dispatch`` forwards each request to the ``lm`` queue
# with its template's name as the prompt key (the client cannot set one), and ``lm`` (the
# stage under test, N instances, the scheduler under test) formats template + request tail
# and generates with an emulated engine.

ROUTING_PIPELINE = """\
# Written by benchmarks/prompt_routing.py for one policy; not meant to be edited.
[pipeline]
name = "prompt-routing"
input = "requests"
outputs = ["answers"]

[queues.requests]
type = "alto.factool.factool_pb2:Question"
[queues.prompts]
type = "alto.factool.factool_pb2:Question"
[queues.answers]
type = "alto.factool.factool_pb2:Answer"

[stages.dispatch]
entry = "_emulated_load:Dispatch"
inputs = ["requests"]
outputs = ["prompts"]

[stages.lm]
entry = "_emulated_load:TemplateLM"
inputs = ["prompts"]
outputs = ["answers"]
scheduler = "{scheduler}"
scheduler_options = {scheduler_options}
options = {{ templates = "{templates}", engine_options = {engine_options} }}
"""


class Dispatch:
    """Forwards a request to the LM stage, its template's name as the prompt key."""

    async def process(self, request: Question, ctx: alto.Context) -> None:
        await ctx.write("prompts", request, prompt_key=request.gold_pid)


class TemplateLM:
    """An LM stage whose prompt is a shared template prefix plus the request's own tail.

    ``request.gold_pid`` names the template, ``request.question`` is the tail. Templates
    come from :func:`make_templates` (a pure function of the spec string, so every
    instance builds the same ones). Engines register in :attr:`engines` so that the
    benchmark, which runs the instances in its own process, can read their statistics.
    """

    engines: ClassVar[list[EmulatedEngine]] = []

    def __init__(
        self, templates: str, engine_options: dict[str, Any] | None = None, max_tokens: int = 400
    ) -> None:
        self.templates = make_templates(templates)
        self.engine = EmulatedEngine(**(engine_options or {}))
        self.max_tokens = max_tokens

    async def setup(self) -> None:
        TemplateLM.engines.append(self.engine)

    async def process(self, request: Question, ctx: alto.Context) -> None:
        prompt = self.templates[request.gold_pid] + " " + request.question
        text = ""
        params = GenerationParams(max_tokens=self.max_tokens)
        # An async generator: aclosing() stops it (and frees its batch slot) on any exit.
        stream: Any = self.engine.generate(prompt, params, prompt_key=request.gold_pid)
        async with aclosing(stream) as pieces:
            async for piece in pieces:
                text += piece
        await ctx.write("answers", Answer(question_id=request.id, text=text))


_VOCABULARY = [
    f"{a}{b}" for a in "bcdfghjklmnpqrstvwz" for b in ("a", "e", "i", "o", "u", "ar", "en")
]


def make_templates(spec: str) -> dict[str, str]:
    """Templates from ``"name:tokens,name:tokens,..."``: each a fixed pseudo-random text
    of that many words (one word is one token for the emulated engine), seeded by name."""
    out = {}
    for part in spec.split(","):
        name, _, size = part.partition(":")
        rng = random.Random(f"template {name}")
        out[name] = " ".join(rng.choice(_VOCABULARY) for _ in range(int(size)))
    return out


def request_tail(rng: random.Random, low: int, high: int) -> str:
    """A request-specific prompt tail of ``low..high`` words (a question, a document)."""
    return " ".join(rng.choice(_VOCABULARY) for _ in range(rng.randint(low, high)))


def mean_or_nan(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan
