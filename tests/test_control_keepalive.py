"""Keep-alive connections to the control plane after an answer sent before the body was read.

The server is the real one (``serve_control``: quart-trio on hypercorn's trio worker, on a
127.0.0.1 socket) in front of the in-memory FakeRuntime; the client is one
``httpx.AsyncClient`` limited to a single connection, so that each next request goes to
the connection the previous one left in the pool. A request that follows a refusal must
be answered, not left waiting for the client's timeout: ``NEXT`` bounds it far below the
client's own timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio
from control_fake import FakeRuntime

from alto.control import serve_control
from alto.control._app import MAX_REQUEST_BODY

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS = "/v1/pipelines/wordcount/requests"
CLIENT_TIMEOUT = 60  # what a hang would cost without NEXT
NEXT = 10  # the bound on a request after a refusal; it normally takes milliseconds
BIG = 4 * 1024 * 1024  # under MAX_REQUEST_BODY, far over what socket buffers hold


@dataclass
class Server:
    fake: FakeRuntime
    client: httpx.AsyncClient


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    fake = FakeRuntime()
    port: int = await nursery.start(partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=CLIENT_TIMEOUT,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    ) as client:
        yield Server(fake, client)


def _client_port(response: httpx.Response) -> int:
    """The client side's port of the connection that carried ``response``."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


async def _next_request_is_answered(server: Server) -> httpx.Response:
    with trio.fail_after(NEXT):
        response = await server.client.post(
            REQUESTS, params={"stream": "false"}, json={"text": "a bb"}, headers=AUTH
        )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "done"
    return response


async def test_after_413_the_next_request_is_answered(server: Server) -> None:
    refused = await server.client.post(
        REQUESTS, content=b" " * (MAX_REQUEST_BODY + 1024 * 1024), headers=AUTH
    )
    assert refused.status_code == 413
    assert "error" in refused.json()
    # Answered before the body was read: the client is told not to reuse the connection.
    assert refused.headers["connection"] == "close"
    await _next_request_is_answered(server)


async def test_after_401_with_a_large_body_the_next_request_is_answered(server: Server) -> None:
    refused = await server.client.post(REQUESTS, content=b"x" * BIG)  # no token
    assert refused.status_code == 401
    assert refused.headers["connection"] == "close"
    await _next_request_is_answered(server)


async def test_after_404_with_a_large_body_the_next_request_is_answered(server: Server) -> None:
    refused = await server.client.post(
        "/v1/pipelines/nope/requests", content=b"x" * BIG, headers=AUTH
    )
    assert refused.status_code == 404
    await _next_request_is_answered(server)
    wrong_method = await server.client.put("/api/pipeline", content=b"x" * BIG)
    assert wrong_method.status_code == 405
    await _next_request_is_answered(server)
    no_route = await server.client.post("/no/such/path", content=b"x" * BIG)
    assert no_route.status_code == 404
    await _next_request_is_answered(server)


async def test_after_429_with_a_body_the_next_request_is_answered(server: Server) -> None:
    server.fake.overloaded = True
    refused = await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a " * 100_000}, headers=AUTH
    )
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    server.fake.overloaded = False
    answered = await _next_request_is_answered(server)
    # The ingress had read the whole body before refusing: the connection stays open.
    assert "connection" not in refused.headers
    assert _client_port(answered) == _client_port(refused)


async def test_answers_after_the_whole_body_keep_the_connection(server: Server) -> None:
    first = await _next_request_is_answered(server)
    status = await server.client.get("/api/pipeline")
    assert status.status_code == 200
    again = await _next_request_is_answered(server)
    assert "connection" not in first.headers and "connection" not in status.headers
    assert _client_port(first) == _client_port(status) == _client_port(again)


async def test_a_chunked_body_answered_early_closes_too(server: Server) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536

    refused = await server.client.post(REQUESTS, content=chunks())  # no token, no length
    assert refused.status_code == 401
    assert refused.headers["connection"] == "close"
    await _next_request_is_answered(server)
