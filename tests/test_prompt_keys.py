"""Prompt keys derived from the prompt itself, and prefix-aware routing on them.

A queue may name a ``prompt`` function (the prompt its LM stage will run for a message);
writes to it then carry ``prefix_key(prompt)``: chained hashes of the prompt's leading
64-byte blocks. ``prompt-affinity`` matches such keys by their longest known prefix, so
prompts of one template reach one engine however their tails differ.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

import alto
from alto._stage import PREFIX_BLOCK, prefix_key
from alto.dataplane import load_scheduler
from alto.examples.demo_pb2 import Item, Number, Square
from alto.testing import open_pipeline

TEMPLATE_A = "You are a careful assistant. " * 12  # 348 bytes: 5 whole blocks
TEMPLATE_B = "Answer in one word, please. " * 12


def test_prompts_sharing_blocks_share_the_key_prefix() -> None:
    a1 = prefix_key(TEMPLATE_A + "question one " * 10)
    a2 = prefix_key(TEMPLATE_A + "a different question entirely " * 5)
    b = prefix_key(TEMPLATE_B + "question one " * 10)
    assert a1[:1] == b"\x00" and len(a1) == 1 + 8 * 7  # 478 bytes: 7 whole blocks
    shared = len(TEMPLATE_A) // PREFIX_BLOCK  # whole blocks of the template
    assert a1[: 1 + 8 * shared] == a2[: 1 + 8 * shared]
    assert a1 != a2  # the tails differ from the first block they reach
    # Only whole blocks count: a tail within the template's last partial block does not.
    assert prefix_key(TEMPLATE_A + "x") == prefix_key(TEMPLATE_A + "y")
    assert a1[1:9] != b[1:9]
    assert prefix_key("x" * 10_000)[:1] == b"\x00" and len(prefix_key("x" * 10_000)) == 65
    assert prefix_key("short") == prefix_key("short")  # stable across calls and processes
    assert len(prefix_key("")) == 9


def test_prompt_affinity_routes_a_template_to_one_home() -> None:
    sched = load_scheduler("prompt-affinity")
    for i in (1, 2, 3):
        sched.add_instance(i)
    loads = {1: 0, 2: 0, 3: 0}
    homes_a = {sched.choose(prefix_key(TEMPLATE_A + f"q{n}" * n), loads) for n in range(20)}
    homes_b = {sched.choose(prefix_key(TEMPLATE_B + f"q{n}" * n), loads) for n in range(20)}
    assert len(homes_a) == 1 and len(homes_b) == 1 and homes_a != homes_b
    # The load bound still holds: a loaded home sends the frame elsewhere.
    (home,) = homes_a
    busy = {i: (50 if i == home else 0) for i in loads}
    assert sched.choose(prefix_key(TEMPLATE_A + "another"), busy) != home


PIPELINE = """\
[pipeline]
name = "prompts"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
prompt = "test_prompt_keys:item_prompt"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.fan]
entry = "test_prompt_keys:Fan"
inputs = ["numbers"]
outputs = ["items"]
fanout = true
[stages.lm]
entry = "test_prompt_keys:fake_lm"
inputs = ["items"]
outputs = ["out"]
scheduler = "prompt-affinity"
"""


def item_prompt(item: Item) -> str:
    """Even items use template A, odd ones template B, each with its own tail."""
    return (TEMPLATE_A if item.value % 2 == 0 else TEMPLATE_B) + f"item {item.value}"


class Fan:
    async def process(self, msg: Number, ctx: alto.Context) -> None:
        for i in range(msg.value):
            await ctx.write("items", Item(value=i))


async def fake_lm(msg: Item, ctx: alto.Context) -> None:
    await trio.sleep(0.01)
    await ctx.write("out", Square(value=msg.value, instance=ctx.instance))


async def test_writes_carry_keys_derived_from_the_queue_prompt(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "prompts.toml"
    path.write_text(PIPELINE)
    async with open_pipeline(path, instances={"lm": 2}) as p:
        results = await p.run(Number(value=12))
    by_template: dict[int, set[int]] = {0: set(), 1: set()}
    for r in results:
        assert isinstance(r.message, Square)
        by_template[r.message.value % 2].add(r.message.instance)
    # Each template stayed on one instance, and the two templates did not share one.
    assert len(by_template[0]) == 1 and len(by_template[1]) == 1
    assert by_template[0] != by_template[1]


def test_a_bad_prompt_function_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE.replace("test_prompt_keys:item_prompt", "nomodule:fn"))
    from alto._config import check_imports

    try:
        check_imports(alto.load_pipeline(path))
    except alto.ConfigError as exc:
        assert "queues.items.prompt" in str(exc) and "nomodule" in str(exc)
    else:  # pragma: no cover - the assertion above is the test
        raise AssertionError("check_imports accepted a prompt function that does not exist")
