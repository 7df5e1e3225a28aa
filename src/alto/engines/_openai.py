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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import httpx

from .._errors import AltoError
from ._base import Engine, GenerationParams

# Enough of an error body to say what went wrong (vLLM's validation errors run to a few
# hundred characters) without putting a whole HTML error page into a log line.
_BODY_EXCERPT = 500


class OpenAIEngineError(AltoError):
    """The server's response broke the OpenAI streaming protocol."""


class OpenAIStatusError(OpenAIEngineError):
    """The server answered with an HTTP error status; ``body`` is an excerpt of its body."""

    def __init__(self, url: str, status_code: int, body: str) -> None:
        self.url = url
        self.status_code = status_code
        self.body = body
        super().__init__(f"{url} answered HTTP {status_code}: {body}")


class OpenAIConnectionError(OpenAIEngineError):
    """The server could not be reached, or stopped answering (connect, read, timeout)."""


class OpenAIEngine(Engine):
    """Streams completions from an OpenAI-compatible server.

    ``base_url`` includes the API version, as the OpenAI client's does:
    ``http://127.0.0.1:8000/v1``. ``model``: the served model's name; ``None`` asks the
    server (``GET /models``, first entry) once. ``mode``: ``"completions"`` sends the prompt
    as is (``choices[0].text``), ``"chat"`` sends it as one user message
    (``choices[0].delta.content``) and lets the server apply the chat template.
    ``timeout``: seconds to connect, and to wait for each piece of the stream.
    ``transport``: an ``httpx`` transport to use instead of the network (tests pass
    ``httpx.MockTransport``).

    Raises ``ValueError`` for an unknown mode.
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if mode not in ("completions", "chat"):
            raise ValueError(f"unknown mode {mode!r}; allowed: completions, chat")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout)
        self._transport = transport
        # Made on first use, inside the event loop that will use it: a pooled connection
        # belongs to the loop (trio or asyncio) that opened it.
        self._client: httpx.AsyncClient | None = None
        self._requests = 0
        self._failed = 0
        self._pieces = 0

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

        Raises :class:`OpenAIStatusError` (HTTP error status), :class:`OpenAIConnectionError`
        (unreachable, or a timeout) or :class:`OpenAIEngineError` (a malformed stream, an
        error event, or a stream that ends without ``data: [DONE]``).
        Closing the iterator early closes the HTTP response, which servers take as an abort.
        """
        client = self._get_client()
        path = "/chat/completions" if self.mode == "chat" else "/completions"
        self._requests += 1
        try:
            body = self._body(await self._resolve_model(client), prompt, params)
            async with client.stream("POST", path, json=body) as response:
                await _raise_for_status(response)
                events = _SSEDecoder()
                done = False
                async for line in response.aiter_lines():
                    data = events.feed_line(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        done = True
                        break
                    piece = self._piece(data)
                    if piece:
                        self._pieces += 1
                        yield piece
                if not done:
                    # A server that fails after it has sent its 200 can only end the
                    # stream (llama-cpp-python's server does, for a prompt longer than
                    # its context): without [DONE] the completion is cut short, not done.
                    raise OpenAIEngineError(
                        f"{self.base_url}{path}: the stream ended without [DONE] "
                        "(the server failed mid-stream; see its log)"
                    )
        except httpx.TransportError as exc:
            self._failed += 1
            raise OpenAIConnectionError(
                f"{self.base_url}{path}: {type(exc).__name__}: {exc}"
            ) from exc
        except AltoError:
            self._failed += 1
            raise

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


async def _raise_for_status(response: httpx.Response) -> None:
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        await response.aread()
        excerpt = response.text[:_BODY_EXCERPT]
        raise OpenAIStatusError(str(response.url), response.status_code, excerpt) from exc


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
