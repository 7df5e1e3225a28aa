"""An engine that streams from any OpenAI-compatible server.

vLLM (``vllm serve``), SGLang (``python -m sglang.launch_server``) and llama.cpp
(``python -m llama_cpp.server``, ``llama-server``) all serve ``POST /v1/completions`` and
``POST /v1/chat/completions`` with ``"stream": true``: a Server-Sent-Events body of
``data: {json}`` lines ended by ``data: [DONE]``. We speak that protocol with
``httpx.AsyncClient`` (which runs under trio and asyncio alike), so the GPU serving
engine lives in its own process and the stage only holds a connection pool.

Errors, all :class:`alto.AltoError`::

    OpenAIEngineError            the server's stream was not what the protocol says
    +-- OpenAIStatusError        the server answered with an HTTP error status
    +-- OpenAIConnectionError    no answer: connection refused, reset or timed out

The httpx exception is chained (``raise ... from exc``), as httpcore does.

Retries. A hiccup of the server (a restart, a full queue, a dropped connection) should not
fail a whole pipeline request, so a call is tried again, with exponential backoff and full
jitter (tenacity's ``wait_random_exponential``, the AWS "full jitter" scheme: uncoordinated
stage instances do not come back in lockstep), on:

- a transport error: connect or read error, a timeout, a connection the server closed
  without answering (httpx's ``NetworkError``, ``TimeoutException``,
  ``RemoteProtocolError``);
- HTTP 429 and 5xx; on 429 and 503 a ``Retry-After`` (seconds or an HTTP date) replaces
  the backoff, and a ``Retry-After`` longer than what is left of ``retry_max_seconds``
  ends the retries at once: trying earlier than the server asked would only be refused.

Never on another 4xx (the request itself is wrong: sending it again changes nothing), on a
malformed stream, and never once the first piece of the completion has been received: the
pieces already handed to the consumer cannot be taken back, so a retry would repeat them.
Such a failure is raised as is. Retries are bounded by ``retries`` (further tries after the
first) and by ``retry_max_seconds`` (no try starts later than that after the first one).
The error raised after the last try names the URL, the number of attempts, why retrying
stopped and the last cause (chained), and keeps the last error's class: a caller that
catches :class:`OpenAIStatusError` still sees the server's last status.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import httpx
import tenacity

from .._errors import AltoError
from ._base import Engine, GenerationParams

log = logging.getLogger("alto.engines.openai")

# Enough of an error body to say what went wrong (vLLM's validation errors run to a few
# hundred characters) without putting a whole HTML error page into a log line.
_BODY_EXCERPT = 500

# Upper bounds of the options: enough for any sane deployment, small enough that a typo
# (an extra zero) cannot park a stage for hours.
_MAX_RETRIES = 20
_MAX_RETRY_SECONDS = 600.0
_MAX_BACKOFF_SECONDS = 10.0
_MAX_TIMEOUT = 3600.0
# The backoff window doubles per try up to this; the precedents sit around it (stamina's
# wait_max 5 s, Google's gRPC connection backoff 120 s max, urllib3's 120 s), and a stage
# holding a request should hear sooner rather than later that the server is gone.
_MAX_BACKOFF_WINDOW = 10.0

# Transient by nature: the same request may well succeed a moment later. A bad URL scheme
# (UnsupportedProtocol), a proxy error or our own protocol error would fail again.
_TRANSIENT_TRANSPORT_ERRORS = (
    httpx.NetworkError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
)


class OpenAIEngineError(AltoError):
    """The server's response broke the OpenAI streaming protocol."""


class OpenAIStatusError(OpenAIEngineError):
    """The server answered with an HTTP error status; ``body`` is an excerpt of its body.

    ``retry_after``: the seconds the server's ``Retry-After`` asked for (429 and 503 only),
    or ``None``. ``attempts``: how many calls were made before this error was raised.
    """

    def __init__(
        self,
        url: str,
        status_code: int,
        body: str,
        *,
        retry_after: float | None = None,
        attempts: int = 1,
        message: str | None = None,
    ) -> None:
        self.url = url
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after
        self.attempts = attempts
        super().__init__(message or f"{url} answered HTTP {status_code}: {body}")


class OpenAIConnectionError(OpenAIEngineError):
    """The server could not be reached, or stopped answering (connect, read, timeout).

    ``attempts``: how many calls were made before this error was raised.
    """

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        self.attempts = attempts
        super().__init__(message)


def _check_number(
    name: str, value: object, low: float, high: float, *, low_inclusive: bool = True
) -> float:
    # TOML gives ints for whole numbers; a bool is an int to Python but never meant here.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if (value < low if low_inclusive else value <= low) or value > high:
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{name}={value!r} is out of range; allowed: {bracket}{low}, {high}]")
    return float(value)


class OpenAIEngine(Engine):
    """Streams completions from an OpenAI-compatible server.

    ``base_url`` includes the API version, as the OpenAI client's does:
    ``http://127.0.0.1:8000/v1``. ``model``: the served model's name; ``None`` asks the
    server (``GET /models``, first entry) once. ``mode``: ``"completions"`` sends the prompt
    as is (``choices[0].text``), ``"chat"`` sends it as one user message
    (``choices[0].delta.content``) and lets the server apply the chat template.
    ``timeout``: seconds to connect, and to wait for each piece of the stream (0 to 3600).
    ``retries``: further tries after a transient failure before the first piece arrived
    (0 to 20, default 4; see the module docstring for which failures).
    ``retry_backoff_seconds``: the first retry waits a random time up to this, each later
    one up to twice the previous window, at most 10 s (0 to 10, default 0.25).
    ``retry_max_seconds``: no try starts later than this after the first one (0 to 600,
    default 30).
    ``transport``: an ``httpx`` transport to use instead of the network (tests pass
    ``httpx.MockTransport``).

    Raises ``ValueError`` for an unknown mode or an option out of range.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        mode: Literal["completions", "chat"] = "completions",
        timeout: float = 60.0,
        retries: int = 4,
        retry_backoff_seconds: float = 0.25,
        retry_max_seconds: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if mode not in ("completions", "chat"):
            raise ValueError(f"unknown mode {mode!r}; allowed: completions, chat")
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise ValueError(f"retries must be a whole number, not {retries!r}")
        if not 0 <= retries <= _MAX_RETRIES:
            raise ValueError(f"retries={retries} is out of range; allowed: 0..{_MAX_RETRIES}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self.retries = retries
        self.retry_backoff_seconds = _check_number(
            "retry_backoff_seconds", retry_backoff_seconds, 0.0, _MAX_BACKOFF_SECONDS
        )
        self.retry_max_seconds = _check_number(
            "retry_max_seconds", retry_max_seconds, 0.0, _MAX_RETRY_SECONDS
        )
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(
            _check_number("timeout", timeout, 0.0, _MAX_TIMEOUT, low_inclusive=False)
        )
        self._transport = transport
        # Made on first use, inside the event loop that will use it: a pooled connection
        # belongs to the loop (trio or asyncio) that opened it.
        self._client: httpx.AsyncClient | None = None
        self._requests = 0
        self._failed = 0
        self._pieces = 0
        self._backoff = tenacity.wait_random_exponential(
            multiplier=self.retry_backoff_seconds, max=_MAX_BACKOFF_WINDOW
        )

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=self._timeout,
                transport=self._transport,
            )
        return self._client

    async def _resolve_model(self, client: httpx.AsyncClient) -> str:
        if self.model is None:
            try:
                response = await client.get("/models")
                await _raise_for_status(response)
                models = response.json()["data"]
                self.model = str(models[0]["id"])
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise OpenAIEngineError(
                    f"{self.base_url}/models did not name a model; pass model="
                ) from exc
        return self.model

    def _body(self, model: str, prompt: str, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self.mode == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def generate(
        self,
        prompt: str,
        params: GenerationParams = GenerationParams(),
        *,
        prompt_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream the server's completion piece by piece (one SSE event each).

        ``prompt_key`` is not sent: servers with a prefix cache (vLLM's automatic prefix
        caching, SGLang's radix cache) find shared prefixes themselves.

        Transient failures before the first piece are retried (see the module docstring).
        Raises :class:`OpenAIStatusError` (HTTP error status), :class:`OpenAIConnectionError`
        (unreachable, or a timeout) or :class:`OpenAIEngineError` (a malformed stream, an
        error event, or a stream that ends without ``data: [DONE]``); after retries their
        ``attempts`` says how many calls were made.
        Closing the iterator early closes the HTTP response, which servers take as an abort.
        """
        client = self._get_client()
        path = "/chat/completions" if self.mode == "chat" else "/completions"
        url = f"{self.base_url}{path}"
        self._requests += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                pieces, first = await self._open(client, path, url, prompt, params, stack)
                if first is None:
                    return
                # From here on nothing is retried: the consumer has the first piece.
                self._pieces += 1
                yield first
                async for piece in pieces:
                    self._pieces += 1
                    yield piece
        except httpx.TransportError as exc:
            # A transient error before the first piece went through the retries and comes
            # here converted; what is left: one after the first piece, or a permanent one.
            self._failed += 1
            if isinstance(exc, _TRANSIENT_TRANSPORT_ERRORS):
                message = (
                    f"{url}: {type(exc).__name__} after the stream had started; not "
                    f"retried, since the pieces already received would be repeated: {exc}"
                )
            else:
                message = f"{url}: {type(exc).__name__}: {exc}"
            raise OpenAIConnectionError(message) from exc
        except AltoError:
            self._failed += 1
            raise

    async def _open(
        self,
        client: httpx.AsyncClient,
        path: str,
        url: str,
        prompt: str,
        params: GenerationParams,
        stack: contextlib.AsyncExitStack,
    ) -> tuple[AsyncIterator[str], str | None]:
        """Send the request and read up to its first piece, with retries.

        Returns the stream's remaining pieces and its first one (``None``: the completion
        was empty); ``stack`` closes the response. Raises what :meth:`generate` does.
        """
        started = time.monotonic()
        retrying = tenacity.AsyncRetrying(
            # anyio's sleep runs under trio and asyncio alike (the stage's backend).
            sleep=anyio.sleep,
            stop=(
                tenacity.stop_after_attempt(self.retries + 1)
                # Looks at the coming wait too: no try starts past retry_max_seconds.
                | tenacity.stop_before_delay(self.retry_max_seconds)
            ),
            wait=self._wait,
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=lambda state: _log_retry(url, self.retries + 1, state),
        )
        opened: tuple[AsyncIterator[str], str | None] | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    # A failed try closes its own response before the next one starts.
                    async with contextlib.AsyncExitStack() as attempt_stack:
                        body = self._body(await self._resolve_model(client), prompt, params)
                        response = await attempt_stack.enter_async_context(
                            client.stream("POST", path, json=body)
                        )
                        await _raise_for_status(response)
                        pieces = self._stream(response, url)
                        attempt_stack.push_async_callback(pieces.aclose)
                        first = await anext(pieces, None)
                        stack.push_async_exit(attempt_stack.pop_all())
                        opened = (pieces, first)
        except tenacity.RetryError as gave_up:
            last = gave_up.last_attempt.exception()
            # The httpx exception is the cause, as for an error raised without retries.
            cause = last.__cause__ if isinstance(last, OpenAIStatusError) else last
            raise self._gave_up(url, gave_up, time.monotonic() - started) from cause
        assert opened is not None  # tenacity ends the loop on success or raises
        return opened

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, OpenAIStatusError) and error.retry_after is not None:
            # As asked; one longer than the time left makes stop_before_delay stop.
            return min(error.retry_after, self.retry_max_seconds)
        return float(self._backoff(state))

    def _gave_up(self, url: str, gave_up: tenacity.RetryError, elapsed: float) -> OpenAIEngineError:
        last = gave_up.last_attempt
        error = last.exception()
        attempts = last.attempt_number
        if attempts > self.retries:
            why = f"retries={self.retries} used up"
        else:
            why = f"another try would start past retry_max_seconds={self.retry_max_seconds:g}"
            if isinstance(error, OpenAIStatusError) and error.retry_after is not None:
                why += f" (the server asked to wait {error.retry_after:g} s)"
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        summary = f"{url}: gave up after {tries} in {elapsed:.1f} s ({why})"
        if isinstance(error, OpenAIStatusError):
            return OpenAIStatusError(
                error.url,
                error.status_code,
                error.body,
                retry_after=error.retry_after,
                attempts=attempts,
                message=f"{summary}; last answer: HTTP {error.status_code}: {error.body}",
            )
        return OpenAIConnectionError(
            f"{summary}; last error: {type(error).__name__}: {error}", attempts=attempts
        )

    async def _stream(self, response: httpx.Response, url: str) -> AsyncGenerator[str, None]:
        events = _SSEDecoder()
        async for line in response.aiter_lines():
            data = events.feed_line(line)
            if data is None:
                continue
            if data == "[DONE]":
                return
            piece = self._piece(data)
            if piece:
                yield piece
        # A server that fails after it has sent its 200 can only end the stream
        # (llama-cpp-python's server does, for a prompt longer than its context): without
        # [DONE] the completion is cut short, not done.
        raise OpenAIEngineError(
            f"{url}: the stream ended without [DONE] (the server failed mid-stream; see its log)"
        )

    def _piece(self, data: str) -> str | None:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise OpenAIEngineError(f"not JSON in the event stream: {data[:100]!r}") from exc
        if not isinstance(chunk, dict):
            raise OpenAIEngineError(f"unexpected event in the stream: {data[:100]!r}")
        if "error" in chunk:
            # vLLM and llama.cpp report errors after the stream has started this way.
            raise OpenAIEngineError(f"server error in the stream: {chunk['error']}")
        choices = chunk.get("choices") or []
        if not choices:
            return None  # e.g. the usage chunk of stream_options.include_usage
        choice = choices[0]
        if self.mode == "chat":
            piece = (choice.get("delta") or {}).get("content")
        else:
            piece = choice.get("text")
        return piece if isinstance(piece, str) else None

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def statistics(self) -> dict[str, float]:
        """Counters: requests sent, requests failed, pieces streamed."""
        return {
            "requests": self._requests,
            "requests_failed": self._failed,
            "pieces": self._pieces,
        }


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, OpenAIStatusError):
        return error.status_code == 429 or 500 <= error.status_code <= 599
    return isinstance(error, _TRANSIENT_TRANSPORT_ERRORS)


def _log_retry(url: str, attempts: int, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning(
        "%s: attempt %d of %d failed (%s: %s); retrying in %.2f s",
        url,
        state.attempt_number,
        attempts,
        type(error).__name__,
        error,
        wait,
    )


def _retry_after(response: httpx.Response) -> float | None:
    """The wait a 429 or 503 asks for (RFC 9110 10.2.3: seconds or an HTTP date)."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)  # RFC 9110 says whole seconds; some servers send "1.5"
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # unreadable: the backoff applies
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    # A date in the past means now; the cap only keeps the number printable, the real
    # bound is retry_max_seconds.
    return min(max(seconds, 0.0), _MAX_RETRY_SECONDS * 10)


async def _raise_for_status(response: httpx.Response) -> None:
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        await response.aread()
        excerpt = response.text[:_BODY_EXCERPT]
        raise OpenAIStatusError(
            str(response.url),
            response.status_code,
            excerpt,
            retry_after=_retry_after(response),
        ) from exc


class _SSEDecoder:
    """Server-Sent Events, sans I/O: lines in, the ``data`` of each event out.

    Follows WHATWG HTML's "event stream interpretation": an event ends at a blank line;
    its ``data:`` lines are joined with newlines; comments (``:``) and the ``event``,
    ``id`` and ``retry`` fields are skipped. The servers above put one ``data:`` line per
    event, but a line-at-a-time parser would break on a server that does not.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
