"""The ``alto`` command line as a user's shell runs it: real subprocesses.

``--version``; ``alto validate`` (both files and their imports, no serving); ``--json`` on
``alto status`` and ``alto top``; and output piped into a reader that goes away
(``alto status | head``), which must end quietly with the status a shell reports for a
command ended by SIGPIPE (141), not a BrokenPipeError traceback. The control plane the
commands talk to is the real HTTP server (``serve_control``) in front of the in-memory
FakeRuntime, served by this test's trio loop on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from control_fake import FacToolFakeRuntime, FakeRuntime

import alto
from alto.control import serve_control

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]  # the console script of this environment
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`'s `yes`


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ALTO, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("alto: error: ")
    return lines[0]


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"alto {alto.__version__}\n"


# -- validate --------------------------------------------------------------------------


def test_validate_the_shipped_pipelines() -> None:
    demo = run("validate", "configs/demo.toml", "--deploy", "configs/demo.deploy.toml")
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout == (
        "ok: pipeline 'demo': 3 stages, 5 queues; instances: generate 1, square 3, total 2 "
        "(configs/demo.toml, configs/demo.deploy.toml)\n"
    )
    default = run("validate", str(ROOT / "configs" / "demo.toml"))  # no deployment file
    assert default.returncode == 0, default.stderr
    assert "instances: generate 1, square 1, total 1" in default.stdout
    assert "<defaults>" in default.stdout


def _demo(tmp_path: Path, old: str = "", new: str = "") -> Path:
    text = (ROOT / "configs" / "demo.toml").read_text()
    assert old in text
    path = tmp_path / "pipeline.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'entry = "alto.examples.demo:square"',
            'entry = "alto.examples.demo:cube"',
            "stages.square.entry: cannot import stage entry 'alto.examples.demo:cube'",
        ),
        (
            'type = "alto.examples.demo_pb2:Number"',
            'type = "alto.examples.demo_pb2:Numbr"',
            "queues.numbers.type",
        ),
        (
            'entry = "alto.examples.demo:square"',
            'entry = "boom_entry:Boom"',
            "building the stages' entries failed: RuntimeError: no model here",
        ),
        ("fanout = true", "fanout = 3", "stages.generate.fanout"),
    ],
    ids=["entry", "message-type", "entry-constructor-raises", "wrong-type"],
)
def test_validate_errors_are_one_line(tmp_path: Path, old: str, new: str, expected: str) -> None:
    # A stage class whose constructor fails in a way check_imports does not translate.
    (tmp_path / "boom_entry.py").write_text(
        "class Boom:\n"
        "    def __init__(self, **options):\n"
        "        raise RuntimeError('no model here')\n"
        "    async def process(self, msg, ctx):\n"
        "        pass\n"
    )
    pipeline = _demo(tmp_path, old, new)
    line = one_error_line(run("validate", str(pipeline), env={"PYTHONPATH": str(tmp_path)}))
    assert str(pipeline) in line and expected in line, line


@pytest.mark.parametrize(
    ("deploy", "expected"),
    [
        ("[stages.nope]\ninstances = 2\n", "stages.nope: no such stage"),
        ("[stages.square]\ninstances = 5000\n", "stages.square.instances"),
        ("[runtime]\ncredits = 0\n", "runtime.credits"),
    ],
    ids=["unknown-stage", "too-many-instances", "zero-credits"],
)
def test_validate_deployment_errors(tmp_path: Path, deploy: str, expected: str) -> None:
    path = tmp_path / "deploy.toml"
    path.write_text(deploy)
    line = one_error_line(run("validate", "configs/demo.toml", "--deploy", str(path)))
    assert f"{path}: {expected}" in line, line


def test_validate_a_missing_file() -> None:
    line = one_error_line(run("validate", "no/such/pipeline.toml"))
    assert "no/such/pipeline.toml" in line


@pytest.mark.parametrize(
    "args",
    [
        ["top", "--iterations", "0"],
        ["scale", "square", "0"],
        ["scale", "square", "100000"],
        ["submit", "demo", "--concurrency", "100000"],
        ["submit", "demo", "--squad", "-1"],
        ["--log-level", "LOUD", "status"],
    ],
)
def test_numbers_and_levels_out_of_range_are_refused(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "expected an integer in" in result.stderr or "must be one of DEBUG" in result.stderr


# -- --json and broken pipes against a control plane -----------------------------------


async def _serve(nursery: trio.Nursery) -> str:
    port: int = await nursery.start(
        partial(serve_control, FakeRuntime(), "127.0.0.1", 0, stream_interval=0.05)
    )
    return f"http://127.0.0.1:{port}"


async def _alto(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [*ALTO, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return result


async def test_status_json(nursery: trio.Nursery) -> None:
    url = await _serve(nursery)
    result = await _alto("status", "--json", "--url", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1  # one JSON object, on one line
    data = json.loads(lines[0])
    assert data["pipeline"] == "wordcount"
    assert [s["name"] for s in data["stages"]] == ["split", "score", "sum"]
    assert {i["id"]: i["state"] for i in data["instances"]} == {
        1: "ready",
        2: "ready",
        3: "ready",
        4: "ready",
    }
    assert data["requests"]["completed"] == 0


async def test_top_json_prints_one_object_per_update(nursery: trio.Nursery) -> None:
    url = await _serve(nursery)
    result = await _alto("top", "--json", "--iterations", "3", "--url", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]
    assert [e["pipeline"] for e in events] == ["wordcount"] * 3
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert {i["id"] for i in events[0]["instances"]} == {1, 2, 3, 4}
    assert "\x1b[" not in result.stdout.decode()  # no screen clearing in JSON


async def _to_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``alto`` with stdout a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with trio.fail_after(60):
            result: subprocess.CompletedProcess[bytes] = await trio.run_process(
                [*ALTO, *args], stdout=write_end, capture_stderr=True, check=False
            )
    finally:
        os.close(write_end)
    return result


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
async def test_status_into_a_closed_pipe_ends_quietly(
    nursery: trio.Nursery, json_flag: list[str]
) -> None:
    url = await _serve(nursery)
    result = await _to_closed_pipe("status", *json_flag, "--url", url)
    assert result.stderr == b""
    assert result.returncode == SIGPIPE_STATUS


async def test_top_piped_into_head_ends_quietly(nursery: trio.Nursery) -> None:
    url = await _serve(nursery)
    # `alto top | head -n 2`: head leaves after two lines, top's next write meets the
    # closed pipe. The bound on iterations only keeps a broken build from running forever.
    process = await trio.lowlevel.open_process(
        [*ALTO, "top", "--json", "--iterations", "100000", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    with trio.fail_after(60):
        received = b""
        while received.count(b"\n") < 2:
            chunk = await process.stdout.receive_some()
            assert chunk, "alto top ended early"
            received += chunk
        await process.stdout.aclose()
        stderr = b""
        while chunk := await process.stderr.receive_some():
            stderr += chunk
        returncode = await process.wait()
    assert stderr == b""
    assert returncode == SIGPIPE_STATUS
    assert json.loads(received.splitlines()[0])["pipeline"] == "wordcount"


async def test_status_into_head_in_a_shell(nursery: trio.Nursery) -> None:
    # 2000 instances: about 200 KB of table, more than a pipe holds, so `alto status` is
    # still writing when head leaves.
    port: int = await nursery.start(
        partial(serve_control, FacToolFakeRuntime(instances={"bm25": 2000}), "127.0.0.1", 0)
    )
    command = f"{shlex.quote(ALTO[0])} status --url http://127.0.0.1:{port} | head -6"
    with trio.fail_after(60):
        result = await trio.run_process(
            ["sh", "-c", command], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0
    assert result.stderr == b""
    assert len(result.stdout.decode().splitlines()) == 6


def test_a_broken_pipe_inside_a_nursery_ends_quietly() -> None:
    # `alto submit` prints from trio tasks: the BrokenPipeError arrives in an exception
    # group. The command's own function is replaced; the handling is main's.
    script = (
        "import trio, alto._cli as c\n"
        "async def printer():\n"
        "    for i in range(10**6):\n"
        "        print('{\"result\": %d}' % i, flush=True)\n"
        "        await trio.sleep(0)\n"
        "def fn(args):\n"
        "    async def main():\n"
        "        async with trio.open_nursery() as n:\n"
        "            n.start_soon(printer)\n"
        "            n.start_soon(trio.sleep_forever)\n"
        "    trio.run(main)\n"
        "    return 0\n"
        "c._cmd_status = fn\n"
        "c.main(['status'])\n"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-c", script],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode == SIGPIPE_STATUS
