"""Start-up mistakes end ``alto serve`` with one line, through the real command line.

Each test runs ``alto serve`` as a subprocess (the console script of this environment) and
reads what it prints: a stage entry that cannot be imported, an unknown engine in an LM
stage's options, an HTTP or TCP port already in use, and an instance that crashes while it
starts. The first four are caught before anything is spawned, so ``alto serve`` prints
exactly one line (no log line, no traceback, no exception group) and exits with code 2.
The last one prints the failing instance's own output (prefixed ``[stage/N]``) and then
one ``alto: error:`` line that names the instance and ends with its last error.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import alto

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]  # the console script of this environment
TIMEOUT = 120  # seconds for a whole `alto serve` that must end by itself


class Boom:
    """A stage whose ``setup()`` fails, as one whose model file is corrupt would."""

    def __init__(self, **options: object) -> None:
        pass

    async def setup(self) -> None:
        raise RuntimeError("the weights file is truncated (a start-up failure on purpose)")

    async def process(self, msg: object, ctx: alto.Context) -> None:
        raise AssertionError("never called")


def demo(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """configs/demo.toml under a unique name, with ``replacements`` applied."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    name = f"startup-{os.getpid()}-{tmp_path.name[-12:]}"
    for old, new in (('name = "demo"', f'name = "{name}"'), *replacements):
        assert old in text, f"configs/demo.toml changed: no {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        ALTO_RUN_DIR=str(tmp_path / "run"),
        PYTHONUNBUFFERED="1",
        # The crashing stage above lives in this module.
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])
        ),
    )
    env.pop("ALTO_TOKEN", None)
    return subprocess.run(
        [*ALTO, "serve", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line ``alto serve`` printed, having failed with exit code 2."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # nothing spawned, nothing logged, no traceback
    assert lines[0].startswith("alto: error: "), lines
    return lines[0]


def test_an_entry_that_cannot_be_imported(tmp_path: Path) -> None:
    pipeline = demo(tmp_path, ('entry = "alto.examples.demo:square"', 'entry = "nomodule:fn"'))
    line = one_line(serve(tmp_path, str(pipeline), "--no-http"))
    assert line == (
        f"alto: error: {pipeline}: stages.square.entry: cannot import stage entry "
        "'nomodule:fn': No module named 'nomodule'"
    )


def test_an_entry_whose_attribute_is_missing(tmp_path: Path) -> None:
    pipeline = demo(
        tmp_path,
        ('entry = "alto.examples.demo:square"', 'entry = "alto.examples.demo:cube"'),
    )
    line = one_line(serve(tmp_path, str(pipeline), "--no-http"))
    assert "stages.square.entry" in line and "'alto.examples.demo:cube'" in line, line
    assert "cube" in line.rsplit(":", 1)[1], line


def test_an_unknown_engine_in_an_lm_stage(tmp_path: Path) -> None:
    pipeline = tmp_path / "lm.toml"
    pipeline.write_text(
        f"""
[pipeline]
name = "engine-{os.getpid()}"
input = "questions"
outputs = ["answers", "answer_out"]
[queues.questions]
type = "alto.factool.factool_pb2:Question"
[queues.answers]
type = "alto.factool.factool_pb2:Answer"
[queues.answer_out]
type = "alto.factool.factool_pb2:Answer"
[stages.qa]
entry = "alto.factool:AnswerQuestion"
inputs = ["questions"]
outputs = ["answers", "answer_out"]
scheduler = "prompt-sticky"
options = {{ engine = "nope", max_tokens = 10 }}
"""
    )
    line = one_line(serve(tmp_path, str(pipeline), "--no-http"))
    assert line.startswith(f"alto: error: {pipeline}: stages.qa.options: "), line
    assert "unknown engine 'nope'" in line and "available: " in line and "emulated" in line


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("flag", ["--http", "--tcp"])
def test_a_port_already_in_use(tmp_path: Path, flag: str) -> None:
    pipeline = demo(tmp_path)
    with _listening() as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        args = [str(pipeline), flag, address]
        if flag == "--tcp":
            args.append("--no-http")
        line = one_line(serve(tmp_path, *args))
    assert line == (
        f"alto: error: <command line>: {flag}: {address} is already in use "
        f"(another alto serve?); choose another with {flag} HOST:PORT"
    )


def test_an_instance_that_crashes_while_starting(tmp_path: Path) -> None:
    pipeline = demo(
        tmp_path, ('entry = "alto.examples.demo:square"', 'entry = "test_startup:Boom"')
    )
    result = serve(tmp_path, str(pipeline), "--no-http")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    last = lines[-1]
    assert last.startswith("alto: error: instance square/"), result.stderr
    assert "failed to start" in last
    # The line names the exception its setup() raised (the instance reports it).
    assert (
        "setup failed: RuntimeError: the weights file is truncated (a start-up failure on purpose)"
        in last
    ), last
    # Its traceback is there, as its own (prefixed) output; alto's own lines are log lines
    # and that one error line: no traceback and no exception group of alto's.
    ours = [line for line in lines if not line.startswith("[")]
    assert sum(line.startswith("alto: error:") for line in ours) == 1, ours
    assert not any("Traceback" in line or "ExceptionGroup" in line for line in ours), ours
    assert any(line.startswith("[square/") and "Traceback" in line for line in lines), lines
    # The instances that did start were stopped.
    assert "exited with code" in result.stderr
