"""vLLM in-process as an alto engine (``engine = "vllm"``).

vLLM's ``AsyncLLM`` (exported as ``vllm.AsyncLLMEngine`` since the V1 engine) batches
every request of the process continuously on the GPU and caches prompt prefixes
(automatic prefix caching, on by default here), so one stage instance per GPU serves
many concurrent calls of :meth:`VLLMEngine.generate`.

vLLM is an asyncio library: its output handler is an ``asyncio.Task``. A stage that uses
this engine must run with ``backend = "asyncio"`` in the pipeline file; under trio,
:meth:`VLLMEngine.generate` raises :class:`VLLMError` at once instead of hanging.

Streaming: ``AsyncLLM.generate(prompt, sampling_params, request_id)`` yields
``RequestOutput`` objects whose ``outputs[0].text`` is cumulative (the default
``RequestOutputKind.CUMULATIVE``); we yield what each adds. Closing our iterator early
closes vLLM's generator, and vLLM aborts the request itself on ``GeneratorExit`` /
``CancelledError``; we also call ``abort(request_id)`` (a no-op for a finished or unknown
request) so that the KV blocks are freed whatever path we left by.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio

from alto import AltoError
from alto.engines import Engine, GenerationParams

__all__ = ["VLLMEngine", "VLLMError"]


class VLLMError(AltoError):
    """vLLM failed, or was used outside asyncio."""


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise VLLMError(
            'vLLM runs only under asyncio: set backend = "asyncio" for this stage'
        ) from None


class VLLMEngine(Engine):
    """A vLLM engine in this process.

    ``model``: a Hugging Face model id or a local path. ``enable_prefix_caching``: reuse
    the KV cache of shared prompt prefixes (what prompt-sticky routing is for). Other
    keyword options go to ``vllm.AsyncEngineArgs`` unchanged (``gpu_memory_utilization``,
    ``max_model_len``, ``tensor_parallel_size``, ``dtype`` ...); an unknown one raises
    ``TypeError``, which :func:`alto.engines.load_engine` reports as a ``PluginError``.
    """

    name = "vllm"

    def __init__(self, model: str, *, enable_prefix_caching: bool = True, **engine_args: Any):
        # Imported here so that listing or loading other engines never imports vLLM
        # (and CUDA).
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

        self._sampling_params = SamplingParams
        args = AsyncEngineArgs(
            model=model, enable_prefix_caching=enable_prefix_caching, **engine_args
        )
        self.model = model
        self._engine = AsyncLLMEngine.from_engine_args(args)
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
        """Stream vLLM's completion of ``prompt`` as text deltas.

        ``prompt_key`` is not needed: vLLM finds shared prefixes by block hashes.
        Raises :class:`VLLMError` under a non-asyncio event loop, or chained to what vLLM
        raised (``EngineGenerateError``, ``EngineDeadError``, a validation error).
        """
        _require_asyncio()
        sampling = self._sampling_params(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        request_id = f"alto-{uuid.uuid4().hex}"
        self._stats["requests"] += 1
        outputs = self._engine.generate(prompt, sampling, request_id)
        sent = 0
        first = True
        finished = False
        try:
            async for output in outputs:
                if first:
                    first = False
                    self._stats["prompt_tokens"] += len(output.prompt_token_ids or ())
                    self._stats["prompt_tokens_cached"] += output.num_cached_tokens or 0
                text = output.outputs[0].text
                # Cumulative text only grows (vLLM holds back a possible stop string
                # rather than retract it), so the new part is what lies past ``sent``.
                piece, sent = text[sent:], len(text)
                if piece:
                    self._stats["pieces"] += 1
                    yield piece
                finished = output.finished
            finished = True
        except Exception as exc:
            raise VLLMError(f"vLLM request {request_id} failed: {exc!r}") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
                if not finished:
                    self._stats["requests_cancelled"] += 1
                    await self._engine.abort(request_id)

    def statistics(self) -> dict[str, float]:
        """Counters: requests (sent, cancelled), prompt tokens (all, served from vLLM's
        prefix cache), pieces streamed."""
        return dict(self._stats)

    async def aclose(self) -> None:
        """Shut vLLM's engine core (its GPU worker processes) down."""
        self._engine.shutdown()
