"""Soak: ``alto serve`` under mixed, hostile load for minutes; no request may be lost.

The pipeline (written to a temporary directory; its stages are in this file)::

    numbers --split (fan-out)--> items --expand (fan-out x2)--> pairs --work--> squares
        --total (stateful Sum per request)--> totals (sink)

``work`` is stateless and ``idempotent`` (it writes only when done, so a crash never loses
its inputs), ``total`` aggregates every square of a request on one instance. A request
``{"value": n}`` ends with one total, ``sum(k * k for k in range(2 * n))`` over ``2 * n``
items, which every client checks.

``alto serve`` runs as a subprocess (the command line), with ``max_inflight_requests``
small enough for bursts to pass it. For ``--seconds``:

- socket clients (``alto.open_client``) and HTTP clients (the SSE and the JSON ingress)
  submit requests in loops;
- every ``--burst-every`` seconds a burst of ``--burst`` requests at once through both
  doors: past the limit they are refused (429 / OverloadedError), never queued;
- clients that vanish mid-request: a socket client closes its connection after the first
  result, an HTTP client closes its stream after ``accepted``;
- SSE clients of ``/api/stream`` that connect and then never read again;
- every ``--kill-every`` seconds a random instance is SIGKILLed (at most 4 per stage a
  minute, below the runtime's limit of 5 before it stops replacing a stage).

Every request must end with its results or with an error (a killed stateful or fan-out
instance fails the requests that had work on it, naming it): "lost" counts those that did
neither within ``--deadline`` seconds, and must be 0. "vanished" counts the requests whose
client went away on purpose; they are not lost. The runtime's RSS and open file descriptors
(``/proc/<pid>``) are read when it is ready, after the warm-up (a sixth of the run, at most
30 s) and at the end, 6 s after the last request ended (past hypercorn's 5 s keep-alive
timeout, which closes connections that clients left idle).

    .venv/bin/python benchmarks/soak.py                       # 5 minutes
    .venv/bin/python benchmarks/soak.py --seconds 30 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import trio

import alto
from alto.examples.demo_pb2 import Item, Number, Square, Total

HERE = Path(__file__).resolve().parent
TOKEN = "soak-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_INFLIGHT = 48
KILLS_PER_STAGE_A_MINUTE = 4  # the runtime stops replacing a stage past 5 crashes a minute


# -- the pipeline's stages (its instances import this module) -------------------------------


class Split:
    """Fan-out, level 1: ``n`` items."""

    async def process(self, msg: Number, ctx: alto.Context) -> None:
        for i in range(msg.value):
            await ctx.write("items", Item(value=i))


class Expand:
    """Fan-out, level 2: two children per item."""

    async def process(self, msg: Item, ctx: alto.Context) -> None:
        for j in range(2):
            await ctx.write("pairs", Item(value=2 * msg.value + j))


async def work(msg: Item, ctx: alto.Context) -> None:
    """Idempotent: a little work, then its one output (nothing written before)."""
    await anyio.sleep(0.002 * (1 + msg.value % 5))
    await ctx.write("squares", Square(value=msg.value * msg.value, instance=ctx.instance))


PIPELINE = """
[pipeline]
name = "NAME"
input = "numbers"
outputs = ["totals"]

[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.items]
type = "alto.examples.demo_pb2:Item"
[queues.pairs]
type = "alto.examples.demo_pb2:Item"
[queues.squares]
type = "alto.examples.demo_pb2:Square"
[queues.totals]
type = "alto.examples.demo_pb2:Total"

[stages.split]
entry = "soak:Split"
inputs = ["numbers"]
outputs = ["items"]
fanout = true

[stages.expand]
entry = "soak:Expand"
inputs = ["items"]
outputs = ["pairs"]
fanout = true

[stages.work]
entry = "soak:work"
inputs = ["pairs"]
outputs = ["squares"]
idempotent = true
concurrency = 32

[stages.total]
entry = "alto.aggregate:Sum"
inputs = ["squares"]
outputs = ["totals"]
stateful = true
aggregate_level = 1
options = { field = "value", output = "totals", output_field = "total", count_field = "count" }
"""

DEPLOY = f"""
[runtime]
max_inflight_requests = {MAX_INFLIGHT}
stop_timeout = 2.0
[stages.split]
instances = 2
[stages.expand]
instances = 2
[stages.work]
instances = 3
[stages.total]
instances = 2
"""


def expected(n: int) -> tuple[int, int]:
    return sum(k * k for k in range(2 * n)), 2 * n


# -- what happened ------------------------------------------------------------------------


@dataclass
class Door:
    """The outcomes of the requests sent through one door."""

    sent: int = 0
    completed: int = 0  # ended with the exact total
    wrong: int = 0  # ended "done" with a wrong or missing total (must be 0)
    failed: int = 0  # ended with an error that names what failed
    refused: int = 0  # 429 / OverloadedError: past max_inflight_requests
    vanished: int = 0  # the client went away on purpose mid-request
    lost: int = 0  # neither results nor an error within the deadline (must be 0)
    errors: Counter[str] = field(default_factory=Counter)  # failure kinds, for the report

    def fail(self, message: str) -> None:
        self.failed += 1
        self.errors[_kind(message)] += 1


def _kind(message: str) -> str:
    """An error message without its numbers, to count kinds of failures."""
    words = [w for w in message.replace("'", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:10])


@dataclass
class Usage:
    rss_mb: float
    fds: int
    fd_kinds: dict[str, int]  # socket, pipe, anon_inode, file...


def usage(pid: int) -> Usage:
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return Usage(round(rss_kb / 1024, 1), sum(kinds.values()), dict(kinds))


@dataclass
class Soak:
    seconds: float
    deadline: float
    rng: random.Random
    url: str = ""
    socket_path: str = ""
    pipeline: str = ""
    stopping_at: float = 0.0  # trio time at which sending stops
    socket: Door = field(default_factory=Door)
    http: Door = field(default_factory=Door)
    kills: Counter[str] = field(default_factory=Counter)
    kill_times: dict[str, list[float]] = field(default_factory=dict)
    stalled: int = 0  # SSE clients that stopped reading
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (s, RSS MB, fds)
    stopping: trio.Event = field(default_factory=trio.Event)

    # -- one request through each door ---------------------------------------------------

    async def via_socket(self, client: alto.Client, n: int, *, vanish: bool = False) -> None:
        door = self.socket
        door.sent += 1
        total: Total | None = None
        try:
            with trio.move_on_after(self.deadline) as scope:
                async for result in client.submit(Number(value=n)):
                    if vanish:
                        door.vanished += 1  # leaving the loop cancels the request
                        return
                    if isinstance(result.message, Total):
                        total = result.message
            if scope.cancelled_caught:
                door.lost += 1
                return
        except alto.OverloadedError:
            door.refused += 1
            return
        except alto.AltoError as exc:  # RequestFailed, RuntimeUnavailable
            door.fail(str(exc))
            return
        if vanish:  # ended before a first result
            door.vanished += 1
        elif total is not None and (total.total, total.count) == expected(n):
            door.completed += 1
        else:
            door.wrong += 1

    async def via_http(
        self, client: httpx.AsyncClient, n: int, *, stream: bool = True, vanish: bool = False
    ) -> None:
        door = self.http
        door.sent += 1
        path = f"{self.path}{'' if stream else '?stream=false'}"
        with trio.move_on_after(self.deadline) as scope:
            try:
                async with client.stream("POST", path, json={"value": n}) as response:
                    if response.status_code == 429:
                        door.refused += 1
                        return
                    if response.status_code != 200:
                        door.fail(
                            f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                        )
                        return
                    if stream:
                        await self._sse(response, n, vanish)
                    else:
                        self._answer(json.loads(await response.aread()), n)
            except httpx.HTTPError as exc:
                door.fail(f"{type(exc).__name__}: {exc}")
        if scope.cancelled_caught:
            door.lost += 1

    async def _sse(self, response: httpx.Response, n: int, vanish: bool) -> None:
        door = self.http
        event = ""
        totals: list[dict[str, Any]] = []
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if vanish:  # close the stream after the first event: the request is cancelled
                    door.vanished += 1
                    return
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "result" and data["queue"] == "totals":
                    totals.append(data["output"])
                elif event == "done":
                    self._check(totals, n)
                    return
                elif event == "error":
                    door.fail(data["message"])
                    return
        door.fail("the SSE stream ended without done or error")

    def _answer(self, answer: dict[str, Any], n: int) -> None:
        if answer["status"] == "done":
            self._check([r["output"] for r in answer["results"] if r["queue"] == "totals"], n)
        else:
            self.http.fail(answer.get("error", "error without a message"))

    def _check(self, totals: list[dict[str, Any]], n: int) -> None:
        got = [(int(t.get("total", 0)), int(t.get("count", 0))) for t in totals]
        if got == [expected(n)]:
            self.http.completed += 1
        else:
            self.http.wrong += 1

    @property
    def path(self) -> str:
        return f"/v1/pipelines/{self.pipeline}/requests"

    # -- the kinds of load -----------------------------------------------------------------

    async def socket_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        async with alto.open_client(address=f"unix:{self.socket_path}", token=TOKEN) as client:
            while not self.stopping.is_set():
                await self.via_socket(client, rng.randint(1, 6))
                await trio.sleep(rng.uniform(0, 0.05))

    async def http_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        async with _http(self.url) as client:
            while not self.stopping.is_set():
                await self.via_http(client, rng.randint(1, 6), stream=rng.random() < 0.5)
                await trio.sleep(rng.uniform(0, 0.05))

    async def vanishing(self, seed: int) -> None:
        """Clients that leave mid-request: a socket client closes its whole connection; an
        HTTP client closes its stream after the first event."""
        rng = random.Random(seed)
        async with _http(self.url) as http:
            while not self.stopping.is_set():
                if rng.random() < 0.5:
                    async with alto.open_client(
                        address=f"unix:{self.socket_path}", token=TOKEN
                    ) as client:
                        await self.via_socket(client, rng.randint(3, 8), vanish=True)
                else:
                    await self.via_http(http, rng.randint(3, 8), vanish=True)
                await trio.sleep(rng.uniform(0.05, 0.3))

    async def bursts(self, every: float, size: int) -> None:
        """Now and then, many requests at once through both doors: past the in-flight
        limit they are refused, never queued."""
        async with (
            alto.open_client(address=f"unix:{self.socket_path}", token=TOKEN) as client,
            _http(self.url, connections=size) as http,
        ):
            while True:
                with trio.move_on_at(self.stopping_at):
                    await trio.sleep(every)
                if self.stopping.is_set() or trio.current_time() >= self.stopping_at:
                    return
                async with trio.open_nursery() as nursery:
                    for i in range(size):
                        if i % 2:
                            nursery.start_soon(self.via_socket, client, 2)
                        else:
                            nursery.start_soon(partial(self.via_http, http, 2, stream=False))

    async def stalled_streams(self, count: int) -> None:
        """SSE clients of /api/stream that read the response head, then nothing more."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        socks = []
        try:
            for _ in range(count):
                sock = trio.socket.socket()
                await sock.connect((host, int(port)))
                await sock.send(b"GET /api/stream HTTP/1.1\r\nHost: soak\r\n\r\n")
                await sock.recv(1024)  # the head and perhaps a first event; then silence
                socks.append(sock)
                self.stalled += 1
            await self.stopping.wait()
        finally:
            for sock in socks:
                sock.close()

    async def sample(self, pid: int, started: float) -> None:
        """The runtime's RSS and open descriptors every tenth of the run (at least 5 s)."""
        every = max(5.0, self.seconds / 10)
        while not self.stopping.is_set():
            now = usage(pid)
            self.samples.append((round(trio.current_time() - started), now.rss_mb, now.fds))
            with trio.move_on_after(every):
                await self.stopping.wait()

    async def killer(self, every: float) -> None:
        """SIGKILL a random ready instance every ``every`` seconds."""
        async with _http(self.url) as http:
            while True:
                with trio.move_on_at(self.stopping_at):
                    await trio.sleep(every)
                if trio.current_time() >= self.stopping_at:
                    return
                instances = (await http.get("/api/instances")).json()["instances"]
                now = trio.current_time()
                victims = [
                    i
                    for i in instances
                    if i["state"] == "ready"
                    and i["pid"]
                    and sum(1 for t in self.kill_times.get(i["stage"], []) if now - t < 60)
                    < KILLS_PER_STAGE_A_MINUTE
                ]
                if not victims:
                    continue
                victim = self.rng.choice(victims)
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills[victim["stage"]] += 1
                self.kill_times.setdefault(victim["stage"], []).append(now)


def _http(url: str, connections: int = 8) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30, limits=limits)


# -- the run --------------------------------------------------------------------------------


def start_server(
    work_dir: Path, name: str, log: Any
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``alto serve`` as a subprocess writing to ``log``; returns it and its discovery
    file once it is ready."""
    pipeline = work_dir / "soak.toml"
    pipeline.write_text(PIPELINE.replace("NAME", name))
    deploy = work_dir / "soak.deploy.toml"
    deploy.write_text(DEPLOY)
    env = dict(
        os.environ,
        ALTO_RUN_DIR=str(work_dir / "run"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        ALTO_LOG_LEVEL="WARNING",
    )
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "alto", "serve", str(pipeline), "--deploy", str(deploy),
            "--http", "127.0.0.1:0", "--token", TOKEN,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    discovery = work_dir / "run" / f"{name}.json"
    deadline = time.monotonic() + 180
    while not discovery.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(
                f"alto serve did not start:\n{(work_dir / 'serve.log').read_text()[-3000:]}"
            )
        time.sleep(0.1)
    return proc, json.loads(discovery.read_text())


async def soak(args: argparse.Namespace, info: dict[str, Any], pid: int) -> dict[str, Any]:
    state = Soak(seconds=args.seconds, deadline=args.deadline, rng=random.Random(args.seed))
    state.url, state.socket_path, state.pipeline = info["http"], info["socket"], info["pipeline"]
    ready = usage(pid)
    warmup = min(30.0, args.seconds / 6)
    started = trio.current_time()
    state.stopping_at = started + args.seconds
    warm: Usage | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.stalled_streams, args.stalled)
        for k in range(args.clients):
            nursery.start_soon(state.socket_loop, args.seed * 1000 + k)
            nursery.start_soon(state.http_loop, args.seed * 1000 + 500 + k)
        nursery.start_soon(state.vanishing, args.seed)
        nursery.start_soon(state.bursts, args.burst_every, args.burst)
        nursery.start_soon(state.killer, args.kill_every)
        nursery.start_soon(state.sample, pid, started)
        await trio.sleep(warmup)
        warm = usage(pid)
        await trio.sleep_until(state.stopping_at)
        # Stop sending; every request already sent runs to its end (or its deadline).
        state.stopping.set()
    ran = trio.current_time() - started
    # Measured once what the clients left has been let go: hypercorn closes a connection
    # left idle after 5 s (its keep_alive_timeout).
    await trio.sleep(6.0)
    async with _http(state.url) as http:
        stats = (await http.get("/api/pipeline")).json()
    end = usage(pid)
    assert warm is not None
    doors = {"socket": state.socket, "http": state.http}
    total = Door()
    for door in doors.values():
        for key in ("sent", "completed", "wrong", "failed", "refused", "vanished", "lost"):
            setattr(total, key, getattr(total, key) + getattr(door, key))
        total.errors.update(door.errors)
    return {
        "seconds": round(ran, 1),
        "doors": {
            name: {k: v for k, v in asdict(d).items() if k != "errors"} for name, d in doors.items()
        },
        "all": {k: v for k, v in asdict(total).items() if k != "errors"},
        "failure_kinds": dict(total.errors.most_common(8)),
        "kills": dict(state.kills),
        "stalled_streams": state.stalled,
        "runtime": {
            "pid": pid,
            "ready": asdict(ready),
            "warm": asdict(warm),
            "end": asdict(end),
            "requests_in_flight_at_end": stats["requests"]["in_flight"],
            "samples": state.samples,
        },
    }


def table(result: dict[str, Any]) -> str:
    rows = ["| door | sent | completed | failed cleanly | refused | vanished | lost | wrong |"]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, d in [*result["doors"].items(), ("all", result["all"])]:
        rows.append(
            f"| {name} | {d['sent']} | {d['completed']} | {d['failed']} | {d['refused']} "
            f"| {d['vanished']} | {d['lost']} | {d['wrong']} |"
        )
    rt = result["runtime"]
    kills = ", ".join(f"{stage} {n}" for stage, n in sorted(result["kills"].items()))
    rows += [
        "",
        f"{result['seconds']} s; instances SIGKILLed: {sum(result['kills'].values())} ({kills}); "
        f"SSE clients that stopped reading: {result['stalled_streams']}",
        f"runtime (pid {rt['pid']}): RSS {rt['ready']['rss_mb']} MB ready, "
        f"{rt['warm']['rss_mb']} MB after warm-up, {rt['end']['rss_mb']} MB at the end; "
        f"open fds {rt['ready']['fds']} / {rt['warm']['fds']} / {rt['end']['fds']}; "
        f"requests in flight at the end: {rt['requests_in_flight_at_end']}",
        "RSS (MB) and open fds during the run: "
        + ", ".join(f"{t} s: {rss} / {fds}" for t, rss, fds in rt["samples"]),
    ]
    if result["failure_kinds"]:
        rows.append("failures by kind: " + "; ".join(
            f"{n} x {kind}" for kind, n in result["failure_kinds"].items()
        ))  # fmt: skip
    return "\n".join(rows)


def _bounded(low: float, high: float, kind: type = float) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}..{high}, got {text}")
        return value

    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=_bounded(5, 24 * 3600), default=300.0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--clients", type=_bounded(1, 64, int), default=4, help="per door")
    ap.add_argument("--deadline", type=_bounded(5, 600), default=60.0, help="per request, s")
    ap.add_argument("--kill-every", type=_bounded(0.5, 3600), default=5.0)
    ap.add_argument("--burst-every", type=_bounded(1, 3600), default=10.0)
    ap.add_argument("--burst", type=_bounded(1, 2000, int), default=4 * MAX_INFLIGHT)
    ap.add_argument("--stalled", type=_bounded(0, 200, int), default=8)
    ap.add_argument("--seed", type=_bounded(0, 2**31, int), default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="alto-soak-") as tmp:
        name = f"soak-{os.getpid()}"
        with open(Path(tmp) / "serve.log", "wb") as log:
            proc, info = start_server(Path(tmp), name, log)
            try:
                result = trio.run(soak, args, info, proc.pid)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        result["serve_exit_code"] = proc.returncode
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
