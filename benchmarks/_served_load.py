"""Shared by abandon.py and autoscale.py: the emulated FacTool pipeline served in this
process, a Poisson load generator in its own process, and the checks that a run left
nothing behind.

* :func:`write_pipeline` writes ``configs/factool-emulated.toml`` with the retrieval
  stages' compute emulated (``emulate_seconds``, as figure3.py does: the ColBERT query
  encoder and the reranker take their calibrated time per query without using this
  machine's CPU), so that what saturates is the pipeline's emulated GPUs, not 2 cores.
* The server is ``alto.testing.open_server``: ``alto serve`` with real instance processes
  inside the driver's trio run, so the driver reads ``runtime.statistics()``, the scale log
  and request traces directly, every 0.5 s if it likes, without HTTP.
* The load generator (``python benchmarks/_served_load.py --socket ... --out ...``) is a
  separate process with its own socket client (``alto.open_client``): its event loop and
  CPU are not the runtime's. Arrivals are Poisson with a rate that is piecewise constant
  (``--schedule "60:1,60:4,60:1"``: seconds and requests per second per phase). Optionally
  a share of the requests is *abandoned*: the client leaves the request's ``submit`` loop
  at a uniformly drawn time after submission, which cancels the request. The same seed
  gives the same arrivals, questions and abandonment draws whether or not abandonment is
  acted on (``--abandon-act``), so two runs compare the same requests.
* :func:`settle` waits until the runtime is idle; :func:`leftovers` reads what a run left:
  requests in flight, queue depth, credits in use, backlogs, open groups (each must be 0)
  and the LM engines' sequences still active or waiting.

Every request carries a W3C ``traceparent`` whose trace id names the run and the request's
index (:func:`trace_id`), so the driver finds each request's trace whether or not a result
told the client its request id.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from _emulated_load import bounded
from figure3 import ENCODER_SECONDS, RERANK_SECONDS, set_options  # figure3's calibration

ROOT = Path(__file__).resolve().parents[1]
LM_STAGES = ("qa", "claims", "queries")
MAX_PHASES = 16
MAX_RATE = 100.0  # requests per second: far past what one runtime on 2 cores serves
MAX_PHASE_SECONDS = 3600.0


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (NaN for no data)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """``"SECONDS:RATE,..."`` as ``[(seconds, rate), ...]``. Raises ValueError naming the
    bad part and the allowed ranges."""
    phases = []
    for part in text.split(","):
        secs, sep, rate = part.partition(":")
        try:
            s, r = float(secs), float(rate)
        except ValueError:
            raise ValueError(f"schedule phase {part!r}: expected SECONDS:RATE") from None
        if not sep or not 0 < s <= MAX_PHASE_SECONDS or not 0 < r <= MAX_RATE:
            raise ValueError(
                f"schedule phase {part!r}: seconds must be in (0, {MAX_PHASE_SECONDS:g}] "
                f"and the rate in (0, {MAX_RATE:g}] requests/s"
            )
        phases.append((s, r))
    if not 1 <= len(phases) <= MAX_PHASES:
        raise ValueError(f"a schedule has 1..{MAX_PHASES} phases, got {len(phases)}")
    return phases


def arrivals(phases: Sequence[tuple[float, float]], rng: random.Random) -> list[float]:
    """Poisson arrival times (seconds from the start) under a piecewise-constant rate.
    Memorylessness makes restarting the draw at each phase boundary exact."""
    out: list[float] = []
    start = 0.0
    for seconds, rate in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out.append(t)
        start += seconds
    return out


def trace_id(run: int, index: int) -> str:
    """The trace id (32 hex digits, never all zeros) of request ``index`` of run ``run``."""
    return f"a1{run:06x}{index:024x}"


# ---------------------------------------------------------------- configuration


def write_pipeline(workdir: Path, name: str) -> Path:
    """The emulated FacTool pipeline with emulated retrieval, named ``name``."""
    text = (ROOT / "configs" / "factool-emulated.toml").read_text()
    text = text.replace('name = "factool-emulated"', f'name = "{name}"', 1)
    text = set_options(text, "encoder", f"emulate_seconds = {ENCODER_SECONDS}")
    text = set_options(text, "rerank", f"k = 3, emulate_seconds = {RERANK_SECONDS}")
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


def write_deploy(
    source: Path, workdir: Path, name: str, runtime: dict[str, str], replace: dict[str, str]
) -> Path:
    """A copy of deployment file ``source`` with ``[runtime]`` keys added (``runtime``,
    TOML values as text) and exact text replacements (each must match)."""
    text = source.read_text()
    for old, new in replace.items():
        if old not in text:
            raise ValueError(f"{source}: {old!r} not found")
        text = text.replace(old, new)
    extra = "".join(f"{k} = {v}\n" for k, v in runtime.items())
    if "[runtime]\n" in text:
        text = text.replace("[runtime]\n", "[runtime]\n" + extra, 1)
    else:
        text = "[runtime]\n" + extra + text
    path = workdir / f"{name}.deploy.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- driving a run


async def run_loadgen(
    info: Any,
    out: Path,
    *,
    schedule: str,
    seed: int,
    run: int,
    abandon_fraction: float = 0.0,
    abandon_within: float = 0.0,
    abandon_act: bool = False,
    request_timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the load generator process against the server ``info`` (a ServeInfo) and
    return what it wrote: ``{"t0_wall": ..., "records": [...]}``."""
    cmd = [
        sys.executable, __file__, "--socket", info.socket_path, f"--token={info.token}",
        "--schedule", schedule, "--seed", str(seed), "--run", str(run), "--out", str(out),
        "--abandon-fraction", str(abandon_fraction), "--abandon-within", str(abandon_within),
        "--request-timeout", str(request_timeout),
    ]  # fmt: skip
    if abandon_act:
        cmd.append("--abandon-act")
    proc = await trio.run_process(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the load generator exited with code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def settle(runtime: Any, timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until no request is in flight and no instance
    holds a frame; then once more for the instances' next STATS (their gauges, once a
    second). True when it settled."""
    settled = False
    with trio.move_on_after(timeout):
        while True:
            stats = runtime.statistics()
            busy = any(
                i.queue_depth or i.credits_in_use or i.backlog or i.open_groups
                for i in stats.instances
            )
            if not stats.requests_in_flight and not busy:
                settled = True
                break
            await trio.sleep(0.1)
    await trio.sleep(2.5)  # STATS frames come about once a second
    return settled


def leftovers(runtime: Any) -> dict[str, int]:
    """What the runtime and the engines still hold; every value should be 0 when idle."""
    stats = runtime.statistics()
    live = [i for i in stats.instances if i.state not in ("stopped", "crashed")]
    return {
        "requests_in_flight": stats.requests_in_flight,
        "queue_depth": sum(i.queue_depth for i in live),
        "credits_in_use": sum(i.credits_in_use for i in live),
        "backlog": sum(i.backlog for i in live),
        "open_groups": sum(i.open_groups for i in live),
        "pinned_groups": sum(len(g) for g in runtime.pinned_groups().values()),
        "lm_sequences_active": int(
            sum(i.gauges.get("active_sequences", 0) for i in live if i.stage in LM_STAGES)
        ),
        "lm_sequences_waiting": int(
            sum(i.gauges.get("waiting_sequences", 0) for i in live if i.stage in LM_STAGES)
        ),
    }


def lm_tokens(runtime: Any) -> int:
    """Tokens the LM engines generated so far (their ``tokens_generated`` gauges), summed
    over every LM instance that is not stopped."""
    return int(
        sum(
            i.gauges.get("tokens_generated", 0)
            for i in runtime.statistics().instances
            if i.stage in LM_STAGES
        )
    )


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of a step load: ``[start, end)`` seconds from the load's start."""

    start: float
    end: float
    rate: float


def phases_of(schedule: str) -> list[Phase]:
    out, t = [], 0.0
    for seconds, rate in parse_schedule(schedule):
        out.append(Phase(t, t + seconds, rate))
        t += seconds
    return out


# ---------------------------------------------------------------- the load generator


def loadgen(a: argparse.Namespace) -> None:
    """Send the schedule's requests and write one record per request to ``a.out``."""
    import alto
    from alto.factool.factool_pb2 import Question
    from alto.retrieval import load_questions

    qs = load_questions()
    phases = parse_schedule(a.schedule)
    # Separate streams: arrivals, questions and abandonment draws do not depend on each
    # other, nor on whether abandonment is acted on.
    at = arrivals(phases, random.Random(a.seed))
    pick = random.Random(a.seed + 1)
    order = [pick.randrange(len(qs)) for _ in at]
    draw = random.Random(a.seed + 2)
    plan = [(draw.random() < a.abandon_fraction, draw.uniform(0.0, a.abandon_within)) for _ in at]
    records: list[dict[str, Any]] = []
    started: dict[str, float] = {}

    async def main() -> None:
        async with alto.open_client(address="unix:" + a.socket, token=a.token) as client:
            t0 = trio.current_time()
            offset = time.time() - t0  # this loop's clock as wall-clock time
            started["t0_wall"] = t0 + offset  # arrival times count from here

            async def one(i: int) -> None:
                q = qs[order[i]]
                planned, after = plan[i]
                start = trio.current_time()
                rec: dict[str, Any] = {
                    "index": i,
                    "trace_id": trace_id(a.run, i),
                    "arrival": start - t0,
                    "submitted_wall": start + offset,
                    "abandon_planned": planned,
                    "abandon_after": after if planned else None,
                    "results": 0,
                    "first": {},
                    "request_id": None,
                }
                deadline = start + after if planned and a.abandon_act else math.inf
                tp = f"00-{rec['trace_id']}-{random.getrandbits(63) + 1:016x}-01"
                try:
                    msg = Question(id=q.id, question=q.question, gold_pid=q.gold_pid)
                    # submit() is an async generator (typed as an iterator): aclosing() ends
                    # it, and so sends CANCEL, the moment the loop is left.
                    submit: Any = client.submit(msg, timeout=a.request_timeout, traceparent=tp)
                    async with aclosing(submit) as results:
                        with trio.move_on_at(deadline) as scope:
                            async for r in results:
                                rec["results"] += 1
                                rec["first"].setdefault(r.queue, trio.current_time() - start)
                                rec["request_id"] = r.request_id
                            rec["status"] = "done"
                        if scope.cancelled_caught:
                            # Left the loop: the client has sent CANCEL by now. The
                            # abandonment time is the planned one (the client's decision);
                            # how late this loop woke for it is recorded beside it.
                            rec["status"] = "abandoned"
                            rec["abandoned_wall"] = deadline + offset
                            rec["abandon_late"] = trio.current_time() - deadline
                except alto.OverloadedError:
                    rec["status"] = "refused"
                except alto.AltoError as exc:
                    rec["status"] = "failed"
                    rec["error"] = str(exc)[:300]
                rec["done"] = trio.current_time() - t0
                rec["done_wall"] = trio.current_time() + offset
                records.append(rec)

            async with trio.open_nursery() as nursery:
                for i, t in enumerate(at):
                    await trio.sleep_until(t0 + t)
                    nursery.start_soon(one, i)

    trio.run(main)
    records.sort(key=lambda r: r["index"])
    Path(a.out).write_text(json.dumps({"t0_wall": started["t0_wall"], "records": records}))


def main() -> None:
    ap = argparse.ArgumentParser(description="the load generator of abandon.py / autoscale.py")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--schedule", required=True, help="SECONDS:RATE,... (Poisson per phase)")
    ap.add_argument("--seed", type=bounded(int, 0, 2**31), default=1)
    ap.add_argument("--run", type=bounded(int, 0, 0xFFFFFF), default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--abandon-fraction", type=bounded(float, 0, 1), default=0.0)
    ap.add_argument("--abandon-within", type=bounded(float, 0, 600), default=0.0)
    ap.add_argument("--abandon-act", action="store_true")
    ap.add_argument("--request-timeout", type=bounded(float, 1, 3600), default=600.0)
    a = ap.parse_args()
    try:
        parse_schedule(a.schedule)
    except ValueError as exc:
        ap.error(str(exc))
    loadgen(a)


if __name__ == "__main__":
    main()
