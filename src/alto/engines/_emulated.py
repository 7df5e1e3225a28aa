"""An engine that replays measured output timings instead of running a model.

Benchmarks of the pipeline at 15 requests per second need GPU-class LM throughput that a
CPU cannot give; this engine produces outputs of the right sizes at the right times so
that the dataplane (routing, aggregation, back pressure) can be measured at that scale.

Calibration: the paper's Table 1 (FacTool, 15 req/s):

=====================  =======================  =========================  ================
profile                outputs per call         words per output           per-token time
=====================  =======================  =========================  ================
``qa``                 1                        62.5 +- 57.2               1292 ms / 62.5
``claims``             3.3 +- 1.8 claims        9.8 +- 3.5                 403.6 ms / 9.8
``queries``            2.5 +- 1.3 queries       5.5 +- 3.1                 59.8 +- 79.3 ms
=====================  =======================  =========================  ================

One word is one token (Table 1's "ms per query token" times words per query gives its
ms per query: 5.5 * 59.8 = 329 vs 326.6). Distributions, chosen because every quantity is
positive and right-skewed (the std of the QA length is nearly its mean):

- counts (outputs per call, words per output): lognormal with the table's mean and std,
  rounded to the nearest integer and at least 1;
- the time of one decoding step: lognormal with mean ``token_seconds`` (scaled by the
  batch, below) and coefficient of variation ``token_cv``. For ``queries`` the cv is the
  table's 79.3 / 59.8; with independent steps this gives 263 ms std per query, the table
  says 252.4. For ``qa`` the table's time std (1175 ms) is already explained by its length
  std (57.2 words * 20.7 ms), so the cv is small (0.1); ``claims`` has no time std in the
  table and gets 0.25 (an assumption).

Continuous batching: one engine is one emulated GPU instance with a shared *batch clock*.
Every active sequence advances by one token per decoding step (an iteration of the batch);
a step takes ``token_seconds * (1 + alpha * (active - 1))``, so per-token latency grows
with the batch while throughput ``active / step`` saturates towards
``1 / (alpha * token_seconds)``; at most ``max_batch`` sequences are active and the rest
queue (FIFO) for a slot. A sequence that arrives mid-step joins at the next iteration
boundary, as in vLLM's scheduler. Tokens are produced as the consumer asks for them: a
sequence whose consumer is slow keeps its slot (it counts in the batch) and gets its
next token at the end of the step in progress when it asks. The clock is the event
loop's (``anyio.current_time``), so tests run it on trio's ``MockClock`` (autojump) and
never sleep in real time.

Determinism: the outputs are a function of ``(seed, profile, prompt)`` (``params.seed``
replaces the engine's seed when given): the same call gives the same text on every run.
Step-time jitter comes from one generator per engine seeded by ``seed``, and the batch
changes only at well-defined points (see the batch clock below), so the same arrivals
give the same timings, whatever order the event loop runs ready tasks in.

Output text: words from a fixed word list; each output starts with a capital letter and
ends with ``.`` (``?`` for queries); outputs are separated by newlines, the separator
attached to the end of an output's last token so that a streaming consumer can split at
``"\\n"`` as soon as an output is complete. ``params.max_tokens`` and ``params.stop`` apply
as in a real engine (the stop string is not included in the output).
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from ._base import Engine, GenerationParams


@dataclass(frozen=True, slots=True)
class EmulationProfile:
    """What one call of an emulated LM stage produces, and how fast (at batch size 1)."""

    name: str
    outputs_mean: float
    outputs_std: float
    words_mean: float
    words_std: float
    token_seconds: float
    token_cv: float
    terminator: str = "."
    separator: str = "\n"


# Table 1 of the ALTO paper (FacTool at 15 req/s). See the module docstring.
PROFILES: dict[str, EmulationProfile] = {
    "qa": EmulationProfile("qa", 1.0, 0.0, 62.5, 57.2, 1.292 / 62.5, 0.1),
    "claims": EmulationProfile("claims", 3.3, 1.8, 9.8, 3.5, 0.4036 / 9.8, 0.25),
    "queries": EmulationProfile("queries", 2.5, 1.3, 5.5, 3.1, 0.0598, 79.3 / 59.8, "?"),
}
_ALIASES = {f"factool-{name}": name for name in PROFILES}

# A fixed vocabulary: output text must not depend on anything but (seed, profile, prompt).
_WORDS = (
    "the of and a to in is was for on that with as by at from his her an which were "
    "are this be had it not but their has have one first new after also who its two "
    "other been more all into during time over only most years city state world team "
    "season film river music population school war government national church "
    "station village company county album game group family series party system "
    "water island house north south century university league"
).split()


@dataclass(slots=True, eq=False)
class _Waiter:
    """A sequence waiting for a batch slot; ``joined`` is set when it gets one."""

    admitted: anyio.Event = field(default_factory=anyio.Event)
    joined: int = 0


def _lognormal_params(mean: float, std: float) -> tuple[float, float]:
    sigma2 = math.log1p((std / mean) ** 2)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


def _draw_count(rng: random.Random, mean: float, std: float) -> int:
    if std <= 0:
        return max(1, round(mean))
    mu, sigma = _lognormal_params(mean, std)
    return max(1, round(rng.lognormvariate(mu, sigma)))


def _stable_seed(*parts: object) -> int:
    # hash() of a str is salted per process (PYTHONHASHSEED); blake2b is not.
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class EmulatedEngine(Engine):
    """Replays Table 1's output sizes and timings under emulated continuous batching.

    ``profile``: ``"qa"``, ``"claims"``, ``"queries"`` (or ``"factool-qa"`` ...), or an
    :class:`EmulationProfile`. ``max_batch``: sequences decoded together; more queue.
    ``alpha``: per-token slowdown per extra sequence in the batch. ``first_token_seconds``:
    extra latency before a sequence joins the batch (prefill), default none.

    Raises ``ValueError`` for an unknown profile or an out-of-range option.
    """

    name = "emulated"

    def __init__(
        self,
        profile: str | EmulationProfile = "qa",
        *,
        seed: int = 0,
        max_batch: int = 32,
        alpha: float = 0.05,
        first_token_seconds: float = 0.0,
    ) -> None:
        if isinstance(profile, str):
            key = _ALIASES.get(profile, profile)
            if key not in PROFILES:
                allowed = ", ".join([*PROFILES, *_ALIASES])
                raise ValueError(f"unknown emulation profile {profile!r}; allowed: {allowed}")
            profile = PROFILES[key]
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if alpha < 0 or first_token_seconds < 0:
            raise ValueError("alpha and first_token_seconds must not be negative")
        self.profile = profile
        self.seed = seed
        self.max_batch = max_batch
        self.alpha = alpha
        self.first_token_seconds = first_token_seconds
        self._timing_rng = random.Random(_stable_seed(seed, "timing"))
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # The batch clock: the end of the decoding step in progress (-inf when idle).
        self._step_end = -math.inf
        self._active = 0
        self._max_active = 0
        self._started = 0
        self._finished = 0
        self._cancelled = 0
        self._tokens = 0
        self._steps = 0
        self._busy_seconds = 0.0

    # -- what to say ---------------------------------------------------------------

    def plan(self, prompt: str, *, seed: int | None = None) -> tuple[str, ...]:
        """The outputs (responses, claims or queries) that ``generate(prompt)`` streams,
        before ``max_tokens`` and ``stop`` apply. A pure function of seed, profile, prompt.
        """
        p = self.profile
        rng = random.Random(_stable_seed(self.seed if seed is None else seed, p.name, prompt))
        outputs = []
        for _ in range(_draw_count(rng, p.outputs_mean, p.outputs_std)):
            words = [rng.choice(_WORDS) for _ in range(_draw_count(rng, p.words_mean, p.words_std))]
            words[0] = words[0].capitalize()
            outputs.append(" ".join(words) + p.terminator)
        return tuple(outputs)

    def _pieces(self, prompt: str, params: GenerationParams) -> list[str]:
        """One text piece per decoding step, with max_tokens and stop applied."""
        outputs = self.plan(prompt, seed=params.seed)
        tokens: list[str] = []
        for i, output in enumerate(outputs):
            words = output.split(" ")
            pieces = [words[0]] + [" " + w for w in words[1:]]
            if i < len(outputs) - 1:
                pieces[-1] += self.profile.separator
            tokens.extend(pieces)
        tokens = tokens[: max(0, params.max_tokens)]
        stops = [s for s in params.stop if s]
        if not stops:
            return tokens
        text = ""
        for n, token in enumerate(tokens):
            new = text + token
            start = max(0, len(text) - max(map(len, stops)) + 1)
            hits = [i for i in (new.find(s, start) for s in stops) if i >= 0]
            if hits:
                # The step that produced the stop string still ran; its text is cut.
                return [*tokens[:n], new[len(text) : min(hits)]]
            text = new
        return tokens

    # -- when to say it: the batch clock -------------------------------------------
    #
    # Sequences hold batch slots (at most max_batch; the rest wait FIFO). A decoding step
    # starts when a sequence asks for its next token and none is in progress; its length
    # follows from the slots held at that moment, and every sequence that held a slot
    # when it started gets one token at its end. Everything that changes the batch (a
    # sequence leaving, a slot handed to a waiter, an arrival) happens synchronously, and a
    # step starts only after a schedule point, so that all sequences that woke at a step
    # boundary have left or joined first: timings do not depend on the order in which
    # the event loop runs tasks that are ready at the same instant.

    def _step_seconds(self) -> float:
        mean = self.profile.token_seconds * (1 + self.alpha * (max(self._active, 1) - 1))
        cv = self.profile.token_cv
        if cv <= 0:
            return mean
        mu, sigma = _lognormal_params(mean, mean * cv)
        return self._timing_rng.lognormvariate(mu, sigma)

    async def _admit(self) -> int:
        """Take a batch slot, waiting FIFO for one; returns the steps started so far."""
        if self._active < self.max_batch and not self._waiters:
            self._active += 1
            return self._steps
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.admitted.wait()
        except BaseException:
            if waiter.admitted.is_set():
                self._leave_batch()  # handed a slot as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        return waiter.joined

    def _leave_batch(self) -> None:
        if self._waiters:
            # Hand the slot over: the waiter is in the batch from now on, and in the next
            # step whichever task happens to start it.
            waiter = self._waiters.popleft()
            waiter.joined = self._steps
            waiter.admitted.set()
        else:
            self._active -= 1

    async def _next_step(self, joined: int) -> None:
        """Wait for the end of the step that gives this sequence (in the batch since
        ``joined`` steps had started) its next token."""
        while True:
            await anyio.lowlevel.checkpoint()
            now = anyio.current_time()
            if now >= self._step_end:
                duration = self._step_seconds()
                self._step_end = now + duration
                self._steps += 1
                self._busy_seconds += duration
                break
            if joined < self._steps:
                break  # this step started with us in the batch
            # Joined mid-step: wait for the iteration boundary, as vLLM's scheduler does.
            await anyio.sleep_until(self._step_end)
        await anyio.sleep_until(self._step_end)

    async def generate(
        self,
        prompt: str,
        params: GenerationParams = GenerationParams(),
        *,
        prompt_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream the emulated completion, one word per decoding step.

        ``prompt_key`` is ignored (no prefix cache is emulated). Closing the iterator
        early frees the sequence's batch slot at once.
        """
        pieces = self._pieces(prompt, params)
        self._started += 1
        if not pieces:
            self._finished += 1
            return
        joined = await self._admit()
        self._max_active = max(self._max_active, self._active)
        in_batch = True
        try:
            if self.first_token_seconds:
                await anyio.sleep(self.first_token_seconds)
                joined = self._steps
            last = len(pieces) - 1
            for i, piece in enumerate(pieces):
                await self._next_step(joined)
                self._tokens += 1
                if i == last:
                    # Leave before yielding, so the next step is computed without us.
                    in_batch = False
                    self._leave_batch()
                    self._finished += 1
                if piece:
                    yield piece
        finally:
            if in_batch:
                self._leave_batch()
                self._cancelled += 1

    def statistics(self) -> dict[str, float]:
        """Counters: sequences (started, finished, cancelled, active, waiting, the most
        active at once), tokens generated, decoding steps and the emulated busy time."""
        return {
            "sequences_started": self._started,
            "sequences_finished": self._finished,
            "sequences_cancelled": self._cancelled,
            "active_sequences": self._active,
            "waiting_sequences": len(self._waiters),
            "max_active_sequences": self._max_active,
            "tokens_generated": self._tokens,
            "steps": self._steps,
            "busy_seconds": self._busy_seconds,
        }
