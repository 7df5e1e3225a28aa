"""SGLang in-process as an alto engine (``engine = "sglang"``).

``sglang.Engine`` (the "offline engine API") runs SGLang's scheduler and detokenizer in
subprocesses and its tokenizer manager in this process; it batches all concurrent
requests and reuses prompt prefixes through its radix cache.

SGLang is an asyncio library (and importing it installs uvloop's event loop policy). A
stage that uses this engine must run with ``backend = "asyncio"`` in the pipeline file;
under trio, :meth:`SGLangEngine.generate` raises :class:`SGLangError` at once.

Streaming: ``await engine.async_generate(prompt, sampling_params, stream=True, rid=...)``
returns an async iterator of dicts. Their ``"text"`` is cumulative by default and a delta
when the engine was started with ``incremental_streaming_output=True`` (the server
argument that makes SGLang stream deltas); we yield deltas either way. On early close we
close SGLang's iterator and ask its tokenizer manager to abort the request id.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio

from alto import AltoError
from alto.engines import Engine, GenerationParams

__all__ = ["SGLangEngine", "SGLangError"]


class SGLangError(AltoError):
    """SGLang failed, or was used outside asyncio."""


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise SGLangError(
            'SGLang runs only under asyncio: set backend = "asyncio" for this stage'
        ) from None


class SGLangEngine(Engine):
    """An SGLang engine in this process.

    ``model_path``: a Hugging Face model id or a local path. Other keyword options go to
    ``sglang.Engine`` (that is, to SGLang's ``ServerArgs``: ``mem_fraction_static``,
    ``context_length``, ``tp_size``, ``incremental_streaming_output`` ...); an unknown one
    raises ``TypeError``, which :func:`alto.engines.load_engine` reports as a
    ``PluginError``.
    """

    name = "sglang"

    def __init__(self, model_path: str, **server_args: Any):
        import sglang  # here, so that other engines never import SGLang (and CUDA)

        self.model_path = model_path
        self._incremental = bool(server_args.get("incremental_streaming_output", False))
        self._engine = sglang.Engine(model_path=model_path, **server_args)
        self._stats: dict[str, float] = dict.fromkeys(
            ("requests", "requests_cancelled", "prompt_tokens", "prompt_tokens_cached", "pieces"),
            0.0,
        )

    async def generate(
        self,
        prompt: str,
        params: GenerationParams = GenerationParams(),
        *,
        prompt_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream SGLang's completion of ``prompt`` as text deltas.

        ``prompt_key`` is not needed: the radix cache finds shared prefixes itself.
        Raises :class:`SGLangError` under a non-asyncio event loop, or chained to what
        SGLang raised.
        """
        _require_asyncio()
        sampling: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        rid = f"alto-{uuid.uuid4().hex}"
        self._stats["requests"] += 1
        finished = False
        chunks: Any = None
        try:
            chunks = await self._engine.async_generate(prompt, sampling, stream=True, rid=rid)
            sent = 0
            meta: dict[str, Any] = {}
            async for chunk in chunks:
                text = chunk["text"]
                if self._incremental:
                    piece = text
                else:
                    piece, sent = text[sent:], len(text)
                meta = chunk.get("meta_info") or {}
                if piece:
                    self._stats["pieces"] += 1
                    yield piece
            finished = True
            self._stats["prompt_tokens"] += meta.get("prompt_tokens", 0)
            self._stats["prompt_tokens_cached"] += meta.get("cached_tokens", 0)
        except Exception as exc:
            raise SGLangError(f"SGLang request {rid} failed: {exc!r}") from exc
        finally:
            if not finished:
                self._stats["requests_cancelled"] += 1
                # A no-op for a request that SGLang has already forgotten.
                self._engine.tokenizer_manager.abort_request(rid=rid)
            if chunks is not None:
                with anyio.CancelScope(shield=True):
                    await chunks.aclose()

    def statistics(self) -> dict[str, float]:
        """Counters: requests (sent, cancelled), prompt tokens (all, served from the radix
        cache, summed from SGLang's ``meta_info`` of finished requests), pieces streamed."""
        return dict(self._stats)

    async def aclose(self) -> None:
        """Shut SGLang's scheduler and detokenizer processes down."""
        self._engine.shutdown()
