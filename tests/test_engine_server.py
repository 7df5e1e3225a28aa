"""The OpenAI-compatible engine against a real server: llama-cpp-python's
(``python -m llama_cpp.server``), started by the test on a free port with the small
default model, and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import httpx
import pytest

from alto.engines import GenerationParams, OpenAIEngine, OpenAIEngineError, OpenAIStatusError

pytestmark = [pytest.mark.slow, pytest.mark.llm]

FEW_SHOT = (
    "Q: What is the capital of France?\nA: Paris\n"
    "Q: Who wrote Hamlet?\nA: William Shakespeare\n"
    "Q: What is the capital of Italy?\nA:"
)
STARTUP_SECONDS = 90  # model load on a busy 2-core machine; usually 2-5 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llama_cpp.server")
    from alto.engines._llamacpp import default_model_path

    model = default_model_path()
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"]
    # The GGUF carries no chat template (the server would fall back to llama-2's).
    command += ["--chat_format", "gemma"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited early:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_completion_stream_from_llama_cpp_server(server_url: str) -> None:
    engine = OpenAIEngine(server_url)  # the model name comes from GET /v1/models
    params = GenerationParams(max_tokens=16, stop=["\n"])
    pieces = [p async for p in engine.generate(FEW_SHOT, params)]
    await engine.aclose()
    assert len(pieces) >= 1
    assert "Rome" in "".join(pieces)
    assert "\n" not in "".join(pieces)
    assert engine.model is not None
    assert engine.statistics()["pieces"] == len(pieces)


async def test_chat_stream_from_llama_cpp_server(server_url: str) -> None:
    engine = OpenAIEngine(server_url, model="gemma", mode="chat")
    params = GenerationParams(max_tokens=12)
    pieces = [p async for p in engine.generate("What is the capital of France?", params)]
    await engine.aclose()
    assert len(pieces) >= 2  # streamed, one delta per token
    assert "".join(pieces).strip()


async def test_early_close_then_reuse(server_url: str) -> None:
    engine = OpenAIEngine(server_url, model="gemma")
    agen = engine.generate("Once upon a time", GenerationParams(max_tokens=200))
    assert isinstance(agen, AsyncGenerator)  # (typed as an iterator)
    async with contextlib.aclosing(agen) as pieces:
        async for _ in pieces:
            break
    # The pool is still usable after a response closed mid-stream.
    again = [p async for p in engine.generate("Hello", GenerationParams(max_tokens=3))]
    await engine.aclose()
    assert again


async def test_server_error_status(server_url: str) -> None:
    engine = OpenAIEngine(server_url, model="gemma")
    with pytest.raises(OpenAIStatusError) as info:
        async for _ in engine.generate("Hello", GenerationParams(max_tokens=-1)):
            pass
    await engine.aclose()
    assert info.value.status_code >= 400
    assert "max_tokens" in info.value.body
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


async def test_failure_after_the_stream_started_is_an_error(server_url: str) -> None:
    """This server checks the prompt's length only once it is streaming: it answers 200,
    then ends the stream without ``[DONE]``. That must not pass for an empty answer."""
    engine = OpenAIEngine(server_url, model="gemma")
    with pytest.raises(OpenAIEngineError, match=r"without \[DONE\]"):
        async for _ in engine.generate("word " * 1500, GenerationParams(max_tokens=8)):
            pass
    await engine.aclose()
