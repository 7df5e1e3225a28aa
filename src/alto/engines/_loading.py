"""Engines are plugins: entry points in the group ``alto.engines``.

The built-in engines (``llamacpp``, ``openai``, ``emulated``) register through the same
group as third-party ones (``plugins/alto-vllm`` registers ``vllm``), as llm and pluggy do,
so a pipeline file names an engine and its options and never a Python path::

    engine = load_engine("emulated", profile="claims", seed=1)

Errors (all :class:`alto.PluginError`, which names the group and the plugin):

- :class:`alto.UnknownPluginError`: no entry point of that name; it lists the available
  ones.
- :class:`alto.PluginError` chained to the ``ImportError`` (or whatever the import raised)
  when the plugin's module cannot be imported, e.g. an optional dependency is missing.
- :class:`alto.PluginError` chained to the ``TypeError`` or ``ValueError`` when the engine
  rejects its options (an unknown or missing keyword, a value out of range); the message
  names the options given and repeats the engine's complaint.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from .._errors import PluginError, UnknownPluginError
from ._base import Engine

ENTRY_POINT_GROUP = "alto.engines"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    # Looked up on each call (not cached) so that tests can monkeypatch
    # ``importlib.metadata.entry_points`` and a freshly installed plugin is seen.
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # Two distributions registering one name: the first one wins, as with
        # importlib.metadata's own de-duplication of distributions on sys.path.
        found.setdefault(ep.name, ep)
    return found


def available_engines() -> list[str]:
    """The names registered in the ``alto.engines`` entry point group, sorted."""
    return sorted(_entry_points())


def load_engine(name: str, **options: Any) -> Engine:
    """Build the engine registered as ``name`` with keyword ``options``.

    Raises :class:`alto.UnknownPluginError` (the name is not registered; the error lists
    what is) or :class:`alto.PluginError` (the plugin failed to import, is not an
    :class:`Engine`, or rejected the options with ``TypeError`` or ``ValueError``). The
    :class:`alto.AltoError` an engine's constructor raises on purpose (for example when a
    model file cannot be loaded) passes through.
    """
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        raise UnknownPluginError(ENTRY_POINT_GROUP, name, list(eps))
    try:
        factory = ep.load()
    except Exception as exc:
        raise PluginError(
            ENTRY_POINT_GROUP, name, f"cannot import {ep.value!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise PluginError(ENTRY_POINT_GROUP, name, f"{ep.value!r} is not callable")
    try:
        engine = factory(**options)
    except (TypeError, ValueError) as exc:
        # TypeError: an unknown or missing keyword; ValueError: an option's value is out
        # of range (our engines raise it for that, naming the allowed values).
        given = ", ".join(sorted(options)) or "(none)"
        raise PluginError(ENTRY_POINT_GROUP, name, f"bad options (given: {given}): {exc}") from exc
    if not isinstance(engine, Engine):
        raise PluginError(
            ENTRY_POINT_GROUP,
            name,
            f"{ep.value!r} returned {type(engine).__name__}, not an alto.engines.Engine",
        )
    return engine
