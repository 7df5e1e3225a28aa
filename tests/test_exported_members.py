"""The public surface, pinned (as httpx's tests/test_exported_members.py does).

Adding or removing a public name is a decision: it changes this file in the same commit.
"""

from __future__ import annotations

import importlib.metadata
import types

import pytest

import alto
import alto.dataplane
import alto.testing

EXPECTED = {
    alto: {
        "AltoError",
        "AuthenticationError",
        "Child",
        "Client",
        "ConfigError",
        "Context",
        "DeploymentConfig",
        "LocalProtocolError",
        "OverloadedError",
        "PipelineConfig",
        "PluginError",
        "ProtocolError",
        "RemoteProtocolError",
        "RequestFailed",
        "Result",
        "RuntimeUnavailable",
        "ServeInfo",
        "StageConfig",
        "StageError",
        "UnknownPluginError",
        "current_context",
        "load_deployment",
        "load_pipeline",
        "open_client",
        "prefix_key",
        "serve",
        "write",
    },
    alto.dataplane: {
        "NEED_DATA",
        "Frame",
        "FrameDecoder",
        "FrameFlags",
        "FrameKind",
        "HistogramSnapshot",
        "InstanceState",
        "InstanceStatistics",
        "NoInstanceError",
        "RequestEvent",
        "RequestOutcome",
        "Runtime",
        "RuntimeStatistics",
        "ScaleConflict",
        "ScaleEvent",
        "Scheduler",
        "StageStatistics",
        "available_schedulers",
        "encode",
        "load_scheduler",
    },
    alto.testing: {"FakePeer", "InProcessPipeline", "open_pipeline", "open_server", "walk_frames"},
}


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_all(module: types.ModuleType) -> None:
    assert set(module.__all__) == EXPECTED[module]
    assert len(module.__all__) == len(set(module.__all__))  # no name listed twice


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_each_name_exists_and_is_public(module: types.ModuleType) -> None:
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj is not None
        if isinstance(obj, type | types.FunctionType):
            # implemented in an underscored module, or here, but never a private name
            assert not obj.__name__.startswith("_"), name


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from alto import *", ns)
    assert set(ns) - {"__builtins__"} == EXPECTED[alto]


def test_errors_share_one_base() -> None:
    errors = [
        getattr(alto, n)
        for n in EXPECTED[alto]
        if n.endswith("Error") or n in ("RequestFailed", "RuntimeUnavailable")
    ]
    assert errors and all(issubclass(e, alto.AltoError) for e in errors)


def test_version_matches_the_installed_metadata() -> None:
    assert alto.__version__ == importlib.metadata.version("alto")
