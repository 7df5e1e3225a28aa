"""Per-instance options: each instance of a stage gets the options of its slot.

``[stages.NAME] instance_options = [{...}, {...}]`` in the deployment file is merged over
the pipeline's stage ``options`` for the instance in slot 0, 1, ... (tables key by key), so
that, for example, each instance of an LM stage calls its own engine server
(``engine_options.base_url``) and prompt-aware routing reaches distinct prefix caches.
Instances register, set up with their options, and only then say READY.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import alto
from alto.examples.demo_pb2 import Item, Number, Square
from alto.testing import open_pipeline

PIPELINE = """\
[pipeline]
name = "slots"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.fan]
entry = "test_instance_options:Fan"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.lm]
entry = "test_instance_options:Tagged"
inputs = ["items"]
outputs = ["out"]
options = { engine_options = { base_url = "http://default/v1", timeout = 5 }, tag = 0 }
"""

DEPLOY = """\
[stages.lm]
instances = 3
instance_options = [
    { engine_options = { base_url = "http://a/v1" }, tag = 10 },
    { engine_options = { base_url = "http://b/v1" }, tag = 20 },
]
"""

SEEN: dict[int, dict[str, Any]] = {}  # instance id -> the options it was built with


class Fan:
    async def process(self, msg: Number, ctx: alto.Context) -> None:
        for i in range(msg.value):
            await ctx.write("items", Item(value=i))


class Tagged:
    def __init__(self, engine_options: dict[str, Any], tag: int) -> None:
        self.options = {"engine_options": engine_options, "tag": tag}
        self.tag = tag

    async def setup(self) -> None:
        await trio.sleep(0.5)  # a model loading: the instance must not get work before

    async def process(self, msg: Item, ctx: alto.Context) -> None:
        SEEN[ctx.instance] = self.options
        await ctx.write("out", Square(value=self.tag, instance=ctx.instance))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    SEEN.clear()
    (tmp_path / "p.toml").write_text(PIPELINE)
    (tmp_path / "d.toml").write_text(DEPLOY)
    return tmp_path / "p.toml", tmp_path / "d.toml"


async def test_each_slot_gets_its_options(
    files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    pipeline, deploy = files
    async with open_pipeline(pipeline, deployment=deploy) as p:
        await p.run(Number(value=30))
        lm = sorted(
            (i for i in p.runtime.instances.values() if i.stage.name == "lm"), key=lambda i: i.slot
        )
        assert [i.slot for i in lm] == [0, 1, 2]
        by_slot = {i.slot: SEEN.get(i.id) for i in lm}
        # Slot 0 and 1 merged their table over the stage's options; slot 2 has none.
        assert by_slot[0] == {
            "engine_options": {"base_url": "http://a/v1", "timeout": 5},
            "tag": 10,
        }
        assert by_slot[1] == {
            "engine_options": {"base_url": "http://b/v1", "timeout": 5},
            "tag": 20,
        }
        assert by_slot[2] == {
            "engine_options": {"base_url": "http://default/v1", "timeout": 5},
            "tag": 0,
        }
        # A replacement takes over its slot: drain slot 1, scale back up.
        victim = next(i for i in lm if i.slot == 1)
        await p.runtime.drain(victim.id)
        with trio.fail_after(10):
            while not victim.ended:
                await trio.sleep(0.05)
        await p.runtime.scale("lm", 3)
        await p.wait_ready()
        new = [i for i in p.runtime.instances.values() if i.stage.name == "lm" and not i.ended]
        assert sorted(i.slot for i in new) == [0, 1, 2]
        SEEN.clear()
        results = await p.run(Number(value=30))
        tags = {r.message.value for r in results if isinstance(r.message, Square)}
        assert 20 in tags  # the replacement in slot 1 runs with slot 1's options


async def test_no_work_before_setup_is_done(
    files: tuple[Path, Path], autojump_clock: trio.testing.MockClock
) -> None:
    pipeline, deploy = files
    async with open_pipeline(pipeline, deployment=deploy) as p:
        await p.runtime.scale("lm", 3)  # no change
        stats = p.runtime.statistics()
        assert all(i.state == "ready" for i in stats.instances)
        # A new instance is "starting" while it sets up, and gets nothing meanwhile.
        p.runtime.supervisor.max_processes = 8
        p.runtime.topology.stages["lm"].max_instances = 8
        await p.runtime.scale("lm", 4)
        await trio.sleep(0.1)  # inside its 0.5 s set-up
        starting = [i for i in p.runtime.statistics().instances if i.state == "starting"]
        assert len(starting) == 1
        await p.run(Number(value=40))
        assert starting[0].instance_id not in SEEN
        await p.wait_ready()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("instance_options = 3", "a list of tables"),
        ("instance_options = [1]", r"instance_options\[0\]: expected a table"),
        ("max_instances = 1\ninstance_options = [{}, {}]", "at most 1 instances"),
    ],
)
def test_bad_instance_options(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(PIPELINE)
    (tmp_path / "d.toml").write_text(f"[stages.lm]\n{table}\n")
    with pytest.raises(alto.ConfigError, match=message):
        alto.load_deployment(tmp_path / "d.toml", alto.load_pipeline(tmp_path / "p.toml"))
