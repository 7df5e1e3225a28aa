"""The one small interface every LM engine implements.

A prompt (and its prompt key) in, an async stream of text pieces (tokens) out, with
cancellation: closing the iterator early (``aclose()``, or the enclosing task cancelled)
must stop generation and free the engine's slot.

Engines are written against anyio so that a stage process may run them under trio or
under asyncio (vLLM and SGLang are asyncio libraries: their stages run with
``backend = "asyncio"``). The runtime never imports an engine; only stage code does.

Engines are plugins in the entry point group ``alto.engines``; :func:`alto.engines.load_engine`
builds one by name with keyword options from the pipeline file.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 0.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None


class Engine(abc.ABC):
    """An LM engine. Subclasses take their options as keyword arguments."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(
        self,
        prompt: str,
        params: GenerationParams = GenerationParams(),
        *,
        prompt_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream the completion of ``prompt`` piece by piece.

        ``prompt_key`` names the prompt template (the part shared across calls); engines
        with a prefix cache may use it. Raises :class:`alto.StageError` subclasses or the
        engine's own errors chained into :class:`alto.AltoError`.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""

    def statistics(self) -> dict[str, float]:
        """Counters for benchmarks (e.g. prompt tokens reused from the prefix cache)."""
        return {}
