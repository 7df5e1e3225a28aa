"""The HTTP control plane against the in-memory FakeRuntime, over a real socket.

Each test starts ``serve_control`` on 127.0.0.1 port 0 in pytest-trio's nursery and talks to
it with ``httpx.AsyncClient`` (SSE through httpx_sse); the CLI helpers run in a thread.
"""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from control_fake import FakeRuntime
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from alto.control import DEFAULT_HTTP_PORT, create_app, serve_control
from alto.control import _cli as cli
from alto.control._app import _is_loopback
from alto.control._metrics import open_registry, percentile
from alto.control._stream import KEEPALIVE, KeepaliveBody, StatsHub, stats_events

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INTERVAL = 0.05
REQUESTS = "/v1/pipelines/wordcount/requests"


@dataclass
class Server:
    fake: FakeRuntime
    client: httpx.AsyncClient
    url: str


async def _start(
    nursery: trio.Nursery, fake: FakeRuntime, token: str | None = TOKEN, **kwargs: Any
) -> int:
    port: int = await nursery.start(
        partial(
            serve_control, fake, "127.0.0.1", 0, token=token, stream_interval=INTERVAL, **kwargs
        )
    )
    return port


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    fake = FakeRuntime()
    port = await _start(nursery, fake)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Server(fake, client, url)


def _error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


def _metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


# -- status ----------------------------------------------------------------------------


def test_default_port() -> None:
    assert DEFAULT_HTTP_PORT == 8470


async def test_pipeline(server: Server) -> None:
    response = await server.client.get("/api/pipeline")
    assert response.status_code == 200
    data = response.json()
    assert data["pipeline"] == "wordcount"
    assert [s["name"] for s in data["stages"]] == ["split", "score", "sum"]
    sum_stage = data["stages"][2]
    assert sum_stage["stateful"] is True and sum_stage["aggregate_level"] == 1
    assert sum_stage["instances"] == [4]
    assert [(e["from"], e["queue"], e["to"], e["routing"]) for e in data["edges"]] == [
        ("ingress", "input", "split", "round-robin"),
        ("split", "words", "score", "least-outstanding"),
        ("score", "scores", "sum", "hash"),
        ("sum", "total", "sink", "sink"),
    ]
    assert {q["name"] for q in data["queues"]} == {"input", "words", "scores", "total"}
    assert {(i["id"], i["stage"]) for i in data["instances"]} == {
        (1, "split"),
        (2, "score"),
        (3, "score"),
        (4, "sum"),
    }


async def test_instances(server: Server) -> None:
    response = await server.client.get("/api/instances")
    assert response.status_code == 200
    instances = response.json()["instances"]
    assert len(instances) == 4
    first = instances[0]
    assert set(first) >= {
        "id",
        "stage",
        "state",
        "queue_depth",
        "credits",
        "backlog",
        "open_groups",
        "frames_in",
        "frames_out",
        "last_error",
    }
    assert first["state"] == "ready" and first["credits"] == 4 and first["last_error"] is None


async def test_openapi(server: Server) -> None:
    response = await server.client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {
        "/api/pipeline",
        "/api/instances",
        "/api/stream",
        "/api/stages/{stage}/scale",
        "/api/instances/{instance_id}/drain",
        "/v1/pipelines/{name}/requests",
        "/metrics",
    }


async def test_dashboard_static_files(server: Server) -> None:
    index = await server.client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert "app.js" in index.text
    for name in ("app.js", "style.css"):
        assert (await server.client.get(f"/dashboard/{name}")).status_code == 200
    missing = await server.client.get("/dashboard/no-such-file.js")
    assert missing.status_code == 404
    _error_of(missing)
    escape = await server.client.get("/dashboard/%2e%2e/pyproject.toml")
    assert escape.status_code == 404


async def test_dashboard_dir_override(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>custom</p>")
    port = await _start(nursery, FakeRuntime(), dashboard_dir=tmp_path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/")).text == "<p>custom</p>"


# -- the live stream -------------------------------------------------------------------


async def test_stream_late_client_gets_state_at_once_and_events_keep_coming(
    server: Server,
) -> None:
    await trio.sleep(INTERVAL * 4)  # the sampler has been running for a while
    seqs: list[int] = []
    with trio.fail_after(5):
        async with aconnect_sse(server.client, "GET", "/api/stream") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            started = trio.current_time()
            async for event in source.aiter_sse():
                assert event.event == "stats"
                data = json.loads(event.data)
                if not seqs:
                    # The current state, without waiting for the next tick.
                    assert trio.current_time() - started < INTERVAL * 2
                    assert data["seq"] > 1
                    assert {i["id"]: i["queue_depth"] for i in data["instances"]} == {
                        1: 0,
                        2: 0,
                        3: 0,
                        4: 0,
                    }
                    assert data["pipeline"] == "wordcount"
                    assert set(data["rates"]) >= {"frames_per_s", "requests_per_s"}
                    assert set(data["latency"]) >= {"p50", "p99"}
                seqs.append(data["seq"])
                if len(seqs) == 5:
                    break
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


async def test_stream_shows_queue_depth_while_requests_flow(server: Server) -> None:
    server.fake.step_delay = 0.2
    depths: set[int] = set()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(
                    partial(
                        server.client.post,
                        REQUESTS,
                        params={"stream": "false"},
                        json={"text": "alpha beta"},
                        headers=AUTH,
                    )
                )
            async with aconnect_sse(server.client, "GET", "/api/stream") as source:
                async for event in source.aiter_sse():
                    data = json.loads(event.data)
                    depths.update(i["queue_depth"] for i in data["instances"])
                    if data["requests"]["completed"] == 3:
                        break
    assert max(depths) >= 1
    instances = (await server.client.get("/api/instances")).json()["instances"]
    assert all(i["queue_depth"] == 0 for i in instances)


async def test_stream_rates_and_latency(server: Server) -> None:
    for _ in range(3):
        response = await server.client.post(
            REQUESTS, params={"stream": "false"}, json={"text": "a bb ccc"}, headers=AUTH
        )
        assert response.json()["status"] == "done"
    with trio.fail_after(5):
        async with aconnect_sse(server.client, "GET", "/api/stream") as source:
            async for event in source.aiter_sse():
                data = json.loads(event.data)
                if data["requests"]["completed"] == 3 and data["rates"]["requests_per_s"] > 0:
                    break
    assert data["rates"]["frames_per_s"] > 0
    assert data["latency"]["count"] == 3
    assert 0 < data["latency"]["p50"] <= data["latency"]["p99"]


async def test_slow_stream_client_does_not_hold_back_others(server: Server) -> None:
    # A client that sends its request and never reads: its events are not queued up for
    # it, and the sampler and other clients go on at full pace.
    port = int(server.url.rsplit(":", 1)[1])
    stalled = await trio.open_tcp_stream("127.0.0.1", port)
    await stalled.send_all(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(INTERVAL * 4)
    count = 0
    with trio.fail_after(5):
        async with aconnect_sse(server.client, "GET", "/api/stream") as source:
            async for _event in source.aiter_sse():
                count += 1
                if count == 6:
                    break
    await stalled.aclose()


async def test_hub_coalesces_for_slow_clients() -> None:
    fake = FakeRuntime()
    _registry, ingress = open_registry(fake)
    hub = StatsHub(fake, ingress, 0.25)
    seq, _ = await hub.wait_newer(0)  # a late client gets the current state at once
    assert seq == 1
    for _ in range(5):
        hub.sample()
    # A client that last sent event 1 skips straight to the latest: 2..5 are never queued.
    seq, data = await hub.wait_newer(1)
    assert seq == 6 and json.loads(data)["seq"] == 6
    got: list[int] = []

    async def waiter() -> None:
        got.append((await hub.wait_newer(6))[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # nothing newer yet: it waits
        hub.sample()
    assert got == [7]


async def test_hub_rates(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeRuntime()
    _registry, ingress = open_registry(fake)
    hub = StatsHub(fake, ingress, 0.25)
    hub.sample()
    events = [e async for e in fake.submit(b"")]  # an empty text: accepted, done
    assert [e.kind for e in events] == ["accepted", "done"]
    await trio.sleep(0.5)
    hub.sample()
    data = json.loads(hub.latest()[1])
    assert data["rates"]["requests_per_s"] == 2.0
    assert data["rates"]["window_s"] == 0.5


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0], 99) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0


# -- metrics ---------------------------------------------------------------------------


async def test_metrics(server: Server) -> None:
    response = await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a bb"}, headers=AUTH
    )
    assert response.json()["status"] == "done"
    response = await server.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = _metrics(response.text)
    depth = families["alto_instance_queue_depth_frames"]
    assert {(s.labels["stage"], s.labels["instance_id"]) for s in depth.samples} == {
        ("split", "1"),
        ("score", "2"),
        ("score", "3"),
        ("sum", "4"),
    }
    assert {s.labels["instance_id"] for s in families["alto_instance_credits_frames"].samples} == {
        "1",
        "2",
        "3",
        "4",
    }
    assert "alto_instance_open_groups" in families
    assert families["alto_requests_in_flight"].samples[0].value == 0
    requests = {
        s.labels["status"]: s.value
        for s in families["alto_requests"].samples
        if s.name == "alto_requests_total"
    }
    assert requests == {"submitted": 1, "completed": 1, "failed": 0, "refused": 0}
    relayed = families["alto_relayed_frames"].samples[0]
    assert relayed.name == "alto_relayed_frames_total" and relayed.value == 12
    assert "alto_scale_events" in families
    assert {s.labels["stage"] for s in families["alto_stage_errors"].samples} == {
        "split",
        "score",
        "sum",
    }
    for name in ("alto_request_latency_seconds", "alto_request_first_result_seconds"):
        family = families[name]
        assert family.type == "histogram"
        count = next(s for s in family.samples if s.name == f"{name}_count")
        assert count.value == 1


async def test_metrics_registries_are_private(nursery: trio.Nursery) -> None:
    # Two apps in one process must not collide on metric names.
    create_app(FakeRuntime())
    create_app(FakeRuntime())


# -- commands --------------------------------------------------------------------------


async def test_scale_up_and_down(server: Server) -> None:
    response = await server.client.post(
        "/api/stages/sum/scale", json={"instances": 3}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["target_instances"] == 3
    assert len(response.json()["instances"]) == 3
    pipeline = (await server.client.get("/api/pipeline")).json()
    assert len(pipeline["stages"][2]["instances"]) == 3

    response = await server.client.post(
        "/api/stages/sum/scale", json={"instances": 1}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["instances"] == [4]
    families = _metrics((await server.client.get("/metrics")).text)
    assert families["alto_scale_events"].samples[0].value == 2


async def test_drain(server: Server) -> None:
    response = await server.client.post("/api/instances/3/drain", headers=AUTH)
    assert response.status_code == 202
    assert response.json() == {"instance": 3, "state": "stopped"}
    pipeline = (await server.client.get("/api/pipeline")).json()
    assert pipeline["stages"][1]["instances"] == [2]


MUTATIONS = [
    ("/api/stages/sum/scale", {"instances": 2}),
    ("/api/instances/2/drain", None),
    (REQUESTS, {"text": "a"}),
]


@pytest.mark.parametrize(("path", "body"), MUTATIONS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
async def test_mutations_need_the_token(
    server: Server, path: str, body: Any, headers: dict[str, str]
) -> None:
    response = await server.client.post(path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    _error_of(response)
    assert server.fake.scale_events == 0 and server.fake.submitted == 0


async def test_reads_need_no_token(server: Server) -> None:
    for path in ("/api/pipeline", "/api/instances", "/metrics", "/openapi.json", "/"):
        assert (await server.client.get(path)).status_code == 200


async def test_no_token_configured(nursery: trio.Nursery) -> None:
    fake = FakeRuntime()
    port = await _start(nursery, fake, token=None)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post("/api/stages/score/scale", json={"instances": 3})
        assert response.status_code == 200
    assert fake.stages["score"].target == 3


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/api/stages/nope/scale", b'{"instances": 2}', 404),
        ("/api/stages/sum/scale", b'{"instances": 0}', 400),
        ("/api/stages/sum/scale", b'{"instances": -1}', 400),
        ("/api/stages/sum/scale", b'{"instances": "2"}', 400),
        ("/api/stages/sum/scale", b'{"instances": 2.5}', 400),
        ("/api/stages/sum/scale", b'{"instances": true}', 400),
        ("/api/stages/sum/scale", b'{"instances": null}', 400),
        ("/api/stages/sum/scale", b"{}", 400),
        ("/api/stages/sum/scale", b"[2]", 400),
        ("/api/stages/sum/scale", b"{", 400),
        ("/api/stages/sum/scale", b"", 400),
        ("/api/stages/sum/scale", b"\xff\xfe\xfa", 400),
        ("/api/instances/999/drain", b"", 404),
        ("/api/instances/abc/drain", b"", 404),
        (REQUESTS, b"{", 400),
        (REQUESTS, b"[1, 2]", 400),
        (REQUESTS, b'"text"', 400),
        (REQUESTS + "?stream=maybe", b'{"text": "a"}', 400),
        ("/v1/pipelines/other/requests", b'{"text": "a"}', 404),
        ("/api/nothing-here", b"", 404),
    ],
)
async def test_bad_input_is_a_json_4xx(
    server: Server, path: str, content: bytes, status: int
) -> None:
    response = await server.client.post(
        path, content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    _error_of(response)
    assert server.fake.submitted == 0


async def test_wrong_method_is_a_json_405(server: Server) -> None:
    response = await server.client.put("/api/pipeline")
    assert response.status_code == 405
    _error_of(response)


async def test_oversized_body_is_a_json_413(server: Server) -> None:
    response = await server.client.post(REQUESTS, content=b" " * (17 * 1024 * 1024), headers=AUTH)
    assert response.status_code == 413
    _error_of(response)


# -- ingress ---------------------------------------------------------------------------


async def test_ingress_streams_results(server: Server) -> None:
    events = []
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "a bb ccc"}, headers=AUTH
        ) as source:
            assert source.response.status_code == 200
            assert source.response.headers["x-request-id"] == "1"
            async for event in source.aiter_sse():
                events.append((event.event, json.loads(event.data)))
    kinds = [kind for kind, _ in events]
    assert kinds == ["accepted", "result", "result", "result", "done"]
    assert events[0][1] == {"request_id": 1}
    results = [data for kind, data in events if kind == "result"]
    assert [r["output"] for r in results] == [1, 3, 6]
    assert [r["key_path"] for r in results] == [[1, 0], [1, 1], [1, 2]]
    assert all(r["queue"] == "total" and r["request_id"] == 1 for r in results)
    assert events[-1][1]["results"] == 3 and events[-1][1]["latency_s"] > 0
    assert server.fake.completed == 1 and server.fake.in_flight == 0


@pytest.mark.parametrize(
    ("params", "headers"),
    [({"stream": "false"}, {}), ({}, {"Accept": "application/json"})],
    ids=["query", "accept"],
)
async def test_ingress_non_streaming(
    server: Server, params: dict[str, str], headers: dict[str, str]
) -> None:
    response = await server.client.post(
        REQUESTS, params=params, json={"text": "a bb"}, headers={**AUTH, **headers}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["request_id"] == 1 and data["status"] == "done"
    assert data["results"] == [
        {"queue": "total", "key_path": [1, 0], "output": 1},
        {"queue": "total", "key_path": [1, 1], "output": 3},
    ]


async def test_ingress_error_names_stage_and_instance(server: Server) -> None:
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "a b", "fail": True}, headers=AUTH
        ) as source:
            events = [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]
    assert [kind for kind, _ in events] == ["accepted", "error"]
    assert "stage 'score' instance" in events[1][1]["message"]

    response = await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a", "fail": True}, headers=AUTH
    )
    data = response.json()
    assert data["status"] == "error" and "stage 'score'" in data["error"]
    assert server.fake.failed == 2
    instances = (await server.client.get("/api/instances")).json()["instances"]
    assert any(i["last_error"] for i in instances if i["stage"] == "score")
    with trio.fail_after(5):
        async with aconnect_sse(server.client, "GET", "/api/stream") as source:
            async for event in source.aiter_sse():
                recent = json.loads(event.data)["recent_errors"]
                if len(recent) == 2:
                    break
    assert recent[0]["request_id"] == 1 and "score" in recent[0]["message"]


async def test_ingress_overloaded_is_429_with_retry_after(server: Server) -> None:
    server.fake.overloaded = True
    for params in ({}, {"stream": "false"}):
        response = await server.client.post(
            REQUESTS, params=params, json={"text": "a"}, headers=AUTH
        )
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"  # ceil(2.5)
        assert "in flight" in _error_of(response)
    assert server.fake.refused == 2
    families = _metrics((await server.client.get("/metrics")).text)
    refused = [s for s in families["alto_requests"].samples if s.labels.get("status") == "refused"]
    assert refused[0].value == 2


async def test_ingress_client_going_away_closes_the_request(server: Server) -> None:
    server.fake.step_delay = 30  # the request would take minutes
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "slow words"}, headers=AUTH
        ) as source:
            async for event in source.aiter_sse():
                assert event.event == "accepted"
                break
        # The connection is closed: the runtime's result iterator must be closed too.
        while server.fake.in_flight:
            await trio.sleep(0.01)
    assert server.fake.closed_requests == 1
    instances = (await server.client.get("/api/instances")).json()["instances"]
    assert all(i["queue_depth"] == 0 and i["open_groups"] == 0 for i in instances)


# -- binding ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.com", "::"])
async def test_non_loopback_without_token_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        await serve_control(FakeRuntime(), host, 0)


def test_loopback_hosts() -> None:
    assert all(_is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))


async def test_non_loopback_with_token_serves(nursery: trio.Nursery) -> None:
    port: int = await nursery.start(
        partial(serve_control, FakeRuntime(), "0.0.0.0", 0, token=TOKEN)
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/api/pipeline")).status_code == 200


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(FakeRuntime(), token="")


# -- CLI helpers -----------------------------------------------------------------------


async def _cli(func: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await trio.to_thread.run_sync(partial(func, *args, out=out, err=err, **kwargs))
    return code, out.getvalue(), err.getvalue()


async def test_cli_status(server: Server) -> None:
    code, out, err = await _cli(cli.status, server.url, None)
    assert code == 0, err
    assert "pipeline wordcount" in out
    assert "STAGE" in out and "INSTANCE" in out
    assert "least-outstanding" in out and "level 1" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["4", "sum", "ready", "0", "4"] in [line[:5] for line in lines]


async def test_cli_scale_and_drain(server: Server) -> None:
    code, out, err = await _cli(cli.scale, server.url, "score", 3, TOKEN)
    assert code == 0, err
    assert "scaling to 3 instances" in out
    assert server.fake.stages["score"].target == 3
    code, out, err = await _cli(cli.drain, server.url, 2, TOKEN)
    assert code == 0, err
    assert "instance 2" in out


async def test_cli_http_errors_exit_1(server: Server) -> None:
    code, _, err = await _cli(cli.scale, server.url, "score", 3, None)
    assert code == 1 and "401" in err and "Bearer" in err
    code, _, err = await _cli(cli.scale, server.url, "nope", 3, TOKEN)
    assert code == 1 and "unknown stage 'nope'" in err
    code, _, err = await _cli(cli.scale, server.url, "score", 0, TOKEN)
    assert code == 1 and "400" in err
    code, _, err = await _cli(cli.drain, server.url, 999, TOKEN)
    assert code == 1 and "unknown instance 999" in err


async def test_cli_top(server: Server) -> None:
    code, out, err = await _cli(cli.top, server.url.removeprefix("http://"), None, 3)
    assert code == 0, err
    assert out.count("alto top") == 3
    assert "DEPTH" in out and "score" in out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "call",
    [
        partial(cli.status, token=None),
        partial(cli.scale, stage="sum", n=2, token=TOKEN),
        partial(cli.drain, instance_id=1, token=TOKEN),
        partial(cli.top, token=None, iterations=1),
    ],
    ids=["status", "scale", "drain", "top"],
)
async def test_cli_unreachable_exits_2(call: Any) -> None:
    code, _, err = await _cli(call, f"http://127.0.0.1:{_closed_port()}")
    assert code == 2
    assert "cannot reach" in err


# -- SSE keepalive ---------------------------------------------------------------------


async def _raw_sse_lines(
    client: httpx.AsyncClient, method: str, path: str, until: Any, **kwargs: Any
) -> list[str]:
    """The lines of an SSE response as sent (comments included) until ``until(lines)``."""
    lines: list[str] = []
    async with client.stream(method, path, **kwargs) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            lines.append(line)
            if until(lines):
                break
    return lines


async def test_stream_sends_keepalive_comments_while_idle(nursery: trio.Nursery) -> None:
    # A stats interval far longer than the keepalive: between events only comments flow.
    port: int = await nursery.start(
        partial(
            serve_control, FakeRuntime(), "127.0.0.1", 0, stream_interval=30, sse_keepalive=0.02
        )
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with trio.fail_after(10):
            lines = await _raw_sse_lines(
                client, "GET", "/api/stream", lambda ls: ls.count(": keepalive") == 3
            )
    assert lines[:3] == ["retry: 2000", "event: stats", "id: 1"]
    assert lines[3].startswith("data: {")
    # After the first event: keepalive comments, each its own block, and no other event.
    assert lines[4:] == ["", ": keepalive", "", ": keepalive", "", ": keepalive"]


async def test_ingress_stream_sends_keepalive_while_a_stage_works(nursery: trio.Nursery) -> None:
    fake = FakeRuntime(step_delay=0.1)  # three stages: 0.3 s before the first result
    port: int = await nursery.start(
        partial(serve_control, fake, "127.0.0.1", 0, token=TOKEN, sse_keepalive=0.02)
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with trio.fail_after(10):
            lines = await _raw_sse_lines(
                client,
                "POST",
                REQUESTS,
                lambda ls: ls[-1].startswith("event: done"),
                json={"text": "a bb"},
                headers=AUTH,
            )
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events == ["accepted", "result", "result", "done"]
    first_result = lines.index("event: result")
    assert ": keepalive" in lines[:first_result]  # the silence before the first result
    assert fake.completed == 1 and fake.in_flight == 0


async def test_keepalive_body_fills_silence(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"one"
        await trio.sleep(40)
        yield b"two"

    body = KeepaliveBody(source(), 15.0, nursery)
    got = [chunk async for chunk in body]
    assert got == [b"one", KEEPALIVE, KEEPALIVE, b"two"]  # at 0, 15, 30 and 40 s
    await body.aclose()


class _Source:
    """A result stream that records being closed, and blocks until told to go on."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.closed = False
        self.sent = 0
        self.fail = fail

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> bytes:
        if self.sent:
            if self.fail is not None:
                raise self.fail
            await trio.sleep_forever()
        self.sent += 1
        return b"first"

    async def aclose(self) -> None:
        self.closed = True


async def test_keepalive_body_closes_its_source(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    never_read = _Source()
    await KeepaliveBody(never_read, 15.0, nursery).aclose()
    assert never_read.closed  # closed although iteration never started

    source = _Source()
    body = KeepaliveBody(source, 15.0, nursery)
    assert await body.__anext__() == b"first"
    assert await body.__anext__() == KEEPALIVE  # the source blocks: its helper waits in it
    await body.aclose()  # the client went away
    assert source.closed
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()


async def test_keepalive_body_raises_what_its_source_raised(nursery: trio.Nursery) -> None:
    source = _Source(fail=RuntimeError("the stream broke"))
    body = KeepaliveBody(source, 15.0, nursery)
    assert await body.__anext__() == b"first"
    with pytest.raises(RuntimeError, match="the stream broke"):
        await body.__anext__()
    assert source.closed


async def test_stats_events_keepalive(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeRuntime()
    _registry, ingress = open_registry(fake)
    hub = StatsHub(fake, ingress, 60.0)  # no sampler runs: events come from sample() alone
    events = stats_events(hub, 15.0)
    first = await events.__anext__()
    assert first.startswith(b"retry: 2000\nevent: stats\nid: 1\n")
    assert await events.__anext__() == KEEPALIVE
    assert await events.__anext__() == KEEPALIVE
    hub.sample()
    assert (await events.__anext__()).startswith(b"event: stats\nid: 2\n")
    await events.aclose()


@pytest.mark.parametrize("value", [0, -1, 600.5, float("nan"), True, "15"])
def test_sse_keepalive_bounds(value: Any) -> None:
    with pytest.raises(
        ValueError, match=r"sse keepalive must be a number of seconds in \(0, 600\]"
    ):
        create_app(FakeRuntime(), sse_keepalive=value)


@pytest.mark.parametrize("value", [0, 60.5, float("inf")])
def test_stream_interval_bounds(value: float) -> None:
    with pytest.raises(
        ValueError, match=r"stream_interval must be a number of seconds in \(0, 60\]"
    ):
        create_app(FakeRuntime(), stream_interval=value)


# -- cancellation, deadlines, trace context ------------------------------------------------


async def test_cancel_a_running_request(server: Server) -> None:
    server.fake.step_delay = 30  # the request would take minutes
    events: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "slow words"}, headers=AUTH
        ) as source:
            rid = int(source.response.headers["x-request-id"])
            async for event in source.aiter_sse():
                events.append((event.event, json.loads(event.data)))
                if event.event == "accepted":
                    # The mutating endpoint needs the token, as every other one.
                    assert (await server.client.delete(f"/v1/requests/{rid}")).status_code == 401
                    response = await server.client.delete(f"/v1/requests/{rid}", headers=AUTH)
                    assert response.status_code == 202, response.text
                    assert response.json() == {"request_id": rid, "state": "cancelled"}
    # The client's stream ended with the cancellation, explicitly.
    assert [kind for kind, _ in events] == ["accepted", "error"]
    assert events[1][1] == {"request_id": rid, "message": "cancelled through the control plane"}
    assert server.fake.cancelled == 1 and server.fake.in_flight == 0
    again = await server.client.delete(f"/v1/requests/{rid}", headers=AUTH)
    assert again.status_code == 404
    assert _error_of(again) == f"no running request {rid}: already ended (cancelled)"
    unknown = await server.client.delete("/v1/requests/999", headers=AUTH)
    assert unknown.status_code == 404 and "unknown" in _error_of(unknown)
    instances = (await server.client.get("/api/instances")).json()["instances"]
    assert all(i["queue_depth"] == 0 and i["open_groups"] == 0 for i in instances)


@pytest.mark.parametrize(
    ("params", "headers"),
    [({"timeout": "0.05"}, {}), ({}, {"X-Alto-Timeout": "0.05"})],
    ids=["query", "header"],
)
async def test_a_deadline_ends_the_stream_with_an_error(
    server: Server, params: dict[str, str], headers: dict[str, str]
) -> None:
    server.fake.step_delay = 0.02  # three words through three stages: 0.18 s
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client,
            "POST",
            REQUESTS,
            params=params,
            json={"text": "a bb ccc"},
            headers={**AUTH, **headers},
        ) as source:
            events = [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]
    assert events[0][0] == "accepted" and events[-1][0] == "error"
    assert events[-1][1]["message"].startswith("deadline exceeded")
    assert server.fake.timed_out == 1 and server.fake.in_flight == 0
    # A deadline long enough changes nothing.
    response = await server.client.post(
        REQUESTS,
        params={**{k: "30" for k in params}, "stream": "false"},
        json={"text": "a"},
        headers={**AUTH, **{k: "30" for k in headers}},
    )
    assert response.json()["status"] == "done"


@pytest.mark.parametrize(
    ("params", "headers", "message"),
    [
        ({"timeout": "0"}, {}, r"timeout: timeout must be in \(0, 86400\] seconds, got 0.0"),
        ({"timeout": "-1"}, {}, "timeout must be a number of seconds, got '-1'"),
        ({"timeout": "86401"}, {}, r"must be in \(0, 86400\]"),
        ({"timeout": "nan"}, {}, "must be a number of seconds"),
        ({"timeout": "1e999"}, {}, r"must be in \(0, 86400\]"),
        ({"timeout": "1_000"}, {}, "must be a number of seconds"),
        ({"timeout": ["1", "2"]}, {}, "given 2 times"),
        ({}, {"X-Alto-Timeout": "soon"}, "X-Alto-Timeout: timeout must be a number"),
        ({"timeout": "1"}, {"X-Alto-Timeout": "1"}, "not both"),
        ({}, {"traceparent": "00-abc-def-01"}, "malformed traceparent header '00-abc-def-01'"),
        (
            {},
            {"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"},
            "lowercase hex",
        ),
        ({}, {"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}, "invalid traceparent"),
        ({}, {"traceparent": f"ff-{'a' * 32}-00f067aa0ba902b7-01"}, "invalid traceparent"),
    ],
)
async def test_bad_deadlines_and_trace_contexts_are_400s(
    server: Server, params: dict[str, Any], headers: dict[str, str], message: str
) -> None:
    response = await server.client.post(
        REQUESTS, params=params, json={"text": "a"}, headers={**AUTH, **headers}
    )
    assert response.status_code == 400
    assert re.search(message, _error_of(response)), _error_of(response)
    assert server.fake.submitted == 0


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_traceparent_is_continued_and_answered(server: Server) -> None:
    response = await server.client.post(
        REQUESTS,
        params={"stream": "false"},
        json={"text": "a bb"},
        headers={**AUTH, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
    )
    assert response.status_code == 200 and response.json()["status"] == "done"
    rid = int(response.headers["x-request-id"])
    timeline = (await server.client.get(f"/api/requests/{rid}")).json()
    assert timeline["trace"]["trace_id"] == TRACE_ID
    assert timeline["trace"]["parent_span_id"] == CALLER_SPAN
    # The answer names alto's own span for the request, a child of the caller's.
    own_span = timeline["trace"]["span_id"]
    assert len(own_span) == 16 and own_span != CALLER_SPAN
    assert response.headers["traceparent"] == f"00-{TRACE_ID}-{own_span}-01"

    # Without a traceparent the request starts its own trace (sampled: rate 1.0).
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "a"}, headers=AUTH
        ) as source:
            answer = source.response.headers["traceparent"]
            rid = int(source.response.headers["x-request-id"])
            [e async for e in source.aiter_sse()]
    version, trace_id, span, flags = answer.split("-")
    assert (version, flags) == ("00", "01") and len(span) == 16
    timeline = (await server.client.get(f"/api/requests/{rid}")).json()
    assert timeline["trace"]["trace_id"] == trace_id
    assert timeline["trace"]["span_id"] == span

    # A caller that does not sample: no trace, no traceparent in the answer.
    response = await server.client.post(
        REQUESTS,
        params={"stream": "false"},
        json={"text": "a"},
        headers={**AUTH, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00"},
    )
    assert "traceparent" not in response.headers
    rid = int(response.headers["x-request-id"])
    assert (await server.client.get(f"/api/requests/{rid}")).json()["trace"] is None


# -- recent and slowest requests, timelines --------------------------------------------


async def test_recent_and_slowest_requests(server: Server) -> None:
    server.fake.step_delay = 0.01
    texts = ["a", "a bb ccc dddd", "a bb"]  # 3, 12 and 6 steps of 10 ms
    for text in texts:
        response = await server.client.post(
            REQUESTS, params={"stream": "false"}, json={"text": text}, headers=AUTH
        )
        assert response.json()["status"] == "done"
    failed = await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "x", "fail": True}, headers=AUTH
    )
    assert failed.json()["status"] == "error"
    recent = (await server.client.get("/api/requests")).json()
    assert recent["order"] == "recent"
    assert [r["request_id"] for r in recent["requests"]] == [4, 3, 2, 1]
    newest = recent["requests"][0]
    assert newest["status"] == "failed" and "stage 'score'" in newest["error"]
    assert newest["time_to_first_result_s"] is None and newest["results"] == 0
    done = recent["requests"][1]
    assert done["status"] == "done" and done["results"] == 2 and done["traced"] is True
    assert 0 < done["time_to_first_result_s"] <= done["latency_s"] and done["age_s"] >= 0
    slowest = (await server.client.get("/api/requests", params={"order": "slowest"})).json()
    assert [r["request_id"] for r in slowest["requests"]][:3] == [2, 3, 1]
    latencies = [r["latency_s"] for r in slowest["requests"]]
    assert latencies == sorted(latencies, reverse=True)
    two = (await server.client.get("/api/requests", params={"limit": "2"})).json()
    assert [r["request_id"] for r in two["requests"]] == [4, 3]
    for params, message in (
        ({"order": "fastest"}, "order must be one of recent, slowest"),
        ({"order": ""}, "order must be one of recent, slowest"),
        ({"limit": "0"}, r"limit must be an integer in 1\.\.1000"),
        ({"limit": "1001"}, r"limit must be an integer in 1\.\.1000"),
        ({"limit": "ten"}, r"limit must be an integer in 1\.\.1000"),
    ):
        response = await server.client.get("/api/requests", params=params)
        assert response.status_code == 400
        assert re.search(message, _error_of(response))


async def test_a_request_timeline(server: Server) -> None:
    response = await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a bb"}, headers=AUTH
    )
    rid = response.json()["request_id"]
    timeline = (await server.client.get(f"/api/requests/{rid}")).json()
    assert timeline["state"] == "done" and timeline["results"] == 2
    trace = timeline["trace"]
    spans = sorted((s["stage"], tuple(s["key_path"])) for s in trace["spans"])
    # A span per input per stage: the fake's split takes the request once per word.
    assert spans == sorted(
        [("split", (rid,))] * 2 + [(st, (rid, i)) for st in ("score", "sum") for i in (0, 1)]
    )
    hops = [(h["from"], h["queue"], h["to"]) for h in trace["hops"]]
    assert hops[0] == ("ingress", "input", "split")
    assert hops.count(("sum", "total", "sink")) == 2
    unknown = await server.client.get("/api/requests/12345")
    assert unknown.status_code == 404 and "unknown request 12345" in _error_of(unknown)
    assert (await server.client.get("/api/requests/-1")).status_code == 404

    # A running request: its state so far.
    server.fake.step_delay = 30
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "slow"}, headers=AUTH
        ) as source:
            rid = int(source.response.headers["x-request-id"])
            running = (await server.client.get(f"/api/requests/{rid}")).json()
    assert running["state"] == "running" and running["results"] == 0
    assert running["elapsed_s"] >= 0 and running["deadline_in_s"] is None


# -- autoscaling, scale log, gauges ----------------------------------------------------------


async def test_scale_log_and_autoscale_ranges_are_shown(server: Server) -> None:
    server.fake.autoscale["score"] = (1, 3)
    server.fake.log_scale("score", 3, "autoscaler", "queue depth 13 > 4 per instance for 2 s")
    response = await server.client.post(
        "/api/stages/score/scale", json={"instances": 2}, headers=AUTH
    )
    assert response.status_code == 409
    assert _error_of(response).startswith("stage 'score' is autoscaled between 1 and 3 instances")
    response = await server.client.post(
        "/api/stages/sum/scale", json={"instances": 2}, headers=AUTH
    )
    assert response.status_code == 200 and response.json()["autoscale"] is None
    pipeline = (await server.client.get("/api/pipeline")).json()
    stages = {s["name"]: s for s in pipeline["stages"]}
    assert stages["score"]["autoscale"] == {"min": 1, "max": 3}
    assert stages["split"]["autoscale"] is None
    log = [
        (e["stage"], e["from_instances"], e["to_instances"], e["by"]) for e in pipeline["scale_log"]
    ]
    assert log == [("score", 2, 3, "autoscaler"), ("sum", 1, 2, "operator")]
    assert pipeline["scale_log"][0]["reason"] == "queue depth 13 > 4 per instance for 2 s"
    assert pipeline["finished"] == {"done": 0, "failed": 0, "cancelled": 0, "timed_out": 0}
    with trio.fail_after(5):
        async with aconnect_sse(server.client, "GET", "/api/stream") as source:
            async for event in source.aiter_sse():
                data = json.loads(event.data)
                if len(data["scale_log"]) == 2:
                    break
    assert data["scale_log"][0]["reason"].startswith("queue depth 13")
    assert {s["name"]: s["autoscale"] for s in data["stages"]}["score"] == {"min": 1, "max": 3}


async def test_instances_carry_their_gauges(server: Server) -> None:
    server.fake.step_delay = 0.01
    await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a bb"}, headers=AUTH
    )
    instances = (await server.client.get("/api/instances")).json()["instances"]
    gauges = {i["id"]: i["gauges"] for i in instances}
    assert all(set(g) == {"busy_seconds"} for g in gauges.values())
    assert gauges[4]["busy_seconds"] > 0  # the one sum instance worked on both words


async def test_openapi_lists_the_request_endpoints(server: Server) -> None:
    doc = (await server.client.get("/openapi.json")).json()
    assert doc["paths"]["/v1/requests/{request_id}"]["delete"]["security"] == [{"bearer": []}]
    assert set(doc["paths"]["/api/requests"]["get"]["responses"]) == {"200", "400"}
    assert "/api/requests/{request_id}" in doc["paths"]
    ingress = doc["paths"]["/v1/pipelines/{name}/requests"]["post"]
    params = {(p["in"], p["name"]): p["schema"] for p in ingress["parameters"]}
    assert params[("query", "timeout")]["maximum"] == 86400
    assert params[("header", "X-Alto-Timeout")]["exclusiveMinimum"] == 0
    assert "pattern" in params[("header", "traceparent")]
    assert set(ingress["responses"]["200"]["headers"]) == {"X-Request-Id", "traceparent"}


# -- CLI: trace and cancel ---------------------------------------------------------------


async def test_cli_trace(server: Server) -> None:
    await server.client.post(
        REQUESTS, params={"stream": "false"}, json={"text": "a bb"}, headers=AUTH
    )
    code, out, err = await _cli(cli.trace, server.url, 1)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("request 1: done after ") and "2 results" in lines[0]
    assert lines[1].startswith("trace ") and len(lines[1].split()[1]) == 32
    for header in ("STAGE", "SPANS", "FIRST_OUT", "PROCESSING", "FROM"):
        assert header in out
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] != []}
    assert {"split", "score", "sum"} <= set(rows)
    assert re.search(r"^ingress +input +split +1 ", out, re.M), out
    assert re.search(r"^sum +total +sink +2 ", out, re.M), out
    code, out, err = await _cli(cli.trace, server.url, 1, json_output=True)
    assert code == 0 and json.loads(out)["trace"]["request_id"] == 1
    code, _, err = await _cli(cli.trace, server.url, 99)
    assert code == 1 and "unknown request 99" in err


async def test_cli_cancel(server: Server) -> None:
    server.fake.step_delay = 30
    with trio.fail_after(5):
        async with aconnect_sse(
            server.client, "POST", REQUESTS, json={"text": "slow"}, headers=AUTH
        ) as source:
            rid = int(source.response.headers["x-request-id"])
            code, out, err = await _cli(cli.cancel, server.url, rid, TOKEN)
            assert code == 0, err
            assert out == f"request {rid}: cancelled\n"
            events = [e.event async for e in source.aiter_sse()]
    assert events[-1] == "error"
    code, _, err = await _cli(cli.cancel, server.url, rid, TOKEN)
    assert code == 1 and "already ended (cancelled)" in err


def test_render_trace_of_an_untraced_request() -> None:
    text = cli.render_trace(
        {"request_id": 7, "state": "timed_out", "latency_s": 2.0, "results": 1,
         "time_to_first_result_s": 0.5, "error": "deadline exceeded", "trace": None}
    )  # fmt: skip
    assert text.splitlines() == [
        "request 7: timed_out after 2.000 s, 1 result, the first after 0.500 s",
        "error: deadline exceeded",
        "not traced (not sampled: [runtime] trace_sample_rate, or an unsampled traceparent)",
    ]
