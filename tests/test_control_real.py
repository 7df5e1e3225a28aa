"""The HTTP control plane against a real ``alto serve`` of the demo pipeline.

Each test starts ``alto.serve`` in-process (real worker processes over a real UNIX socket)
with the control plane on 127.0.0.1 port 0 and a bearer token, and talks to it only over
HTTP: status, the live stream, scaling and draining, the request ingress (SSE and JSON),
overload (429), and Prometheus metrics. The browser test drives Debian's chromium against
the same kind of server running in a thread of its own, while requests flow.

The demo pipeline: ``generate`` (fan-out, n items ``delay`` seconds apart) -> ``square``
(stateless) -> ``total`` (stateful Sum, level 1). A request ``{"value": n}`` streams n
``partials`` and then one ``totals`` with ``total == sum(i * i for i in range(n))`` and
``count == n``; two totals would mean an aggregation group was split.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from browser_helpers import depths as shown_depths
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from trio_thread import TrioThread

import alto
from alto.testing import open_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
TOKEN = "real-control-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STAGES = ["generate", "square", "total"]


# -- helpers ---------------------------------------------------------------------------


def write_pipeline(
    tmp_path: Path,
    *,
    delay: float = 0.03,
    instances: tuple[int, int, int] = (1, 2, 2),
    max_inflight: int = 1024,
) -> tuple[Path, Path, str]:
    """The demo pipeline under a unique name, and its deployment (generate, square, total)."""
    name = f"demo-http-{os.getpid()}-{tmp_path.name[-20:]}"
    text = (ROOT / "configs" / "demo.toml").read_text()
    for old, new in (
        ("options = { delay = 0.05 }", f"options = {{ delay = {delay} }}"),
        ('name = "demo"', f'name = "{name}"'),
    ):
        assert old in text, f"configs/demo.toml changed: no {old!r}"
        text = text.replace(old, new)
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(text)
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(
        f"[runtime]\ncredits = 64\nmax_inflight_requests = {max_inflight}\nstop_timeout = 2.0\n"
        + "".join(
            f"[stages.{s}]\ninstances = {n}\n" for s, n in zip(STAGES, instances, strict=True)
        )
    )
    return pipeline, deploy, name


@dataclass
class Real:
    info: alto.ServeInfo
    client: httpx.AsyncClient
    name: str

    @property
    def path(self) -> str:
        return f"/v1/pipelines/{self.name}/requests"


@asynccontextmanager
async def serving(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Real]:
    """A real ``alto serve`` with HTTP on a free port, and a client for it."""
    pipeline, deploy, name = write_pipeline(tmp_path, **kwargs)
    async with open_server(
        pipeline, deploy, http="127.0.0.1:0", token=TOKEN, ready_timeout=60
    ) as info:
        assert info.http_url is not None and info.http_url.startswith("http://127.0.0.1:")
        assert not info.http_url.endswith(":0")
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=info.http_url, timeout=30, limits=limits) as client:
            yield Real(info, client, name)


def expected(n: int) -> int:
    return sum(i * i for i in range(n))


def _int(output: dict[str, Any], field: str) -> int:
    # MessageToDict writes int64 as a string and leaves zero values out.
    return int(output.get(field, 0))


def check_results(results: list[dict[str, Any]], n: int, rid: int) -> tuple[int, list[int]]:
    """Exactly n partials (one per item) then one exact total; returns who did the work."""
    partials = [r for r in results if r["queue"] == "partials"]
    totals = [r for r in results if r["queue"] == "totals"]
    assert len(totals) == 1, f"request {rid}: {len(totals)} totals (a split group emits more)"
    assert len(partials) == n and len(results) == n + 1, (rid, n, results)
    assert results[-1]["queue"] == "totals", "the total is the last result"
    assert all(r["key_path"][0] == rid for r in results), results
    assert sorted(r["key_path"][1] for r in partials) == list(range(n)), partials
    squares = sorted(_int(r["output"], "value") for r in partials)
    assert squares == [i * i for i in range(n)], (n, squares)
    total = totals[0]["output"]
    assert _int(total, "total") == expected(n) and _int(total, "count") == n, (n, total)
    return _int(total, "instance"), [_int(r["output"], "instance") for r in partials]


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    n: int,
    on_accepted: Callable[[], None] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """One request through the SSE ingress: its (event, data) pairs."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with aconnect_sse(client, "POST", path, json={"value": n}, headers=AUTH) as source:
        response = source.response
        if response.status_code != 200:
            raise AssertionError(f"{response.status_code}: {(await response.aread())!r}")
        assert response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            events.append((sse.event, sse.json()))
            if sse.event == "accepted" and on_accepted is not None:
                on_accepted()
    return events


def check_events(events: list[tuple[str, dict[str, Any]]], n: int) -> tuple[int, list[int]]:
    """accepted, n + 1 results (partials, then one total), done."""
    kinds = [kind for kind, _ in events]
    assert kinds == ["accepted", *["result"] * (n + 1), "done"], (n, events)
    rid = events[0][1]["request_id"]
    assert rid > 0 and all(data["request_id"] == rid for _, data in events), events
    done = events[-1][1]
    assert done["results"] == n + 1 and done["latency_s"] > 0, done
    return check_results([data for kind, data in events if kind == "result"], n, rid)


async def until(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after timeout."""
    deadline = trio.current_time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(interval)


async def get_instances(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/api/instances")
    assert response.status_code == 200, response.text
    instances: list[dict[str, Any]] = response.json()["instances"]
    for i in instances:  # credits in use never exceed the credits; depth counts the backlog too
        assert 0 <= i["credits_in_use"] <= i["credits"]
        assert i["queue_depth"] == i["credits_in_use"] + i["backlog"] or i["state"] in (
            "stopped",
            "crashed",
        )
    return instances


def state_counts(instances: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    return dict(collections.Counter((i["stage"], i["state"]) for i in instances))


def metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, **labels: str) -> list[Any]:
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def sample_value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    found = [s for s in samples(families[family], **labels) if s.name == sample]
    assert len(found) == 1, (family, sample, labels, families[family].samples)
    value: float = found[0].value
    return value


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# -- 1. status -------------------------------------------------------------------------


async def test_status_of_the_real_pipeline(tmp_path: Path) -> None:
    async with serving(tmp_path) as real:
        c = real.client
        response = await c.get("/api/pipeline")
        assert response.status_code == 200
        data = response.json()
        assert data["pipeline"] == real.name
        stages = {s["name"]: s for s in data["stages"]}
        assert [s["name"] for s in data["stages"]] == STAGES
        assert {name: s["scheduler"] for name, s in stages.items()} == {
            "generate": "least-outstanding",
            "square": "least-outstanding",
            "total": "consistent-hash",
        }
        assert stages["generate"]["fanout"] is True
        assert stages["total"]["stateful"] is True and stages["total"]["aggregate_level"] == 1
        assert {name: len(s["instances"]) for name, s in stages.items()} == {
            "generate": 1,
            "square": 2,
            "total": 2,
        }
        assert {name: s["target_instances"] for name, s in stages.items()} == {
            "generate": 1,
            "square": 2,
            "total": 2,
        }
        edges = {(e["from"], e["queue"], e["to"], e["routing"]) for e in data["edges"]}
        assert edges == {
            ("ingress", "numbers", "generate", "least-outstanding"),
            ("generate", "items", "square", "least-outstanding"),
            ("square", "squares", "total", "consistent-hash"),
            ("square", "partials", "sink", "sink"),
            ("total", "totals", "sink", "sink"),
        }
        assert {q["name"] for q in data["queues"]} == {
            "numbers",
            "items",
            "squares",
            "partials",
            "totals",
        }
        assert data["requests"]["in_flight"] == 0 and data["requests"]["submitted"] == 0
        assert data["requests"]["max_in_flight"] == 1024

        instances = await get_instances(c)
        assert len(instances) == 5
        assert state_counts(instances) == {
            ("generate", "ready"): 1,
            ("square", "ready"): 2,
            ("total", "ready"): 2,
        }
        for inst in instances:
            assert inst["pid"] and inst["pid"] != os.getpid()
            os.kill(inst["pid"], 0)  # a live worker process of its own
            assert inst["queue_depth"] == 0 and inst["credits"] == 64
            assert inst["id"] in stages[inst["stage"]]["instances"]

        response = await c.get("/openapi.json")
        assert response.status_code == 200
        doc = json.loads(response.text)
        assert doc["openapi"].startswith("3.")
        assert {"/api/pipeline", "/api/instances", "/api/stream", "/metrics"} <= set(doc["paths"])
        assert any(p.startswith("/v1/pipelines/") for p in doc["paths"])


# -- 2. load, live stream and scaling ------------------------------------------------------


async def test_load_with_scaling_while_requests_stream(tmp_path: Path) -> None:
    """60 streaming requests; scale square 2 -> 3 and total 2 -> 3 -> 1 while they flow."""
    values = [5 + (i * 7) % 31 for i in range(60)]  # 5..35 items, 0.03 s apart
    # Requests 0..29 start at once (staggered), 30..44 once total has a third instance,
    # 45..59 after the scale-down: traffic reaches every configuration.
    mid, late = 30, 45
    events: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    failures: dict[int, str] = {}
    accepted: set[int] = set()  # admitted and not done: in flight at the runtime
    in_flight_at: dict[str, int] = {}
    max_depth: dict[int, int] = collections.Counter()
    snapshots = 0
    scaled_up = trio.Event()
    scaled_down = trio.Event()
    drained_with_groups: list[dict[str, Any]] = []

    async with serving(tmp_path, delay=0.03) as real:
        c = real.client
        initial = {i["id"]: i["stage"] for i in await get_instances(c)}

        async def one(i: int, n: int) -> None:
            if i >= late:
                await scaled_down.wait()
                await trio.sleep((i - late) * 0.03)
            elif i >= mid:
                await scaled_up.wait()
                await trio.sleep((i - mid) * 0.04)
            else:
                await trio.sleep(i * 0.05)
            try:
                events[i] = await stream_request(c, real.path, n, lambda: accepted.add(i))
            except Exception as exc:  # reported below with the others
                failures[i] = f"{type(exc).__name__}: {exc}"
            finally:
                accepted.discard(i)

        async def watch_stream() -> None:
            nonlocal snapshots
            async with aconnect_sse(c, "GET", "/api/stream") as source:
                async for sse in source.aiter_sse():
                    assert sse.event == "stats"
                    data = sse.json()
                    snapshots += 1
                    for inst in data["instances"]:
                        max_depth[inst["id"]] = max(max_depth[inst["id"]], inst["queue_depth"])

        async def scale(stage: str, count: int) -> None:
            in_flight_at[f"{stage}->{count}"] = len(accepted)
            response = await c.post(
                f"/api/stages/{stage}/scale", json={"instances": count}, headers=AUTH
            )
            assert response.status_code == 200, response.text
            assert response.json()["target_instances"] == count

        async def ready(stage: str, count: int) -> bool:
            states = state_counts(await get_instances(c))
            return states.get((stage, "ready"), 0) == count

        with trio.fail_after(50):
            async with trio.open_nursery() as outer:
                outer.start_soon(watch_stream)
                async with trio.open_nursery() as load:
                    for i, n in enumerate(values):
                        load.start_soon(one, i, n)

                    async def some_in_flight() -> bool:
                        return len(accepted) >= 10

                    await until(some_in_flight, "10 requests in flight")
                    await scale("square", 3)
                    await scale("total", 3)
                    await until(lambda: ready("square", 3), "a third square instance")
                    await until(lambda: ready("total", 3), "a third total instance")
                    scaled_up.set()
                    new_total = next(
                        i["id"]
                        for i in await get_instances(c)
                        if i["stage"] == "total" and i["id"] not in initial
                    )

                    async def new_total_works() -> bool:
                        states = {i["id"]: i for i in await get_instances(c)}
                        return bool(states[new_total]["frames_out"] > 0)

                    await until(new_total_works, "groups pinned to the new total instance")
                    await scale("total", 1)
                    # The drained aggregators hold pinned groups they must finish.
                    drained_with_groups.extend(
                        i
                        for i in await get_instances(c)
                        if i["state"] == "draining" and i["open_groups"] > 0
                    )
                    scaled_down.set()
                outer.cancel_scope.cancel()

            # The two drained aggregators finish their pinned groups and stop.
            async def settled() -> list[dict[str, Any]] | None:
                instances = await get_instances(c)
                moving = [i for i in instances if i["state"] in ("draining", "starting")]
                return None if moving else instances

            instances = await until(settled, "drained instances to stop")

        pipeline = (await c.get("/api/pipeline")).json()
        families = metrics((await c.get("/metrics")).text)

    assert not failures, list(failures.items())[:3]
    assert sorted(events) == list(range(len(values)))
    total_instances: set[int] = set()
    square_instances: set[int] = set()
    for i, n in enumerate(values):
        total_by, squares_by = check_events(events[i], n)
        total_instances.add(total_by)
        square_instances.update(squares_by)

    # Every scale command was carried out while requests were in flight.
    assert all(count > 0 for count in in_flight_at.values()), in_flight_at
    assert len(in_flight_at) == 3
    # The live stream showed work queued at some instance.
    assert snapshots >= 3
    assert max(max_depth.values()) > 0, max_depth

    assert state_counts(instances) == {
        ("generate", "ready"): 1,
        ("square", "ready"): 3,
        ("total", "ready"): 1,
        ("total", "stopped"): 2,
    }
    new = {i["id"]: i["stage"] for i in instances if i["id"] not in initial}
    assert sorted(new.values()) == ["square", "total"]
    # The new square instance took work; aggregates came from more than one instance.
    assert any(new[iid] == "square" for iid in square_instances & set(new)), square_instances
    assert len(total_instances) >= 2 and new_total in total_instances, total_instances
    assert drained_with_groups, "no aggregator was drained with pinned groups"
    for inst in instances:
        assert inst["queue_depth"] == 0 and inst["open_groups"] == 0, inst

    stages = {s["name"]: s for s in pipeline["stages"]}
    assert {name: s["target_instances"] for name, s in stages.items()} == {
        "generate": 1,
        "square": 3,
        "total": 1,
    }
    assert len(stages["total"]["instances"]) == 1
    assert pipeline["requests"] == {
        "in_flight": 0,
        "max_in_flight": 1024,
        "submitted": len(values),
        "completed": len(values),
        "failed": 0,
        "refused": 0,
    }
    assert pipeline["scale_events"] == 4  # square +1, total +1, total -2
    assert sample_value(families, "alto_requests", "alto_requests_total", status="completed") == 60
    assert sample_value(families, "alto_scale_events", "alto_scale_events_total") == 4
    latency = "alto_request_latency_seconds"
    assert sample_value(families, latency, f"{latency}_count") == 60


# -- 3. non-streaming ingress, refusals, authentication, drain ---------------------------


async def test_json_ingress_refusals_auth_and_drain(tmp_path: Path) -> None:
    async with serving(tmp_path, delay=0.01) as real:
        c = real.client
        path = real.path

        response = await c.post(path, params={"stream": "false"}, json={"value": 7}, headers=AUTH)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["status"] == "done" and body["latency_s"] > 0, body
        results = [{**r, "request_id": body["request_id"]} for r in body["results"]]
        check_results(results, 7, body["request_id"])

        # Accept: application/json asks for the same collected answer.
        headers = {**AUTH, "Accept": "application/json"}
        response = await c.post(path, json={"value": 3}, headers=headers)
        assert response.status_code == 200 and response.json()["status"] == "done"
        assert len(response.json()["results"]) == 4

        # A stage that raises ends its request in an explicit error, not a 4xx or 5xx.
        response = await c.post(path, params={"stream": "false"}, json={"value": -1}, headers=AUTH)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "error" and "value must be >= 0" in body["error"], body

        # Bad input never reaches the runtime.
        for bad, status, words in (
            ({"nope": 1}, 400, ["alto.examples.demo.Number", "nope"]),
            ({"value": "many"}, 400, ["alto.examples.demo.Number"]),
            ([1, 2], 400, ["alto.examples.demo.Number"]),
        ):
            response = await c.post(path, params={"stream": "false"}, json=bad, headers=AUTH)
            assert response.status_code == status, (bad, response.text)
            message = error_of(response)
            assert all(w in message for w in words), message
        response = await c.post(path, content=b"{not json", headers=AUTH)
        assert response.status_code == 400 and "malformed JSON" in error_of(response)
        response = await c.post(path, params={"stream": "maybe"}, json={"value": 1}, headers=AUTH)
        assert response.status_code == 400
        response = await c.post("/v1/pipelines/other/requests", json={"value": 1}, headers=AUTH)
        assert response.status_code == 404 and real.name in error_of(response)

        # Scaling refusals.
        response = await c.post("/api/stages/nope/scale", json={"instances": 2}, headers=AUTH)
        assert response.status_code == 404
        assert all(s in error_of(response) for s in ["nope", *STAGES])
        for bad_count in ({"instances": 0}, {"instances": "2"}, {"count": 2}, {"instances": True}):
            response = await c.post("/api/stages/square/scale", json=bad_count, headers=AUTH)
            assert response.status_code == 400, (bad_count, response.text)
            error_of(response)
        response = await c.post("/api/instances/999/drain", headers=AUTH)
        assert response.status_code == 404 and "999" in error_of(response)

        # No token, or the wrong one: 401 with a Bearer challenge, and nothing happens.
        wrong = {"Authorization": "Bearer not-the-token"}
        square_ids = [i["id"] for i in await get_instances(c) if i["stage"] == "square"]
        requests: tuple[tuple[str, str, dict[str, Any]], ...] = (
            ("POST", "/api/stages/square/scale", {"json": {"instances": 3}}),
            ("POST", "/api/stages/nope/scale", {"json": {"instances": 3}}),
            ("POST", f"/api/instances/{square_ids[0]}/drain", {}),
            ("POST", path, {"json": {"value": 2}}),
            ("POST", path + "?stream=false", {"json": {"value": 2}}),
        )
        for method, url, kwargs in requests:
            for headers in ({}, wrong):
                response = await c.request(method, url, headers=headers, **kwargs)
                assert response.status_code == 401, (url, headers, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                error_of(response)
        pipeline = (await c.get("/api/pipeline")).json()
        assert pipeline["requests"]["submitted"] == 3  # 7, 3 and -1; nothing refused got in
        assert pipeline["requests"]["failed"] == 1
        assert pipeline["scale_events"] == 0
        assert state_counts(await get_instances(c)) == {
            ("generate", "ready"): 1,
            ("square", "ready"): 2,
            ("total", "ready"): 2,
        }

        # Drain one square instance: it stops, and requests go on through the other one.
        response = await c.post(f"/api/instances/{square_ids[0]}/drain", headers=AUTH)
        assert response.status_code == 202
        assert response.json()["instance"] == square_ids[0]
        assert response.json()["state"] in ("draining", "stopped")

        async def drained() -> bool:
            states: dict[int, str] = {i["id"]: i["state"] for i in await get_instances(c)}
            return states[square_ids[0]] == "stopped"

        await until(drained, f"square instance {square_ids[0]} to stop")
        events = await stream_request(c, path, 9)
        _, squares_by = check_events(events, 9)
        assert set(squares_by) == {square_ids[1]}


# -- 4. overload -----------------------------------------------------------------------


async def test_overload_is_a_429_with_retry_after(tmp_path: Path) -> None:
    async with serving(tmp_path, delay=0.3, instances=(1, 1, 1), max_inflight=2) as real:
        c = real.client
        path = real.path
        admitted: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        accepted = 0
        refusals: list[httpx.Response] = []

        def on_accepted() -> None:
            nonlocal accepted
            accepted += 1

        async def long(i: int) -> None:  # four items 0.3 s apart: about 1.2 s in flight
            admitted[i] = await stream_request(c, path, 4, on_accepted)

        async def extra(streaming: bool) -> None:
            params = {} if streaming else {"stream": "false"}
            async with c.stream(
                "POST", path, params=params, json={"value": 2}, headers=AUTH
            ) as response:
                await response.aread()
                refusals.append(response)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long, 0)
                nursery.start_soon(long, 1)

                async def both_accepted() -> bool:
                    return accepted == 2

                await until(both_accepted, "two admitted requests", interval=0.01)
                async with trio.open_nursery() as burst:
                    for streaming in (True, False, True, False):
                        burst.start_soon(extra, streaming)
                assert not admitted, "the admitted requests ended before the burst was refused"
            # Once they are done, there is room again.
            events = await stream_request(c, path, 2)

        check_events(events, 2)
        assert sorted(admitted) == [0, 1]
        for i in admitted:
            check_events(admitted[i], 4)
        assert len(refusals) == 4
        for response in refusals:
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert "limit is 2" in error_of(response)
        requests = (await c.get("/api/pipeline")).json()["requests"]
        assert requests["refused"] == 4 and requests["max_in_flight"] == 2
        assert requests["submitted"] == 3 and requests["completed"] == 3
        families = metrics((await c.get("/metrics")).text)
        assert sample_value(families, "alto_requests", "alto_requests_total", status="refused") == 4
        assert (
            sample_value(families, "alto_max_inflight_requests", "alto_max_inflight_requests") == 2
        )


# -- 5. metrics ------------------------------------------------------------------------


async def test_metrics_count_the_requests(tmp_path: Path) -> None:
    values = [3, 8, 1, 12, 5, 6, 10, 2]
    async with serving(tmp_path, delay=0.02) as real:
        c = real.client
        before = metrics((await c.get("/metrics")).text)
        assert sample_value(before, "alto_requests", "alto_requests_total", status="submitted") == 0
        assert sample_value(before, "alto_relayed_frames", "alto_relayed_frames_total") == 0

        # While a request is generating, the generate instance holds its frame unacknowledged.
        depth_seen: list[float] = []
        async with aconnect_sse(c, "POST", real.path, json={"value": 20}, headers=AUTH) as source:
            async for sse in source.aiter_sse():
                if sse.event == "result" and not depth_seen:
                    during = metrics((await c.get("/metrics")).text)
                    depth_seen = [
                        s.value
                        for s in samples(
                            during["alto_instance_queue_depth_frames"], stage="generate"
                        )
                    ]
                    inflight = "alto_requests_in_flight"
                    assert sample_value(during, inflight, inflight) == 1
        assert depth_seen and max(depth_seen) >= 1, depth_seen

        sent = [20]
        results: dict[int, Any] = {}

        async def one(i: int, n: int) -> None:
            if i % 2:
                results[i] = await stream_request(c, real.path, n)
            else:
                response = await c.post(
                    real.path, params={"stream": "false"}, json={"value": n}, headers=AUTH
                )
                assert response.status_code == 200
                results[i] = response.json()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, n in enumerate(values):
                    nursery.start_soon(one, i, n)
        sent += values
        for i, n in enumerate(values):
            if i % 2:
                check_events(results[i], n)
            else:
                rid = results[i]["request_id"]
                check_results([{**r, "request_id": rid} for r in results[i]["results"]], n, rid)

        failed = await c.post(
            real.path, params={"stream": "false"}, json={"value": -2}, headers=AUTH
        )
        assert failed.json()["status"] == "error"
        instances = await get_instances(c)
        text = (await c.get("/metrics")).text

    families = metrics(text)
    req = "alto_requests"
    counts = {
        s.labels["status"]: s.value for s in samples(families[req]) if s.name == f"{req}_total"
    }
    assert counts == {
        "submitted": len(sent) + 1,
        "completed": len(sent),
        "failed": 1,
        "refused": 0,
    }
    relayed = sample_value(families, "alto_relayed_frames", "alto_relayed_frames_total")
    # each request: its input, n items, n squares, n partials, one total
    assert relayed >= sum(3 * n + 2 for n in sent) + 1, relayed
    depth = families["alto_instance_queue_depth_frames"]
    assert depth.type == "gauge"
    labels = {(s.labels["stage"], s.labels["instance_id"]) for s in depth.samples}
    assert labels == {(i["stage"], str(i["id"])) for i in instances}
    assert all(s.value == 0 for s in depth.samples)
    assert {s.labels["stage"]: s.value for s in families["alto_stage_instances"].samples} == {
        "generate": 1,
        "square": 2,
        "total": 2,
    }
    states = {s.labels["state"] for s in families["alto_instance_info"].samples}
    assert states == {"ready"}
    processed = {
        s.labels["stage"]: s.value
        for s in families["alto_stage_processed_frames"].samples
        if s.name == "alto_stage_processed_frames_total"
    }
    assert processed["square"] == sum(sent), processed
    assert processed["generate"] == len(sent) + 1
    for histogram in ("alto_request_latency_seconds", "alto_request_first_result_seconds"):
        assert families[histogram].type == "histogram"
        assert sample_value(families, histogram, f"{histogram}_count") == len(sent)
    assert sample_value(families, "alto_requests_in_flight", "alto_requests_in_flight") == 0


# -- 6. the dashboard in a browser -------------------------------------------------------


class _RealServerThread(TrioThread[str]):
    """``alto.serve`` plus a load generator in a thread of its own (its own trio.run)."""

    thread_name = "alto-serve-test"
    stop_timeout = 20.0

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.pipeline, self.deploy, self.name = write_pipeline(tmp_path, delay=0.03)
        self.url = ""
        self.completed = 0
        self.errors: list[str] = []

    async def main(self, ready: Callable[[str], None]) -> None:
        async with trio.open_nursery() as nursery:
            async with open_server(
                self.pipeline, self.deploy, http="127.0.0.1:0", token=TOKEN
            ) as info:
                assert info.http_url is not None
                for seed in range(4):
                    nursery.start_soon(self._load, info.http_url, seed)
                ready(info.http_url)
                await trio.sleep_forever()  # until stop() cancels

    async def _load(self, url: str, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            while True:
                n = rng.randint(5, 30)
                try:
                    response = await client.post(
                        f"/v1/pipelines/{self.name}/requests?stream=false", json={"value": n}
                    )
                    body = response.json()
                    rid = body["request_id"]
                    results = [{**r, "request_id": rid} for r in body["results"]]
                    check_results(results, n, rid)
                    self.completed += 1
                except Exception as exc:
                    self.errors.append(f"n={n}: {type(exc).__name__}: {exc}")
                await trio.sleep(rng.uniform(0.0, 0.1))


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[_RealServerThread]:
    thread = _RealServerThread(tmp_path)
    thread.url = thread.start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.mark.browser
@pytest.mark.skipif(
    not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (chromium-driver)",
)
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium")
def test_dashboard_against_a_real_server(real_server: _RealServerThread, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    driver.get(real_server.url + "/")

    def count(selector: str) -> int:
        return len(driver.find_elements(By.CSS_SELECTOR, selector))

    square = '.stage[data-stage="square"] .instance'
    wait.until(lambda d: count('.stage[data-stage="total"] .instance') == 2)
    stages = [
        e.get_attribute("data-stage") for e in driver.find_elements(By.CSS_SELECTOR, ".stage")
    ]
    assert stages == STAGES
    assert count('.stage[data-stage="generate"] .instance') == 1
    assert count(square) == 2
    assert count("#edges path[data-edge]") == 5  # numbers, items, squares, partials, totals
    wait.until(lambda d: d.find_element(By.ID, "conn").text == "live")
    assert driver.find_element(By.ID, "pipeline-name").text == real_server.name

    # Queue depths move while the load generator's requests flow.
    seen: list[dict[str, str]] = []

    def depths_changed(d: Any) -> bool:
        depths = shown_depths(d)
        if not seen or depths != seen[-1]:
            seen.append(depths)
        values = {int(v) for snapshot in seen for v in snapshot.values()}
        return len(seen) >= 3 and max(values) >= 1

    wait.until(depths_changed)
    wait.until(lambda d: d.find_element(By.ID, "lat-p50").text not in ("", "–"))

    # With the token, scaling up square starts a real worker process that registers.
    with httpx.Client(base_url=real_server.url, timeout=10) as client:
        before = {i["id"] for i in client.get("/api/instances").json()["instances"]}
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(
            By.CSS_SELECTOR, '.stage[data-stage="square"] [data-action="scale-up"]'
        ).click()
        wait.until(lambda d: count(square + '[data-state="ready"]') == 3)
        count_text = driver.find_element(By.CSS_SELECTOR, '.stage[data-stage="square"] .count')
        assert count_text.text.endswith("/ 3")

        instances = client.get("/api/instances").json()["instances"]
        new = [i for i in instances if i["id"] not in before]
        assert [(i["stage"], i["state"]) for i in new] == [("square", "ready")], new
        os.kill(new[0]["pid"], 0)  # its own live process

        def new_instance_works(_: Any) -> bool:
            for inst in client.get("/api/instances").json()["instances"]:
                if inst["id"] == new[0]["id"]:
                    return bool(inst["frames_in"] > 0)
            return False

        wait.until(new_instance_works)
        node = f'.instance[data-instance="{new[0]["id"]}"]'
        assert count(f'.stage[data-stage="square"] {node}') == 1

    # Let the charts gather a few seconds of history, then keep a picture.
    wait.until(lambda d: d.execute_script("return performance.now()") > 5000)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-real.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, json.dumps(severe, indent=1)
    assert not real_server.errors, real_server.errors[:3]
    assert real_server.completed >= 5
