"""Strict configuration: every mistake is a ConfigError naming file, key and what is allowed.

Each test writes a small pipeline (and deployment) file in ``tmp_path``, breaks one thing,
and checks the error's ``path``, ``key`` and message, as a user would read them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alto import ConfigError, load_deployment, load_pipeline
from alto._config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]

# A three-stage pipeline: fan-out, stateless, stateful; the base every test breaks.
BASE = """\
[pipeline]
name = "p"
input = "numbers"
outputs = ["totals"]

[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.squares]
type = "alto.examples.demo_pb2:Square"
[queues.totals]
type = "alto.examples.demo_pb2:Total"

[stages.gen]
entry = "alto.examples.demo:Generate"
inputs = ["numbers"]
outputs = ["items"]
fanout = true

[stages.sq]
entry = "alto.examples.demo:square"
inputs = ["items"]
outputs = ["squares"]

[stages.total]
entry = "alto.aggregate:Sum"
inputs = ["squares"]
outputs = ["totals"]
stateful = true
aggregate_level = 1
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def pipeline_error(tmp_path: Path, text: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    err = info.value
    assert err.path == str(p)
    assert str(err).startswith(str(p))  # the file is named in the message itself
    return err


def deployment_error(tmp_path: Path, text: str) -> ConfigError:
    pipeline = load_pipeline(write(tmp_path, BASE))
    d = write(tmp_path, text, "deploy.toml")
    with pytest.raises(ConfigError) as info:
        load_deployment(d, pipeline)
    err = info.value
    assert err.path == str(d)
    return err


def replace(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def test_base_is_valid(tmp_path: Path) -> None:
    cfg = load_pipeline(write(tmp_path, BASE))
    assert list(cfg.stages) == ["gen", "sq", "total"]


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("colour = 1\n" + BASE, "colour", "pipeline, queues, stages"),
        (
            replace('name = "p"', 'name = "p"\nversion = 2'),
            "pipeline.version",
            "name, input, outputs",
        ),
        (replace('Item"', 'Item"\nsize = 3'), "queues.items.size", "allowed: type"),
        (
            replace("fanout = true", "fanout = true\nfan_out = true"),
            "stages.gen.fan_out",
            "entry, inputs, outputs, fanout",
        ),
    ],
    ids=["top", "pipeline", "queue", "stage"],
)
def test_unknown_key(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    err = pipeline_error(tmp_path, text)
    assert err.key == key
    assert "unknown key" in err.message and allowed in err.message


def test_unknown_key_in_deployment_runtime(tmp_path: Path) -> None:
    err = deployment_error(tmp_path, "[runtime]\ncredit = 3\n")
    assert err.key == "runtime.credit"
    assert (
        "allowed: credits, max_inflight_requests, backlog_limit, max_frame_size, stop_timeout"
        in err.message
    )


def test_unknown_key_in_deployment_stage(tmp_path: Path) -> None:
    err = deployment_error(tmp_path, "[stages.sq]\ninstance = 3\n")
    assert err.key == "stages.sq.instance"
    assert "allowed: instances, credits" in err.message


def test_unknown_top_key_in_deployment(tmp_path: Path) -> None:
    err = deployment_error(tmp_path, "[runtimes]\n")
    assert err.key == "runtimes" and "allowed: runtime, stages" in err.message


# ---------------------------------------------------------------- missing and wrong types


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('name = "p"\n', "", "pipeline.name"),
        ('input = "numbers"\n', "", "pipeline.input"),
        ('entry = "alto.examples.demo:square"\n', "", "stages.sq.entry"),
        ('inputs = ["items"]\n', "", "stages.sq.inputs"),
        ('type = "alto.examples.demo_pb2:Item"\n', "", "queues.items.type"),
    ],
)
def test_missing_required_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    err = pipeline_error(tmp_path, replace(old, new))
    assert err.key == key and "missing" in err.message


def test_missing_tables(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, BASE.split("[queues.numbers]")[0])
    assert err.key == "queues" and "missing" in err.message
    err = pipeline_error(tmp_path, BASE.split("[stages.gen]")[0])
    assert err.key == "stages" and "missing" in err.message


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        (
            "aggregate_level = 1",
            "aggregate_level = true",
            "stages.total.aggregate_level",
            "expected int, got True",
        ),
        ("fanout = true", "fanout = 1", "stages.gen.fanout", "expected bool, got 1"),
        (
            'inputs = ["items"]',
            'inputs = "items"',
            "stages.sq.inputs",
            "expected a list of strings, got 'items'",
        ),
        (
            'inputs = ["items"]',
            "inputs = [1]",
            "stages.sq.inputs",
            "expected a list of strings, got [1]",
        ),
        (
            'outputs = ["totals"]\n\n',
            'outputs = "totals"\n\n',
            "pipeline.outputs",
            "expected a list of strings",
        ),
        ('name = "p"', "name = 3", "pipeline.name", "expected str, got 3"),
        (
            "fanout = true",
            "fanout = true\nconcurrency = 2.5",
            "stages.gen.concurrency",
            "expected int, got 2.5",
        ),
        (
            "fanout = true",
            "fanout = true\noptions = 3",
            "stages.gen.options",
            "expected a table, got 3",
        ),
    ],
)
def test_wrong_type(tmp_path: Path, old: str, new: str, key: str, expected: str) -> None:
    err = pipeline_error(tmp_path, replace(old, new))
    assert err.key == key
    assert expected in err.message


def test_a_table_where_a_value_belongs(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, BASE.replace("[stages.sq]\n", "[stages.sq.x]\n[stages.sq]\n"))
    assert err.key == "stages.sq.x" and "unknown key" in err.message
    text = replace('[queues.items]\ntype = "alto.examples.demo_pb2:Item"\n', "")
    err = pipeline_error(tmp_path, "[queues]\nitems = 3\n" + text)
    assert err.key == "queues.items" and "expected a table" in err.message


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[stages.sq]\ninstances = true\n", "stages.sq.instances", "expected int, got True"),
        ("[stages.sq]\ninstances = -1\n", "stages.sq.instances", "must be >= 1, got -1"),
        ("[stages.sq]\ninstances = 0\n", "stages.sq.instances", "must be >= 1, got 0"),
        ("[stages.sq]\ncredits = 0\n", "stages.sq.credits", "must be >= 1, got 0"),
        ("[runtime]\ncredits = '3'\n", "runtime.credits", "expected int, got '3'"),
        ("[runtime]\nmax_frame_size = 100\n", "runtime.max_frame_size", "must be >= 1024, got 100"),
        (
            "[runtime]\nstop_timeout = false\n",
            "runtime.stop_timeout",
            "expected int or float, got False",
        ),
        ("stages = 3\n", "stages", "expected a table"),
    ],
)
def test_wrong_value_in_deployment(tmp_path: Path, text: str, key: str, expected: str) -> None:
    err = deployment_error(tmp_path, text)
    assert err.key == key and expected in err.message


def test_deployment_values(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path, BASE))
    d = load_deployment(
        write(
            tmp_path,
            "[runtime]\ncredits = 8\nstop_timeout = 1\n[stages.sq]\ninstances = 3\ncredits = 2\n",
            "d.toml",
        ),
        pipeline,
    )
    assert (d.instances("sq"), d.credits("sq")) == (3, 2)
    assert (d.instances("gen"), d.credits("gen")) == (1, 8)  # defaults for unnamed stages
    assert d.runtime.stop_timeout == 1.0 and isinstance(d.runtime.stop_timeout, float)
    default = load_deployment(None, pipeline)
    assert default.instances("total") == 1 and default.credits("total") == default.runtime.credits


# ---------------------------------------------------------------- the graph


def test_unknown_queue_in_inputs_lists_the_declared_queues(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace('inputs = ["items"]', 'inputs = ["itmes"]'))
    assert err.key == "stages.sq.inputs"
    assert "unknown queue 'itmes'" in err.message
    assert "declared queues: numbers, items, squares, totals" in err.message


def test_unknown_queue_in_outputs(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path, replace('outputs = ["squares"]', 'outputs = ["squares", "cubes"]')
    )
    assert err.key == "stages.sq.outputs"
    assert "unknown queue 'cubes'; declared queues: numbers, items, squares, totals" in err.message


def test_unknown_queue_in_pipeline_input_and_outputs(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace('input = "numbers"', 'input = "nums"'))
    assert err.key == "pipeline.input" and "declared queues" in err.message
    err = pipeline_error(tmp_path, replace('outputs = ["totals"]', 'outputs = ["total"]'))
    assert err.key == "pipeline.outputs" and "unknown queue 'total'" in err.message


def test_a_queue_read_by_two_stages(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace('inputs = ["squares"]', 'inputs = ["items"]'))
    assert err.key == "stages.total.inputs"
    assert "already read by stage 'sq'" in err.message


def test_a_cycle(tmp_path: Path) -> None:
    text = replace('inputs = ["items"]', 'inputs = ["items", "loop"]')
    text = text.replace('outputs = ["squares"]', 'outputs = ["squares", "back"]')
    text = text.replace('inputs = ["numbers"]', 'inputs = ["numbers", "back"]')
    text = text.replace('outputs = ["items"]', 'outputs = ["items", "loop"]')
    for q in ("back", "loop"):
        text += f'[queues.{q}]\ntype = "alto.examples.demo_pb2:Item"\n'
    err = pipeline_error(tmp_path, text)
    assert err.key == "stages"
    assert "gen, sq" in err.message and "cycle" in err.message


def test_a_sink_cannot_be_read(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path, replace('outputs = ["totals"]\n\n', 'outputs = ["totals", "squares"]\n\n')
    )
    assert err.key == "stages.total.inputs" and "pipeline output" in err.message


def test_queue_nobody_reads_or_writes(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, BASE + '[queues.spare]\ntype = "alto.examples.demo_pb2:Item"\n')
    assert err.key == "queues.spare" and "no stage writes" in err.message


@pytest.mark.parametrize("level", [2, 3])
def test_aggregation_level_no_fan_out_produces(tmp_path: Path, level: int) -> None:
    # squares carry [request, item]: depth 2, so levels 1..2 exist
    err = pipeline_error(tmp_path, replace("aggregate_level = 1", f"aggregate_level = {level + 1}"))
    assert err.key == "stages.total.aggregate_level"
    assert "allowed: 1..2" in err.message and f"level {level + 1}" in err.message


def test_aggregation_level_at_the_deepest_fan_out_is_fine(tmp_path: Path) -> None:
    cfg = load_pipeline(write(tmp_path, replace("aggregate_level = 1", "aggregate_level = 2")))
    assert cfg.stages["total"].aggregate_level == 2


def test_aggregation_level_zero(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace("aggregate_level = 1", "aggregate_level = 0"))
    assert err.key == "stages.total.aggregate_level" and "must be >= 1, got 0" in err.message


def test_stateful_without_level(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace("aggregate_level = 1\n", ""))
    assert err.key == "stages.total.aggregate_level"
    assert "stateful stage needs its aggregation level" in err.message


def test_level_without_stateful(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace("stateful = true\n", ""))
    assert err.key == "stages.total.aggregate_level"
    assert "stateful = true" in err.message


def test_unknown_backend(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, replace("fanout = true", 'fanout = true\nbackend = "curio"'))
    assert err.key == "stages.gen.backend"
    assert "'curio'" in err.message and "allowed: trio, asyncio" in err.message


def test_bad_references(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        replace('entry = "alto.examples.demo:square"', 'entry = "alto.examples.demo.square"'),
    )
    assert err.key == "stages.sq.entry" and "module:callable" in err.message
    err = pipeline_error(tmp_path, replace('type = "alto.examples.demo_pb2:Item"', 'type = "Item"'))
    assert err.key == "queues.items.type" and "module:MessageClass" in err.message


def test_deployment_naming_an_unknown_stage(tmp_path: Path) -> None:
    err = deployment_error(tmp_path, "[stages.square]\ninstances = 2\n")
    assert err.key == "stages.square"
    assert "stages: gen, sq, total" in err.message


# ---------------------------------------------------------------- unreadable files


def test_bad_toml(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, BASE + "[stages.sq\n")
    assert err.key is None and "not valid TOML" in err.message
    assert isinstance(err.__cause__, Exception)  # the tomllib error is chained


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    assert (info.value.path, info.value.key) == (str(p), None)
    assert "file not found" in str(info.value)
    cfg = load_pipeline(write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="file not found"):
        load_deployment(tmp_path / "nope.deploy.toml", cfg)


# ---------------------------------------------------------------- the shipped demo


@pytest.fixture
def demo() -> PipelineConfig:
    return load_pipeline(ROOT / "configs" / "demo.toml")


def test_demo_pipeline(demo: PipelineConfig) -> None:
    assert demo.name == "demo" and demo.input == "numbers"
    assert demo.outputs == ("partials", "totals")
    assert list(demo.stages) == ["generate", "square", "total"]  # topological order
    depths = {s.name: s.input_depth for s in demo.stages.values()}
    assert depths == {"generate": 1, "square": 2, "total": 2}
    total = demo.stages["total"]
    assert total.stateful and total.aggregate_level == 1 and total.scheduler == "consistent-hash"
    assert demo.stages["generate"].fanout and dict(demo.stages["generate"].options) == {
        "delay": 0.05
    }
    assert (
        demo.stages["square"].scheduler == "least-outstanding"
        and not demo.stages["square"].stateful
    )
    assert demo.consumer == {"numbers": "generate", "items": "square", "squares": "total"}
    assert demo.producers == {
        "items": ("generate",),
        "squares": ("square",),
        "partials": ("square",),
        "totals": ("total",),
    }


def test_demo_upstream_and_edges(demo: PipelineConfig) -> None:
    assert demo.upstream("generate") == frozenset()
    assert demo.upstream("square") == {"generate"}
    assert demo.upstream("total") == {"generate", "square"}
    assert set(demo.edges()) == {
        ("ingress", "numbers", "generate"),
        ("generate", "items", "square"),
        ("square", "squares", "total"),
        ("square", "partials", "sink"),
        ("total", "totals", "sink"),
    }
    assert len(demo.edges()) == 5


def test_demo_deployment(demo: PipelineConfig) -> None:
    d = load_deployment(ROOT / "configs" / "demo.deploy.toml", demo)
    assert {s: d.instances(s) for s in demo.stages} == {"generate": 1, "square": 3, "total": 2}
    assert d.runtime.credits == 64 and d.runtime.max_inflight_requests == 1024
    assert d.credits("square") == 64


def test_fan_out_depths_add_up(tmp_path: Path) -> None:
    # a second fan-out deepens every path below it by one
    text = replace("[stages.sq]\n", "[stages.sq]\nfanout = true\n").replace(
        "aggregate_level = 1", "aggregate_level = 3"
    )
    cfg = load_pipeline(write(tmp_path, text))
    assert {s.name: s.input_depth for s in cfg.stages.values()} == {"gen": 1, "sq": 2, "total": 3}


def test_a_stateful_stage_cannot_be_idempotent(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path, replace("aggregate_level = 1", "aggregate_level = 1\nidempotent = true")
    )
    assert err.key == "stages.total.idempotent"
    assert "group state" in err.message


def test_a_fan_out_stage_fed_by_two_producers(tmp_path: Path) -> None:
    # 'total' as a fan-out stage: it counts child ids per input key path, so its input
    # must come from one producer (two could write items with one key path).
    fan_total = replace("stateful = true\naggregate_level = 1\n", "fanout = true\n")
    cfg = load_pipeline(write(tmp_path, fan_total))  # fed by sq alone: fine
    assert cfg.stages["total"].fanout
    # sq2 writes 'squares' too
    text = fan_total.replace(
        'outputs = ["items"]\nfanout = true', 'outputs = ["items", "evens"]\nfanout = true'
    ).replace(
        "[queues.squares]", '[queues.evens]\ntype = "alto.examples.demo_pb2:Item"\n[queues.squares]'
    )
    text += '\n[stages.sq2]\nentry = "alto.examples.demo:square"\ninputs = ["evens"]\noutputs = ["squares"]\n'
    err = pipeline_error(tmp_path, text)
    assert err.key == "stages.total.inputs"
    assert "a fan-out stage reads one queue written by one stage" in err.message
    assert "sq via squares" in err.message and "sq2 via squares" in err.message
