"""The ``openai`` engine's retries against a real server process that fails on purpose.

tests/openai_flaky_server.py is a stdlib HTTP server speaking the OpenAI completions
streaming protocol over real 127.0.0.1 sockets; each test starts its own with the failure
it needs and counts the calls that server saw. No model is involved, and the backoff is
made tiny (``retry_backoff_seconds``), so these tests are fast.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio
import trio.testing

import alto
from alto.engines import (
    GenerationParams,
    OpenAIConnectionError,
    OpenAIEngine,
    OpenAIStatusError,
    load_engine,
)

SERVER = Path(__file__).with_name("openai_flaky_server.py")
ANSWER = "Paris is the capital of France."
PARAMS = GenerationParams(max_tokens=16)
# A bound on each test's engine calls, so that a hang fails instead of blocking the run;
# nothing here is expected to come near it.
HANG = 60


class FlakyServer:
    """One server process; ``calls()`` stops it and counts the completion calls it saw."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()  # "port N" once it listens
        if not first.startswith("port "):
            self.stop()
            pytest.fail(f"the test server did not start: {first!r} {self._stderr}")
        self.base_url = f"http://127.0.0.1:{int(first.split()[1])}/v1"
        self._stdout = ""
        self._stderr = ""
        self._stopped = False

    def engine(self, **options: Any) -> OpenAIEngine:
        options.setdefault("retry_backoff_seconds", 0.001)
        return OpenAIEngine(self.base_url, model="flaky", **options)

    def stop(self) -> int | None:
        if not getattr(self, "_stopped", False):
            self._stopped = True
            if self.process.poll() is None:
                self.process.terminate()
            out, err = self.process.communicate(timeout=30)
            self._stdout, self._stderr = out, err
        return self.process.returncode

    def calls(self) -> int:
        """Stops the server (or collects a dead one) and counts the calls it printed."""
        self.stop()
        return sum(1 for line in self._stdout.splitlines() if line.startswith("call "))


@pytest.fixture
def flaky() -> Iterator[Callable[..., FlakyServer]]:
    servers: list[FlakyServer] = []

    def start(*args: str) -> FlakyServer:
        server = FlakyServer(*args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


async def complete(engine: OpenAIEngine, prompt: str = "The capital of France:") -> str:
    try:
        with trio.fail_after(HANG):
            return "".join([piece async for piece in engine.generate(prompt, PARAMS)])
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    "failure",
    [
        ["--failure", "503"],
        ["--failure", "503", "--retry-after", "0"],
        ["--failure", "429", "--retry-after", "0"],
        ["--failure", "429"],
        ["--failure", "500"],
        ["--failure", "reset"],
    ],
    ids=["503", "503-retry-after", "429-retry-after", "429", "500", "reset"],
)
async def test_succeeds_after_transient_failures(
    flaky: Callable[..., FlakyServer], failure: list[str]
) -> None:
    server = flaky("--fail-first", "3", *failure)
    engine = server.engine(retries=3)
    assert await complete(engine) == ANSWER
    assert server.calls() == 4
    assert engine.statistics()["requests_failed"] == 0


async def test_retry_after_as_an_http_date_in_the_past(flaky: Callable[..., FlakyServer]) -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=5), usegmt=True)
    server = flaky("--fail-first", "1", "--failure", "503", "--retry-after", past)
    assert await complete(server.engine()) == ANSWER
    assert server.calls() == 2


async def test_gives_up_after_the_bounded_count(flaky: Callable[..., FlakyServer]) -> None:
    server = flaky("--fail-first", "1000", "--failure", "503")
    engine = server.engine(retries=2)
    with pytest.raises(OpenAIStatusError) as info:
        await complete(engine)
    assert server.calls() == 3
    error = info.value
    assert error.status_code == 503
    assert error.attempts == 3
    message = str(error)
    assert f"{server.base_url}/completions" in message
    assert "gave up after 3 attempts" in message
    assert "retries=2 used up" in message
    assert "HTTP 503" in message and "failing call 3 on purpose" in message
    assert isinstance(error.__cause__, httpx.HTTPStatusError)
    assert isinstance(error, alto.AltoError)
    assert engine.statistics()["requests_failed"] == 1


async def test_gives_up_on_resets_with_a_connection_error(
    flaky: Callable[..., FlakyServer],
) -> None:
    server = flaky("--fail-first", "1000", "--failure", "reset")
    with pytest.raises(OpenAIConnectionError) as info:
        await complete(server.engine(retries=1))
    assert server.calls() == 2
    assert info.value.attempts == 2
    assert "gave up after 2 attempts" in str(info.value)
    assert f"{server.base_url}/completions" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.TransportError)


async def test_nothing_listening_is_retried_then_named(flaky: Callable[..., FlakyServer]) -> None:
    server = flaky()
    base_url = server.base_url
    server.stop()  # the port is closed now: connection refused
    engine = OpenAIEngine(base_url, model="flaky", retries=2, retry_backoff_seconds=0.001)
    with pytest.raises(OpenAIConnectionError) as info:
        await complete(engine)
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_no_retries_means_one_call(flaky: Callable[..., FlakyServer]) -> None:
    server = flaky("--fail-first", "1", "--failure", "503")
    with pytest.raises(OpenAIStatusError) as info:
        await complete(server.engine(retries=0))
    assert server.calls() == 1
    assert "gave up after 1 attempt " in str(info.value)


async def test_never_retries_a_400(flaky: Callable[..., FlakyServer]) -> None:
    server = flaky()
    engine = server.engine(retries=5)
    with pytest.raises(OpenAIStatusError) as info, trio.fail_after(HANG):
        async for _ in engine.generate("x", GenerationParams(max_tokens=-1)):
            pass
    await engine.aclose()
    assert server.calls() == 1
    assert info.value.status_code == 400
    assert info.value.attempts == 1
    assert "max_tokens must be at least 1" in info.value.body
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


async def test_never_retries_after_the_first_token(flaky: Callable[..., FlakyServer]) -> None:
    server = flaky("--die-after-first-token")
    engine = server.engine(retries=5)
    received: list[str] = []
    with pytest.raises(OpenAIConnectionError) as info, trio.fail_after(HANG):
        async for piece in engine.generate("The capital of France:", PARAMS):
            received.append(piece)
    await engine.aclose()
    assert received == ["Paris"]
    assert server.calls() == 1
    assert server.process.returncode == 3  # the server really died
    assert "after the stream had started; not retried" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.TransportError)
    assert engine.statistics() == {"requests": 1, "requests_failed": 1, "pieces": 1}


async def test_retry_after_past_the_time_bound_gives_up_at_once(
    flaky: Callable[..., FlakyServer],
) -> None:
    server = flaky("--fail-first", "1000", "--failure", "429", "--retry-after", "120")
    with pytest.raises(OpenAIStatusError) as info:
        await complete(server.engine(retries=10, retry_max_seconds=5))
    assert server.calls() == 1
    assert info.value.retry_after == 120
    assert info.value.status_code == 429
    message = str(info.value)
    assert "past retry_max_seconds=5" in message
    assert "the server asked to wait 120 s" in message


def test_retries_under_asyncio(flaky: Callable[..., FlakyServer]) -> None:
    """Stages with ``backend = "asyncio"`` (vLLM's, SGLang's) get the same retries."""
    server = flaky("--fail-first", "2", "--failure", "503")

    async def main() -> str:
        engine = server.engine()
        try:
            with anyio.fail_after(HANG):
                return "".join([p async for p in engine.generate("The capital:", PARAMS)])
        finally:
            await engine.aclose()

    assert anyio.run(main, backend="asyncio") == ANSWER
    assert server.calls() == 3


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"retries": 21}, "retries=21 is out of range; allowed: 0..20"),
        ({"retries": -1}, "retries=-1 is out of range"),
        ({"retries": 2.5}, "retries must be a whole number"),
        ({"retries": True}, "retries must be a whole number"),
        (
            {"retry_max_seconds": 601},
            "retry_max_seconds=601 is out of range; allowed: [0.0, 600.0]",
        ),
        ({"retry_max_seconds": "30"}, "retry_max_seconds must be a number"),
        ({"retry_backoff_seconds": 11}, "retry_backoff_seconds=11 is out of range"),
        ({"retry_backoff_seconds": float("nan")}, "retry_backoff_seconds must be a number"),
        ({"timeout": 0}, "timeout=0 is out of range; allowed: (0.0, 3600.0]"),
    ],
)
def test_options_are_bounded(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError) as info:
        OpenAIEngine("http://127.0.0.1:1/v1", **options)
    assert complaint in str(info.value)
    # Through the plugin loader, as a pipeline file's engine_options arrive.
    with pytest.raises(alto.PluginError, match="bad options"):
        load_engine("openai", base_url="http://127.0.0.1:1/v1", **options)


async def test_cancelled_while_backing_off_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancelled call stops retrying at once and raises Cancelled, not a retry error
    (tenacity sees every exception of a try, Cancelled included, and must pass it on)."""
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    engine = OpenAIEngine(
        "http://server/v1",
        model="m",
        transport=httpx.MockTransport(refuse),
        retries=20,
        retry_backoff_seconds=10,
        retry_max_seconds=600,
    )
    with trio.move_on_after(15) as scope:  # virtual seconds: some tries, far from 20
        async for _ in engine.generate("x"):
            pass  # pragma: no cover
    await engine.aclose()
    assert scope.cancelled_caught
    assert 1 <= len(calls) < 21
    assert engine.statistics()["requests_failed"] == 0
