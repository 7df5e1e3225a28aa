"""Every request seen: traces exported by a real ``alto serve --trace-file`` checked span by
span, timelines and request lists over HTTP, deadlines and cancellation through the
ingress, metrics that count every door, and the command line's new options.

The real server is ``alto.testing.open_server`` of the demo pipeline (``generate`` fans a
number out into items ``delay`` seconds apart, ``square`` squares each, ``total`` sums a
request's squares): real instance processes, the HTTP control plane on 127.0.0.1 and a
JSON-lines trace file, which is read once the server has stopped (its exporter is shut
down, so everything it was given is written).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

import alto
from alto._cli import main as alto_main
from alto.examples.demo_pb2 import Number
from alto.testing import open_server

ROOT = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``alto ARGV...`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        alto_main(list(argv))
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "demo", "{}", "--timeout", "0"], r"--timeout must be a number of seconds in \(0, 86400\], not 0"),
        (["submit", "demo", "{}", "--timeout", "86401"], r"in \(0, 86400\]"),
        (["submit", "demo", "{}", "--timeout", "nan"], r"in \(0, 86400\]"),
        (["submit", "demo", "{}", "--timeout", "soon"], "not 'soon'"),
        (["serve", "configs/demo.toml", "--sse-keepalive", "0"], r"--sse-keepalive must be a number of seconds in \(0, 600\]"),
        (["serve", "configs/demo.toml", "--sse-keepalive", "601"], r"in \(0, 600\]"),
        (["trace", "-1"], r"expected an integer in 0\.\.9223372036854775807"),
        (["cancel", "x"], "expected an integer"),
    ],
)  # fmt: skip
def test_numbers_on_the_command_line_are_bounded(argv: list[str], message: str) -> None:
    code, _, err = run_cli(*argv)
    assert code == 2
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1  # one line, as every alto error


def test_the_keepalive_help_names_the_control_planes_bounds() -> None:
    from alto.control._stream import DEFAULT_KEEPALIVE_S, MAX_KEEPALIVE_S

    code, out, _ = run_cli("serve", "--help")
    assert code == 0
    assert f"(default {DEFAULT_KEEPALIVE_S:g}, at most {MAX_KEEPALIVE_S:g})" in " ".join(
        out.split()
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trace-file", "/nonexistent-dir/spans.jsonl"], "--trace-file: cannot append to /nonexistent-dir/spans.jsonl"),
        (["--otlp-endpoint", "ftp://collector:4318"], "--otlp-endpoint: expected an http:// or https:// URL"),
        (["--otlp-endpoint", "http://127.0.0.1:4318", "--trace-file", "x.jsonl"], "not both"),
    ],
)  # fmt: skip
def test_bad_trace_options_end_serve_before_anything_starts(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ALTO_TRACE_FILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "alto", "serve", str(ROOT / "configs" / "demo.toml"), "--no-http", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**env, "ALTO_RUN_DIR": str(tmp_path / "run")},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started


# -- a real alto serve -----------------------------------------------------------------------


@dataclass
class Served:
    info: alto.ServeInfo
    client: httpx.AsyncClient
    path: str  # the ingress
    auth: dict[str, str]


@asynccontextmanager
async def serving(tmp_path: Path, trace_file: Path, delay: float) -> AsyncIterator[Served]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    name = f"obs-{os.getpid()}"
    text = text.replace('name = "demo"', f'name = "{name}"')
    text = text.replace("delay = 0.05", f"delay = {delay}")
    (tmp_path / "p.toml").write_text(text)
    (tmp_path / "d.toml").write_text("[runtime]\nstop_timeout = 2.0\n")
    async with open_server(
        tmp_path / "p.toml",
        tmp_path / "d.toml",
        http="127.0.0.1:0",
        trace_file=trace_file,
        sse_keepalive=5.0,
    ) as info:
        assert info.http_url is not None
        auth = {"Authorization": f"Bearer {info.token}"}
        async with httpx.AsyncClient(base_url=info.http_url, timeout=30) as client:
            yield Served(info, client, f"/v1/pipelines/{name}/requests", auth)


def spans_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_trace(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        out.setdefault(span["context"]["trace_id"].removeprefix("0x"), []).append(span)
    return out


def expected_spans(rid: int, n: int) -> Counter[tuple[str, str, str]]:
    """The demo's spans for ``{"value": n}``: (name, alto.stage, alto.key_path). generate
    takes the request; square and total take each item; total closes the request's group."""
    items = [str([rid, i]) for i in range(n)]
    return Counter(
        [("generate process", "generate", str([rid]))]
        + [("square process", "square", k) for k in items]
        + [("total process", "total", k) for k in items]
        + [("total group_closed", "total", str([rid]))]
    )


@pytest.mark.slow
async def test_traces_exported_by_a_real_serve_span_by_span(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    timelines: dict[int, dict[str, Any]] = {}
    async with serving(tmp_path, trace_file, delay=0.01) as s:
        # 1. Through the HTTP ingress, continuing the caller's trace.
        async with aconnect_sse(
            s.client,
            "POST",
            s.path,
            json={"value": 3},
            headers={**s.auth, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        ) as source:
            answered = source.response.headers["traceparent"]
            # the caller's trace, and alto's own span in it (a child of the caller's)
            assert answered.startswith(f"00-{TRACE_ID}-") and answered.endswith("-01")
            assert answered.split("-")[2] != CALLER_SPAN
            continued = int(source.response.headers["x-request-id"])
            events = [e.event async for e in source.aiter_sse()]
        assert events == ["accepted"] + ["result"] * 4 + ["done"]
        # 2. Through the HTTP ingress, a trace of its own.
        response = await s.client.post(
            s.path, params={"stream": "false"}, json={"value": 2}, headers=s.auth
        )
        own = response.json()["request_id"]
        own_trace = response.headers["traceparent"].split("-")[1]
        assert own_trace != TRACE_ID
        # 3. Through the socket door: traced the same way.
        async with alto.open_client(address=f"unix:{s.info.socket_path}", token=s.info.token) as c:
            socket_rid = (await c.run(Number(value=1)))[0].request_id

        for rid in (continued, own, socket_rid):
            response = await s.client.get(f"/api/requests/{rid}")
            assert response.status_code == 200
            timelines[rid] = response.json()
            assert timelines[rid]["state"] == "done"
        listed = (await s.client.get("/api/requests")).json()["requests"]
        assert [r["request_id"] for r in listed] == [socket_rid, own, continued]
        assert all(r["status"] == "done" and r["traced"] for r in listed)

        # `alto trace` reads the same timeline.
        code, out, err = await trio.to_thread.run_sync(
            run_cli, "trace", str(continued), "--url", s.info.http_url or ""
        )
        assert code == 0, err
        assert out.startswith(f"request {continued}: done after ")
        assert f"trace {TRACE_ID}, continuing the caller's span {CALLER_SPAN}" in out
        for stage in ("generate", "square", "total"):
            assert re.search(rf"^{stage} +\d+ +\d+ ", out, re.M), out

        # Metrics: every door's request counted once; the stages' own histograms (the
        # instances report theirs about once a second).
        expected = {"generate": 3, "square": 6, "total": 3 + 6}  # 6 items, 3 group closes
        processing: dict[str, float] = {}
        with trio.fail_after(15):
            while processing != expected:
                text = (await s.client.get("/metrics")).text
                families = {f.name: f for f in text_string_to_metric_families(text)}
                processing = {
                    x.labels["stage"]: x.value
                    for x in getattr(families.get("alto_stage_processing_seconds"), "samples", [])
                    if x.name.endswith("_count")
                }
                await trio.sleep(0.2)
    latency = next(
        x.value
        for x in families["alto_request_latency_seconds"].samples
        if x.name.endswith("_count")
    )
    assert latency == 3

    traces = by_trace(spans_of(trace_file))
    assert set(traces) >= {TRACE_ID, own_trace}
    for rid, trace_id, n in ((continued, TRACE_ID, 3), (own, own_trace, 2)):
        spans = traces[trace_id]
        # Every span of the request shares its trace id, and only its spans have it.
        (root,) = [x for x in spans if x["name"] == "alto.request"]
        assert root["attributes"]["alto.request.id"] == rid
        assert root["attributes"]["alto.request.status"] == "done"
        if trace_id == TRACE_ID:
            assert root["parent_id"] == "0x" + CALLER_SPAN  # the caller's span
            # ... and the ingress answered with the id the span was exported with
            assert answered == f"00-{TRACE_ID}-{root['context']['span_id'][2:]}-01"
        else:
            assert root["parent_id"] is None
        children = [x for x in spans if x is not root]
        assert {x["parent_id"] for x in children} == {root["context"]["span_id"]}
        got = Counter(
            (x["name"], x["attributes"]["alto.stage"], x["attributes"]["alto.key_path"])
            for x in children
        )
        assert got == expected_spans(rid, n)
        # The exported spans are the timeline's spans, one for one.
        timeline = timelines[rid]["trace"]
        assert timeline["trace_id"] == trace_id
        from_timeline = Counter(
            (f"{x['stage']} {x['kind']}", x["stage"], str(x["key_path"])) for x in timeline["spans"]
        )
        assert from_timeline == got
        for x in children:
            assert root["start_time"] <= x["start_time"] <= x["end_time"] <= root["end_time"]
            assert x["attributes"]["alto.outputs"] >= 0
            assert x["events"][0]["name"] == "processing started"
    # The socket client's request has its own trace too.
    socket_trace = timelines[socket_rid]["trace"]["trace_id"]
    assert Counter(
        (x["name"], x["attributes"]["alto.stage"], x["attributes"]["alto.key_path"])
        for x in traces[socket_trace]
        if x["name"] != "alto.request"
    ) == expected_spans(socket_rid, 1)


@pytest.mark.slow
async def test_deadlines_and_cancellation_through_a_real_serve(tmp_path: Path) -> None:
    async with serving(tmp_path, tmp_path / "spans.jsonl", delay=0.5) as s:
        # 6 items 0.5 s apart cannot finish within 0.8 s.
        async with aconnect_sse(
            s.client, "POST", s.path, params={"timeout": "0.8"}, json={"value": 6}, headers=s.auth
        ) as source:
            events = [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]
        assert events[0][0] == "accepted" and events[-1][0] == "error"
        assert events[-1][1]["message"].startswith("deadline exceeded"), events[-1]
        late = events[0][1]["request_id"]

        # DELETE cancels a running request; its client's stream says so.
        async with aconnect_sse(
            s.client, "POST", s.path, json={"value": 6}, headers=s.auth
        ) as source:
            rid = int(source.response.headers["x-request-id"])
            kinds = []
            async for event in source.aiter_sse():
                kinds.append(event.event)
                if event.event == "result":  # the first partial output arrived
                    code, out, err = await trio.to_thread.run_sync(
                        run_cli, "cancel", str(rid), "--url", s.info.http_url or "",
                        "--token", s.info.token,
                    )  # fmt: skip
                    assert (code, out) == (0, f"request {rid}: cancelled\n"), err
            assert kinds[-1] == "error"
        gone = await s.client.delete(f"/v1/requests/{rid}", headers=s.auth)
        assert gone.status_code == 404 and "already ended (cancelled)" in gone.json()["error"]

        timeline = (await s.client.get(f"/api/requests/{late}")).json()
        assert timeline["state"] == "timed_out" and "deadline exceeded" in timeline["error"]
        pipeline = (await s.client.get("/api/pipeline")).json()
        assert pipeline["finished"] == {"done": 0, "failed": 0, "cancelled": 1, "timed_out": 1}
        # Nothing is left anywhere once both ended.
        with trio.fail_after(10):
            while True:
                instances = (await s.client.get("/api/instances")).json()["instances"]
                if all(i["queue_depth"] == 0 and i["open_groups"] == 0 for i in instances):
                    break
                await trio.sleep(0.1)
        text = (await s.client.get("/metrics")).text
    finished = {
        x.labels["status"]: x.value
        for f in text_string_to_metric_families(text)
        if f.name == "alto_requests_finished"
        for x in f.samples
    }
    assert finished == {"done": 0, "failed": 0, "cancelled": 1, "timed_out": 1}
