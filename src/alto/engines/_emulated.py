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

Prefill and the prefix cache. Before its first output token a sequence's prompt is
*prefilled*: its prompt tokens (the whitespace-separated words of the prompt, the same
one-word-one-token convention; an empty prompt still costs one token, the BOS token of a
real engine) are run through the model, except those whose KV is found in the engine's
prefix cache. The model follows vLLM's automatic prefix caching and chunked prefill:

- *Blocks.* The prompt is cut into blocks of ``block_size`` tokens; each full block is
  identified by a chained hash of (the previous block's hash, the block's tokens), so a
  block's hash stands for the whole prefix up to its end. A prompt reuses the longest run
  of leading blocks found in the cache and prefills only the rest; at least its last
  token is always computed (the engine needs its logits), as vLLM does for a fully
  cached prompt. The partial last block is never cached.
- *Capacity and eviction.* The cache holds at most ``cache_tokens // block_size`` blocks
  and evicts the least recently used one first. A prompt touches its chain deepest block
  first, so that of equally recent blocks the deeper ones go first and a cached chain
  never loses its head before its tail (vLLM breaks ties between equally old blocks the
  same way: the block with the longer prefix is evicted first). Simplification: vLLM
  never evicts a block that a running sequence still uses, and the KV of running
  sequences competes with cached blocks for the same memory; here the cache is an LRU of
  prompt blocks alone, with the capacity of the whole KV cache by default.
- *When.* A sequence is looked up in the cache when its prefill is first scheduled, and
  its blocks are cached as soon as the step that computes them is scheduled (vLLM V1
  registers blocks at scheduling time), so a same-prefix request scheduled later, even
  in the same step, reuses them.
- *Chunked prefill.* Each step has a token budget of ``prefill_chunk_tokens`` (vLLM's
  ``max_num_batched_tokens``); every decoding sequence takes one token of it and waiting
  prefills take the rest in arrival order, a long prompt across several steps. A step
  that prefills ``p`` tokens lasts ``p * prefill_token_seconds`` longer than its decode
  part, so new prompts slow down every sequence in the batch, as in vLLM (additive: an
  upper estimate, since a real GPU overlaps some decode work with a prefill chunk). A
  sequence's first token comes at the end of the step that completes its prefill, its
  later tokens one per step. With ``prefill_token_seconds = 0`` prefill is free and
  unchunked: a sequence decodes from the first step after it joins, as without the model.

Defaults, calibrated for vLLM serving a 7B-class model on one 80 GB A100 (the paper runs
vLLM on A100s, one GPU per LM instance, and does not name its model):

- ``prefill_token_seconds`` = 0.1 ms, i.e. 10,000 prompt tokens/s. An estimate, not a
  measurement: a 7B model costs 2 * 6.7e9 = 13.4 GFLOP per prompt token, an A100 gives
  312 TFLOP/s in bf16, and prefill at 2k-token chunks reaches roughly 40-45% of that.
- ``prefill_chunk_tokens`` = 2048 per step: vLLM's chunked-prefill budget
  ``max_num_batched_tokens`` (512 in its first A100 tuning, 2048 and more in later
  defaults).
- ``block_size`` = 16 tokens: vLLM's default KV block size.
- ``cache_tokens`` = 114,688 (7,168 blocks): Llama-2-7B in fp16 has 512 KiB of KV per
  token (2 * 32 layers * 4096 * 2 bytes); at ``gpu_memory_utilization = 0.9`` an 80 GB
  A100 gives 72 GiB; less 12.6 GiB of weights and about 3 GiB of activations that
  leaves 56 GiB, 114,688 tokens.

The built-in profiles carry the prefill default; a profile made by hand has
``prefill_token_seconds = 0`` unless it says otherwise, and the engine option overrides
both. Decoding keeps Table 1's timings: the FacTool stages' prompts are 50 to 150 words,
5 to 15 ms of prefill, small next to their decoding (Table 1's per-token times were
measured with prefill included).

Determinism: the outputs are a function of ``(seed, profile, prompt)`` (``params.seed``
replaces the engine's seed when given): the same call gives the same text on every run.
Step-time jitter comes from one generator per engine seeded by ``seed``, and the batch
changes only at well-defined points (see the batch clock below), so the same arrivals
give the same timings, whatever order the event loop runs ready tasks in. The cache
compares block hashes only for equality, so its decisions do not depend on the process's
hash seed either.

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
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from ._base import Engine, GenerationParams

#: Prefill time per prompt token of the built-in profiles (see the module docstring).
A100_PREFILL_TOKEN_SECONDS = 1e-4


@dataclass(frozen=True, slots=True)
class EmulationProfile:
    """What one call of an emulated LM stage produces, and how fast (at batch size 1).

    ``prefill_token_seconds``: prefill time per uncached prompt token; 0 (the default for
    a profile made by hand) makes prefill free.
    """

    name: str
    outputs_mean: float
    outputs_std: float
    words_mean: float
    words_std: float
    token_seconds: float
    token_cv: float
    terminator: str = "."
    separator: str = "\n"
    prefill_token_seconds: float = 0.0
    # Sentences inside one output: a period (and a capital) after about this many words
    # (0: one sentence per output). Text only: the word count and timings do not change.
    sentence_words: float = 0.0


_P = A100_PREFILL_TOKEN_SECONDS
# Table 1 of the ALTO paper (FacTool at 15 req/s). See the module docstring.
PROFILES: dict[str, EmulationProfile] = {
    "qa": EmulationProfile(
        "qa", 1.0, 0.0, 62.5, 57.2, 1.292 / 62.5, 0.1, prefill_token_seconds=_P, sentence_words=20.0
    ),
    "claims": EmulationProfile(
        "claims", 3.3, 1.8, 9.8, 3.5, 0.4036 / 9.8, 0.25, prefill_token_seconds=_P
    ),
    "queries": EmulationProfile(
        "queries", 2.5, 1.3, 5.5, 3.1, 0.0598, 79.3 / 59.8, "?", prefill_token_seconds=_P
    ),
}
_ALIASES = {f"factool-{name}": name for name in PROFILES}

# Bounds of the engine's options: wide enough for any real GPU, tight enough that a typo
# (a rate for a time, a byte count for a token count) is an error and not a run that never
# ends or exhausts memory.
_MAX_BATCH = 65_536  # vLLM's max_num_seqs defaults to 256 (1024 on the largest GPUs)
_MAX_ALPHA = 10.0
_MAX_SECONDS = 3600.0
_MAX_PREFILL_TOKEN_SECONDS = 1.0
_MAX_CHUNK_TOKENS = 1 << 20
_MAX_BLOCK_SIZE = 1024  # vLLM offers 8 to 128 on GPUs
_MAX_CACHE_TOKENS = 1 << 24  # 16.8M tokens: 8 TiB of KV for a 7B model

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
class _Sequence:
    """A sequence's prompt and its prefill progress."""

    tokens: int  # prompt tokens
    blocks: tuple[int, ...]  # chained hashes of the prompt's full blocks
    computed: int = 0  # prompt tokens with KV: reused from the cache or prefilled
    cached: int = 0  # leading blocks known to be in the cache (found or inserted)
    scheduled: bool = False  # its prefill has been looked up and started
    first_step: int = 0  # the step whose end gives the first token (0: not yet known)


@dataclass(slots=True, eq=False)
class _Waiter:
    """A sequence waiting for a batch slot; ``admitted`` is set when it gets one."""

    seq: _Sequence
    admitted: anyio.Event = field(default_factory=anyio.Event)


def _lognormal_params(mean: float, std: float) -> tuple[float, float]:
    sigma2 = math.log1p((std / mean) ** 2)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


def _draw_count(rng: random.Random, mean: float, std: float, least: int = 1) -> int:
    if std <= 0:
        return max(least, round(mean))
    mu, sigma = _lognormal_params(mean, std)
    return max(least, round(rng.lognormvariate(mu, sigma)))


def _stable_seed(*parts: object) -> int:
    # hash() of a str is salted per process (PYTHONHASHSEED); blake2b is not.
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _bounded(name: str, value: object, low: float, high: float, *, integer: bool) -> float:
    """``value`` checked to be a number (an int where ``integer``) in ``[low, high]``.

    Raises ValueError naming the option, what it got and what is allowed.
    """
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    # bool is an int subclass; NaN fails both comparisons.
    if isinstance(value, bool) or not ok_type or not low <= value <= high:  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        span = f"{low:.15g}..{high:.15g}"
        raise ValueError(f"{name} must be {kind} in {span}, got {value!r}")
    assert isinstance(value, int | float)
    return value


class EmulatedEngine(Engine):
    """Replays Table 1's output sizes and timings under emulated continuous batching,
    with prefill and a per-instance prefix cache.

    ``profile``: ``"qa"``, ``"claims"``, ``"queries"`` (or ``"factool-qa"`` ...), or an
    :class:`EmulationProfile`. ``max_batch``: sequences decoded together; more queue.
    ``alpha``: per-token slowdown per extra sequence in the batch.
    ``first_token_seconds``: a fixed extra latency after a sequence gets its slot and
    before its prefill is scheduled (default none; prefill itself is modelled, below).
    ``prefill_token_seconds``: prefill time per uncached prompt token (default: the
    profile's). ``prefill_chunk_tokens``: the per-step token budget of chunked prefill.
    ``block_size``: tokens per prefix-cache block. ``cache_tokens``: the prefix cache's
    capacity (0 disables it). ``outputs_per_input_word``: instead of the profile's count
    of outputs, draw a count proportional to the words of the prompt's line after the last
    ``input_marker`` (default ``"Text:"``), e.g. 3.3 / 62.5 claims per word of the answer a
    claim extractor splits, so that splitting an answer into sentences does not multiply
    its claims. The module docstring gives the model and the calibration.

    Raises ``ValueError`` for an unknown profile or an option of the wrong type or out of
    range (the message names the option and the allowed range).
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
        prefill_token_seconds: float | None = None,
        prefill_chunk_tokens: int = 2048,
        block_size: int = 16,
        cache_tokens: int = 114_688,
        outputs_per_input_word: float | None = None,
        input_marker: str = "Text:",
    ) -> None:
        if isinstance(profile, str):
            key = _ALIASES.get(profile, profile)
            if key not in PROFILES:
                allowed = ", ".join([*PROFILES, *_ALIASES])
                raise ValueError(f"unknown emulation profile {profile!r}; allowed: {allowed}")
            profile = PROFILES[key]
        if not isinstance(profile, EmulationProfile):
            raise ValueError(
                f"profile must be a profile name or an EmulationProfile, got {profile!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.max_batch = int(_bounded("max_batch", max_batch, 1, _MAX_BATCH, integer=True))
        # Outputs that scale with the input (claims of a text): see plan().
        self.outputs_per_input_word = (
            None
            if outputs_per_input_word is None
            else _bounded("outputs_per_input_word", outputs_per_input_word, 0, 100, integer=False)
        )
        if not isinstance(input_marker, str) or not input_marker or len(input_marker) > 64:
            raise ValueError("input_marker must be a non-empty string of at most 64 characters")
        self.input_marker = input_marker
        self.alpha = _bounded("alpha", alpha, 0, _MAX_ALPHA, integer=False)
        self.first_token_seconds = _bounded(
            "first_token_seconds", first_token_seconds, 0, _MAX_SECONDS, integer=False
        )
        if prefill_token_seconds is None:
            prefill_token_seconds = profile.prefill_token_seconds
        self.prefill_token_seconds = _bounded(
            "prefill_token_seconds",
            prefill_token_seconds,
            0,
            _MAX_PREFILL_TOKEN_SECONDS,
            integer=False,
        )
        self.prefill_chunk_tokens = int(
            _bounded(
                "prefill_chunk_tokens", prefill_chunk_tokens, 1, _MAX_CHUNK_TOKENS, integer=True
            )
        )
        self.block_size = int(_bounded("block_size", block_size, 1, _MAX_BLOCK_SIZE, integer=True))
        self.cache_tokens = int(
            _bounded("cache_tokens", cache_tokens, 0, _MAX_CACHE_TOKENS, integer=True)
        )
        self.profile = profile
        self.seed = seed
        self._cache_blocks = self.cache_tokens // self.block_size
        self._timing_rng = random.Random(_stable_seed(seed, "timing"))
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # Sequences with a slot whose prefill is not fully scheduled yet, in arrival order.
        self._prefilling: collections.deque[_Sequence] = collections.deque()
        # The prefix cache: block hash -> None, least recently used first.
        self._cache: collections.OrderedDict[int, None] = collections.OrderedDict()
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
        self._prefill_seconds = 0.0
        self._prompt_tokens = 0
        self._prompt_tokens_reused = 0
        self._prompt_tokens_evaluated = 0
        self._blocks_evicted = 0

    # -- what to say ---------------------------------------------------------------

    def plan(self, prompt: str, *, seed: int | None = None) -> tuple[str, ...]:
        """The outputs (responses, claims or queries) that ``generate(prompt)`` streams,
        before ``max_tokens`` and ``stop`` apply. A pure function of seed, profile, prompt.
        """
        p = self.profile
        rng = random.Random(_stable_seed(self.seed if seed is None else seed, p.name, prompt))
        outputs = []
        mean, std = p.outputs_mean, p.outputs_std
        if self.outputs_per_input_word is not None:
            # The count follows the input's length: the words on the line after the last
            # ``input_marker`` (the text a claim extractor splits), times the rate, with the
            # profile's coefficient of variation. For FacTool's claims: Table 1's 3.3 claims
            # per answer of 62.5 words on average, whether the answer comes whole or a
            # sentence at a time.
            _, _, tail = prompt.rpartition(self.input_marker)
            n_words = len(tail.split("\n", 1)[0].split())
            mean = max(self.outputs_per_input_word * n_words, 0.05)
            std = mean * (p.outputs_std / p.outputs_mean if p.outputs_mean else 0.0)
            # A short text may hold no claim at all: no floor of one output here, or
            # splitting an answer into sentences would add claims.
            count = _draw_count(rng, mean, std, least=0)
        else:
            count = _draw_count(rng, mean, std)
        for _ in range(count):
            words = [rng.choice(_WORDS) for _ in range(_draw_count(rng, p.words_mean, p.words_std))]
            words[0] = words[0].capitalize()
            if p.sentence_words:
                # Sentence breaks (a separate generator: the words stay those of the seed).
                breaks = random.Random(_stable_seed(self.seed, p.name, "sentences", prompt))
                i = _draw_count(breaks, p.sentence_words, p.sentence_words / 2)
                while i < len(words):
                    words[i - 1] += "."
                    words[i] = words[i].capitalize()
                    i += _draw_count(breaks, p.sentence_words, p.sentence_words / 2)
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

    # -- the prompt and the prefix cache -------------------------------------------

    def _sequence(self, prompt: str) -> _Sequence:
        """The prompt's token count and the chained hashes of its full blocks.

        A block's hash covers its parent's hash and its own tokens, so equal hashes mean
        equal prefixes (as vLLM's ``hash((parent_hash, block_tokens))``). Python's
        ``hash`` is salted per process, which is fine: hashes never leave this engine and
        are only compared for equality.
        """
        words = prompt.split()
        blocks: list[int] = []
        if self._cache_blocks:
            size = self.block_size
            parent: int | None = None
            for start in range(0, len(words) - size + 1, size):
                parent = hash((parent, tuple(words[start : start + size])))
                blocks.append(parent)
        return _Sequence(max(1, len(words)), tuple(blocks))

    def _touch(self, blocks: tuple[int, ...]) -> None:
        """Mark ``blocks`` (a chain from its head) most recently used, deepest first, so
        that of these the head is the last to be evicted; then evict past capacity."""
        cache = self._cache
        for h in reversed(blocks):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
        while len(cache) > self._cache_blocks:
            cache.popitem(last=False)
            self._blocks_evicted += 1

    def _lookup(self, seq: _Sequence) -> None:
        """The first time a sequence's prefill is scheduled: reuse the longest run of its
        leading blocks that the cache holds."""
        seq.scheduled = True
        hit = 0
        for h in seq.blocks:
            if h not in self._cache:
                break
            hit += 1
        if hit:
            self._touch(seq.blocks[:hit])
        seq.cached = hit
        # At least the last prompt token is computed: the first output needs its logits.
        seq.computed = min(hit * self.block_size, seq.tokens - 1)
        self._prompt_tokens += seq.tokens
        self._prompt_tokens_reused += seq.computed

    def _schedule_prefill(self) -> int:
        """Give this step's prefill budget to the waiting prefills, in arrival order;
        returns the prompt tokens to compute in it."""
        if not self._prefilling:
            return 0
        if self.prefill_token_seconds:
            # vLLM's budget is shared: each decoding sequence takes one token of it.
            decoding = self._active - len(self._prefilling)
            budget = max(1, self.prefill_chunk_tokens - decoding)
        else:
            budget = sys.maxsize  # free prefill: every waiting prompt in one step
        step = self._steps + 1  # the step being started
        total = 0
        while budget and self._prefilling:
            seq = self._prefilling[0]
            if not seq.scheduled:
                self._lookup(seq)
            n = min(seq.tokens - seq.computed, budget)
            seq.computed += n
            budget -= n
            total += n
            full = min(seq.computed // self.block_size, len(seq.blocks))
            if full > seq.cached:
                # Cached once the step computing them is scheduled, as vLLM V1 does.
                self._touch(seq.blocks[:full])
                seq.cached = full
            if seq.computed == seq.tokens:
                self._prefilling.popleft()
                seq.first_step = step
        self._prompt_tokens_evaluated += total
        return total

    # -- when to say it: the batch clock -------------------------------------------
    #
    # Sequences hold batch slots (at most max_batch; the rest wait FIFO). A step starts
    # when a sequence asks for its next token and none is in progress; its length follows
    # from the slots held and the prefill scheduled at that moment, and every sequence
    # that held a slot when it started (and has finished its prefill) gets one token at
    # its end. Everything that changes the batch (a sequence leaving, a slot handed to a
    # waiter together with its place in the prefill queue, an arrival) happens
    # synchronously, and a step starts only after a schedule point, so that all sequences
    # that woke at a step boundary have left or joined first: timings do not depend on
    # the order in which the event loop runs tasks that are ready at the same instant.

    def _step_seconds(self) -> float:
        mean = self.profile.token_seconds * (1 + self.alpha * (max(self._active, 1) - 1))
        cv = self.profile.token_cv
        if cv <= 0:
            return mean
        mu, sigma = _lognormal_params(mean, mean * cv)
        return self._timing_rng.lognormvariate(mu, sigma)

    def _start_step(self, now: float) -> None:
        prefill = self._schedule_prefill() * self.prefill_token_seconds
        duration = self._step_seconds() + prefill
        self._step_end = now + duration
        self._steps += 1
        self._busy_seconds += duration
        self._prefill_seconds += prefill

    def _joined(self, seq: _Sequence) -> None:
        """``seq`` got a batch slot: queue its prefill (unless a fixed first-token delay
        comes first; then :meth:`generate` queues it after the delay)."""
        if not self.first_token_seconds:
            self._prefilling.append(seq)

    async def _admit(self, seq: _Sequence) -> None:
        """Take a batch slot, waiting FIFO for one."""
        if self._active < self.max_batch and not self._waiters:
            self._active += 1
            self._joined(seq)
            return
        waiter = _Waiter(seq)
        self._waiters.append(waiter)
        try:
            await waiter.admitted.wait()
        except BaseException:
            if waiter.admitted.is_set():
                self._leave_batch(seq)  # handed a slot as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def _leave_batch(self, seq: _Sequence) -> None:
        if seq.first_step == 0 and seq in self._prefilling:
            self._prefilling.remove(seq)  # cancelled before its prefill was scheduled
        if self._waiters:
            # Hand the slot over: the waiter is in the batch from now on, and its prefill
            # in the queue, whichever task happens to start the next step.
            waiter = self._waiters.popleft()
            self._joined(waiter.seq)
            waiter.admitted.set()
        else:
            self._active -= 1

    async def _prefilled(self, seq: _Sequence) -> None:
        """Wait for the end of the step that completes ``seq``'s prefill: its first token."""
        while True:
            await anyio.lowlevel.checkpoint()
            now = anyio.current_time()
            if now >= self._step_end:
                self._start_step(now)
            if seq.first_step:
                break
            # Not (fully) scheduled in the step in progress: wait for the next boundary.
            await anyio.sleep_until(self._step_end)
        if seq.first_step == self._steps:
            await anyio.sleep_until(self._step_end)
        # Otherwise a later step has started: the one that completed the prefill is over.

    async def _next_step(self, joined: int) -> None:
        """Wait for the end of the step that gives this sequence (decoding since step
        ``joined``) its next token."""
        while True:
            await anyio.lowlevel.checkpoint()
            now = anyio.current_time()
            if now >= self._step_end:
                self._start_step(now)
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
        """Stream the emulated completion, one word per decoding step, after the prompt's
        prefill.

        ``prompt_key`` is ignored: the prefix cache finds shared prefixes by itself, as
        vLLM's automatic prefix caching does. Closing the iterator early frees the
        sequence's batch slot (and its place in the prefill queue) at once.
        """
        pieces = self._pieces(prompt, params)
        self._started += 1
        if not pieces:
            self._finished += 1
            return
        seq = self._sequence(prompt)
        await self._admit(seq)
        self._max_active = max(self._max_active, self._active)
        in_batch = True
        try:
            if self.first_token_seconds:
                await anyio.sleep(self.first_token_seconds)
                self._prefilling.append(seq)
            await self._prefilled(seq)
            last = len(pieces) - 1
            for i, piece in enumerate(pieces):
                if i:
                    await self._next_step(seq.first_step)
                self._tokens += 1
                if i == last:
                    # Leave before yielding, so the next step is computed without us.
                    in_batch = False
                    self._leave_batch(seq)
                    self._finished += 1
                if piece:
                    yield piece
        finally:
            if in_batch:
                self._leave_batch(seq)
                self._cancelled += 1

    def statistics(self) -> dict[str, float]:
        """Counters: sequences (started, finished, cancelled, active, waiting, the most
        active at once), tokens generated, decoding steps, the emulated busy time and the
        part of it spent on prefill; prompt tokens of the sequences whose prefill was
        scheduled, split into ``prompt_tokens_reused`` (found in the prefix cache) and
        ``prompt_tokens_evaluated`` (prefilled; a cancelled sequence may leave some of
        its prompt unprefilled), ``cache_hit_rate`` (reused / prompt tokens, as vLLM's
        prefix cache hit rate), the tokens the cache holds and the blocks it evicted; and
        the engine's shape (``max_batch``, ``token_seconds``, ``alpha``)."""
        prompt = self._prompt_tokens
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
            "prefill_seconds": self._prefill_seconds,
            "prompt_tokens": prompt,
            "prompt_tokens_reused": self._prompt_tokens_reused,
            "prompt_tokens_evaluated": self._prompt_tokens_evaluated,
            "cache_hit_rate": self._prompt_tokens_reused / prompt if prompt else 0.0,
            "cache_tokens": len(self._cache) * self.block_size,
            "cache_blocks_evicted": self._blocks_evicted,
            # The emulated GPU's shape, for capacity: at most max_batch sequences decode
            # together at token_seconds * (1 + alpha * (max_batch - 1)) per step.
            "max_batch": self.max_batch,
            "token_seconds": self.profile.token_seconds,
            "alpha": self.alpha,
        }
