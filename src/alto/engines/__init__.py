"""LM engines: llama.cpp in-process, OpenAI-compatible servers, and an emulated engine."""

from ._base import Engine, GenerationParams

__all__ = ["Engine", "GenerationParams"]
