"""Launchers as plugins (``alto.launchers``), their options, the cluster keys of the config
files, and which lost instances the supervisor replaces through a launcher.

Plugin tests are hermetic: the entry points are faked with monkeypatch.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from alto import ConfigError, PluginError, UnknownPluginError, load_pipeline
from alto._config import DeploymentConfig, RuntimeLimits, load_deployment
from alto.dataplane._launcher import (
    LaunchContext,
    LocalLauncher,
    available_launchers,
    check_options,
    load_launcher,
    open_launcher,
)
from alto.dataplane._runtime import Runtime
from alto.testing import FakePeer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"


class RecordingLauncher:
    """A launcher that records what the supervisor asks of it and starts nothing."""

    option_defaults: ClassVar[Mapping[str, Any]] = {"size": 2, "label": "x", "extra": None}
    needs_tcp: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.spawned: list[tuple[str, int]] = []

    @classmethod
    async def create(cls, ctx: LaunchContext, options: Mapping[str, Any]) -> RecordingLauncher:
        return cls(options)

    async def spawn(self, stage: str, instance_id: int) -> None:
        self.spawned.append((stage, instance_id))

    def stop(self, instance_id: int) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **names: str) -> None:
    eps = [
        importlib.metadata.EntryPoint(name, value, "alto.launchers")
        for name, value in names.items()
    ]

    def entry_points(**kw: Any) -> Any:
        if kw.get("group") == "alto.launchers":
            return eps
        return importlib.metadata.EntryPoints([])

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_launchers_load_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(
        monkeypatch,
        local="alto.dataplane._launcher:LocalLauncher",
        rec="test_launchers:RecordingLauncher",
        broken="no_such_module_here:Launcher",
        notone="alto.dataplane._launcher:detect_gpus",
    )
    assert available_launchers() == ["broken", "local", "notone", "rec"]
    assert load_launcher("local") is LocalLauncher
    with pytest.raises(UnknownPluginError, match="available: broken, local, notone, rec"):
        load_launcher("kubernetes")
    with pytest.raises(PluginError, match="cannot import"):
        load_launcher("broken")
    with pytest.raises(PluginError, match="not a launcher class"):
        load_launcher("notone")


def test_the_installed_entry_points() -> None:
    assert {"local", "ray"} <= set(available_launchers())


def test_options_are_checked_strictly() -> None:
    cls: Any = RecordingLauncher
    assert check_options("rec", cls, {"size": 3}, "d.toml") == {
        "size": 3,
        "label": "x",
        "extra": None,
    }
    assert check_options("rec", cls, {"size": 2.5, "extra": [1]}, "d.toml")["extra"] == [1]
    with pytest.raises(
        ConfigError, match=r"d\.toml: launcher\.sise: .*allowed: extra, label, size"
    ):
        check_options("rec", cls, {"sise": 3}, "d.toml")
    with pytest.raises(ConfigError, match=r"launcher\.label: expected str, got 3"):
        check_options("rec", cls, {"label": 3}, "d.toml")
    with pytest.raises(ConfigError, match=r"launcher\.size: expected int or float"):
        check_options("rec", cls, {"size": True}, "d.toml")
    with pytest.raises(
        ConfigError, match="unknown option of launcher 'local'; allowed: \\(none\\)"
    ):
        check_options("local", LocalLauncher, {"address": "x"}, "d.toml")


async def test_open_launcher_builds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, rec="test_launchers:RecordingLauncher")
    pipeline = load_pipeline(DEMO)
    async with trio.open_nursery() as nursery:
        ctx = LaunchContext(
            pipeline,
            DeploymentConfig("d", RuntimeLimits(), {}),
            "t",
            "unix:/nowhere",
            None,
            None,
            nursery,
            lambda iid, rc: None,
        )
        launcher: Any = await open_launcher("rec", ctx, {"label": "y"})
    assert launcher.options == {"size": 2, "label": "y", "extra": None}


def test_deployment_keys_for_clusters(tmp_path: Path) -> None:
    pipeline = load_pipeline(DEMO)
    d = tmp_path / "d.toml"
    d.write_text(
        '[runtime]\nlauncher = "ray"\n'
        '[launcher]\naddress = "10.0.0.1:6379"\n'
        '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
        '[stages.square]\ncpus = 0.5\nresources = { node2 = 1 }\nplacement = "spread"\n'
    )
    dep = load_deployment(d, pipeline)
    assert dep.launcher == "ray"
    assert dep.launcher_options == {"address": "10.0.0.1:6379"}
    assert dep.tls is not None and dep.tls.cert == str(tmp_path / "c.pem")
    assert dep.resources(pipeline.stages["square"]) == {"CPU": 0.5, "node2": 1.0}
    assert dep.resources(pipeline.stages["total"]) == {}
    assert dep.placement("square") == "spread" and dep.placement("total") is None
    bad = {
        '[stages.square]\nplacement = "far"\n': "allowed: pack, spread",
        "[stages.square]\ncpus = 2.5\n": "a whole number above 1",
        "[stages.square]\ncpus = 5000\n": "must be a number in 0..1024",
        "[stages.square]\nresources = { GPU = 1 }\n": "not a custom resource name",
        "[stages.square]\nresources = { x = -1 }\n": r"resources\.x: must be a number",
        '[tls]\ncert = "c.pem"\nca = "x"\n': r"tls\.ca: unknown key; allowed: cert, key",
        '[runtime]\nlauncher = ""\n': "must name a launcher",
        "[launcher]\nx = 1\n[bogus]\n": "bogus: unknown key",
    }
    for text, message in bad.items():
        d.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_deployment(d, pipeline)


def test_pipeline_keys_for_clusters(tmp_path: Path) -> None:
    text = DEMO.read_text().replace(
        'entry = "alto.examples.demo:square"',
        'entry = "alto.examples.demo:square"\ncpus = 2\nresources = { fast = 0.25 }',
    )
    p = tmp_path / "p.toml"
    p.write_text(text)
    pipeline = load_pipeline(p)
    assert pipeline.stages["square"].cpus == 2.0
    assert dict(pipeline.stages["square"].resources) == {"fast": 0.25}
    dep = DeploymentConfig("d", RuntimeLimits(), {})
    assert dep.resources(pipeline.stages["square"]) == {"CPU": 2.0, "fast": 0.25}


async def test_an_unknown_launcher_ends_serve_before_anything_starts(tmp_path: Path) -> None:
    import alto

    with pytest.raises(UnknownPluginError, match=r"available: .*local"):
        await alto.serve(DEMO, launcher="nope", http=None, write_discovery=False)


async def test_self_connected_instances_are_not_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An instance that connected on its own (``alto worker --connect``) is not replaced
    when it is lost: no launcher here can start it. A launched one is."""
    pipeline = load_pipeline(DEMO)
    runtime = Runtime(pipeline, DeploymentConfig("d", RuntimeLimits(), {}), token="t")
    launcher = RecordingLauncher({})
    runtime.launcher = launcher
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.serve, ())
        # a self-connected instance registers (instance id None) and then goes away
        own = await FakePeer.attach(runtime, nursery).instance("t", "square")
        inst = runtime.instances[own.id]
        assert not inst.launched
        own.close()
        with trio.fail_after(5):
            while not inst.ended:
                await trio.sleep(0.01)
        assert inst.state == "crashed"
        await trio.sleep(10.0)  # virtual time: well past any replacement back-off
        assert launcher.spawned == []
        assert runtime.supervisor.restarts == 0
        # a launched instance that crashes is replaced through the launcher
        record = runtime.supervisor.new_instance("square")
        peer = await FakePeer.attach(runtime, nursery).instance("t", "square", record.id)
        peer.close()
        with trio.fail_after(5):
            while not launcher.spawned:
                await trio.sleep(0.01)
        assert launcher.spawned[0][0] == "square"
        assert runtime.supervisor.restarts == 1
        nursery.cancel_scope.cancel()
