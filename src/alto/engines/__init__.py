"""LM engines: llama.cpp in-process, OpenAI-compatible servers, and an emulated engine."""

from ._base import Engine, GenerationParams
from ._emulated import EmulatedEngine, EmulationProfile
from ._llamacpp import LlamaCppEngine, LlamaCppError
from ._loading import ENTRY_POINT_GROUP, available_engines, load_engine
from ._openai import (
    OpenAIConnectionError,
    OpenAIEngine,
    OpenAIEngineError,
    OpenAIStatusError,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EmulatedEngine",
    "EmulationProfile",
    "Engine",
    "GenerationParams",
    "LlamaCppEngine",
    "LlamaCppError",
    "OpenAIConnectionError",
    "OpenAIEngine",
    "OpenAIEngineError",
    "OpenAIStatusError",
    "available_engines",
    "load_engine",
]
