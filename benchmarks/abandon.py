"""Abandoned requests stop costing: the LM tokens a request still gets after its client
left, measured from its trace, beside a run at the same load where nobody leaves.

``alto serve`` runs the emulated FacTool pipeline (``configs/factool-emulated.toml``: LM
stages are the emulated engine calibrated to the paper's Table 1, BM25 is real, the query
encoder and the reranker are emulated devices) on the paper's deployment
(``configs/factool.deploy.toml``) in this process (``alto.testing.open_server``), with every
request traced. A load generator in its own process (``_served_load.py``, socket client)
sends SQuAD questions as a Poisson process at ``--rate`` for ``--seconds``, twice with the
same seed, so both runs get the same requests at the same times:

* **abandonment**: each request is abandoned with probability ``--abandon-fraction``
  (default one half) at a time drawn uniformly from ``[0, --abandon-within]`` seconds
  after its submission: the client leaves the request's ``submit`` loop, which sends
  CANCEL (a request that ended before that time simply completed);
* **no abandonment**: the same requests, every one waited for.

For each abandoned request the driver reads its trace (``runtime.request_timeline``): every
LM span's ``token_times`` (seconds since admission, runtime's clock) after the moment the
client left (its wall time from the load generator, minus the trace's ``admitted_at``) are
tokens generated for nobody. They are reported per request as tokens and as *decoding
steps*: the most tokens any one of its LM sequences generated after the abandonment (the
sequences run in parallel, one token per step each), with the number of sequences that
were running at that moment. The goal is at most one decoding step per request: the step
in progress when the CANCEL arrives may finish, no more.

Also per run: requests, abandoned, completed, failed, lost (no end seen by the client or
the runtime); the latency (p50/p99, client side) of the *live* requests (those not drawn
for abandonment, the same set in both runs); the LM tokens the engines generated (their
``tokens_generated`` gauges) and those the traces account for, per completed request; and
what the runtime and the engines hold once the run has drained (requests in flight, queue
depth, credits in use, backlogs, open groups, LM sequences): all must be 0.

    python benchmarks/abandon.py                     # 2 req/s, 120 s per run
    python benchmarks/abandon.py --rate 3 --seconds 300 --json abandon.json
    python benchmarks/abandon.py --fast              # seconds-long correctness run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _emulated_load import bounded  # the benchmarks directory is not a package
from _served_load import (
    LM_STAGES,
    ROOT,
    leftovers,
    lm_tokens,
    pct,
    run_loadgen,
    settle,
    write_deploy,
    write_pipeline,
)

RUNS = (("abandonment", True), ("no abandonment", False))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def dist(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else math.nan,
        "p50": pct(xs, 0.5),
        "p99": pct(xs, 0.99),
        "max": max(xs) if xs else math.nan,
    }


def lm_spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in trace["spans"] if s.get("stage") in LM_STAGES]


def trace_tokens(trace: dict[str, Any]) -> int:
    return sum(len(s.get("token_times", ())) for s in lm_spans(trace))


def after_abandonment(trace: dict[str, Any], abandoned_wall: float) -> dict[str, Any]:
    """What the LM stages did for a request after its client left at ``abandoned_wall``."""
    t = abandoned_wall - trace["admitted_at"]  # the runtime's clock: seconds since admission
    spans = lm_spans(trace)
    per_seq = [sum(1 for x in s.get("token_times", ()) if x > t) for s in spans]
    ended = [s["ended"] for s in spans if "ended" in s]
    finished = trace["latency_s"]
    return {
        "tokens_before": sum(
            len(s.get("token_times", ())) - n for s, n in zip(spans, per_seq, strict=True)
        ),
        "tokens_after": sum(per_seq),
        "steps_after": max(per_seq, default=0),
        "sequences_running": sum(1 for s in spans if s["started"] <= t < s["ended"]),
        "sequences_started_after": sum(1 for s in spans if s["started"] > t),
        "cancelled_spans": sum(1 for s in trace["spans"] if s.get("status") == "cancelled"),
        # How long after the client left the runtime ended the request, and the last LM
        # sequence of it stopped (0 when everything had stopped before).
        "ended_after_s": (finished - t) if finished is not None else math.nan,
        "lm_stopped_after_s": max(0.0, max(ended, default=t) - t),
    }


async def one_run(
    info: Any,
    name: str,
    act: bool,
    run: int,
    a: argparse.Namespace,
    workdir: Path,
    outcomes: dict[int, Any],
) -> dict[str, Any]:
    runtime = info.runtime
    tokens0 = lm_tokens(runtime)
    seen = set(outcomes)
    load = await run_loadgen(
        info,
        workdir / f"run{run}.json",
        schedule=f"{a.seconds}:{a.rate}",
        seed=a.seed,
        run=run,
        abandon_fraction=a.abandon_fraction,
        abandon_within=a.abandon_within,
        abandon_act=act,
    )
    settled = await settle(runtime, a.settle_timeout)
    left = leftovers(runtime)
    tokens = lm_tokens(runtime) - tokens0
    records: list[dict[str, Any]] = load["records"]
    # The runtime's side: every request that ended during this run, with its trace.
    traces: dict[str, dict[str, Any]] = {}
    status_of: dict[str, str] = {}
    for rid in sorted(set(outcomes) - seen):
        timeline = runtime.request_timeline(rid)
        trace = timeline["trace"] if timeline is not None else None
        if trace is None:
            continue
        traces[trace["trace_id"]] = trace
        status_of[trace["trace_id"]] = outcomes[rid].status
    runtime_status: dict[str, int] = {}
    for s in status_of.values():
        runtime_status[s] = runtime_status.get(s, 0) + 1
    # Lost: the client saw no end, or an admitted request never ended in the runtime.
    lost = [
        r["index"]
        for r in records
        if r.get("status") not in ("done", "failed", "refused", "abandoned")
        or (r["status"] != "refused" and r["trace_id"] not in status_of)
    ]
    done = [r for r in records if r["status"] == "done"]
    live = [r["done_wall"] - r["submitted_wall"] for r in done if not r["abandon_planned"]]
    abandoned = [r for r in records if r["status"] == "abandoned"]
    details = []
    for r in abandoned:
        trace = traces.get(r["trace_id"])
        if trace is None:
            continue
        d = after_abandonment(trace, r["abandoned_wall"])
        d.update(index=r["index"], runtime_status=status_of[r["trace_id"]])
        details.append(d)
    steps = [float(d["steps_after"]) for d in details]
    by_index = {r["index"]: traces.get(r["trace_id"]) for r in records}
    traced_tokens = sum(trace_tokens(t) for t in traces.values())
    return {
        "run": name,
        "offered": a.rate,
        "seconds": a.seconds,
        "requests": len(records),
        "abandoned": len(abandoned),
        "abandon_planned": sum(1 for r in records if r["abandon_planned"]),
        "completed": len(done),
        "failed": sum(1 for r in records if r["status"] == "failed"),
        "refused": sum(1 for r in records if r["status"] == "refused"),
        "lost": len(lost),
        "runtime_outcomes": runtime_status,
        "live_requests": len(live),
        "live_p50": pct(live, 0.5),
        "live_p99": pct(live, 0.99),
        "lm_tokens": tokens,
        "lm_tokens_in_traces": traced_tokens,
        "tokens_per_completed": tokens / len(done) if done else math.nan,
        "abandoned_traced": len(details),
        # Abandoned by the client, yet not cancelled in the runtime: it had finished there
        # before the CANCEL arrived (results in transit), or the client left before its
        # request was accepted (a client that never learnt the request id cannot cancel).
        "abandoned_not_cancelled": sum(1 for d in details if d["runtime_status"] != "cancelled"),
        "tokens_after_abandonment": dist([float(d["tokens_after"]) for d in details]),
        "steps_after_abandonment": dist(steps),
        "sequences_running_at_abandonment": dist([float(d["sequences_running"]) for d in details]),
        "ended_after_s": dist([d["ended_after_s"] for d in details]),
        "lm_stopped_after_s": dist([d["lm_stopped_after_s"] for d in details]),
        "abandon_late_s": dist([r["abandon_late"] for r in abandoned]),
        "goal_met": bool(details) and max(steps) <= 1,
        "settled": settled,
        "leftovers": left,
        "clean": settled and not any(left.values()),
        "errors": sorted({r["error"] for r in records if r.get("error")})[:5],
        "_tokens_by_index": {i: trace_tokens(t) for i, t in by_index.items() if t is not None},
        "_abandoned": details,
    }


def saved(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The work the abandoned requests did against what the same requests cost when
    waited for (the emulated engines' outputs depend only on the prompt, so the same
    question costs the same tokens in both runs)."""
    ab, full = runs[0], runs[1]["_tokens_by_index"]
    spent = [
        (d["tokens_before"] + d["tokens_after"], full.get(d["index"])) for d in ab["_abandoned"]
    ]
    pairs = [(s, f) for s, f in spent if f is not None]
    return {
        "abandoned_requests": len(pairs),
        "tokens_spent": sum(s for s, _ in pairs),
        "tokens_if_waited_for": sum(f for _, f in pairs),
        "share_saved": 1 - sum(s for s, _ in pairs) / max(1, sum(f for _, f in pairs)),
        "lm_tokens_both_runs": (runs[0]["lm_tokens"], runs[1]["lm_tokens"]),
    }


async def drive(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from alto.testing import open_server

    name = f"abandon-{os.getpid()}"
    pipeline = write_pipeline(workdir, name)
    deploy = write_deploy(Path(a.deploy), workdir, name, {"trace_sample_rate": "1.0"}, replace={})
    load_before = loadavg()
    async with open_server(pipeline, deploy, ready_timeout=900) as info:
        runtime = info.runtime
        # Every request's trace is read after its run: keep them all (the default keeps
        # the 256 most recent), a few hundred hops and spans each.
        runtime.tracer.keep = 1_000_000
        outcomes: dict[int, Any] = {}

        def observe(outcome: Any) -> None:
            outcomes[outcome.request_id] = outcome

        runtime.add_request_observer(observe)
        # Warm-up (engines, sockets, BM25's caches), not reported.
        await run_loadgen(
            info, workdir / "warmup.json", schedule=f"{a.warmup}:{a.rate}", seed=a.seed + 7, run=0
        )
        await settle(runtime, a.settle_timeout)
        runs = []
        for i, (run_name, act) in enumerate(RUNS, start=1):
            r = await one_run(info, run_name, act, i, a, workdir, outcomes)
            print(
                f"  {run_name}: {r['requests']} requests, {r['abandoned']} abandoned, "
                f"{r['completed']} completed, lost {r['lost']}, clean {r['clean']}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(r)
    return {
        "benchmark": "abandon",
        "pipeline": "configs/factool-emulated.toml (emulated retrieval)",
        "deploy": _shown(Path(a.deploy)),
        "rate": a.rate,
        "seconds": a.seconds,
        "abandon_fraction": a.abandon_fraction,
        "abandon_within": a.abandon_within,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": runs,
        "saved": saved(runs),
    }


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def f2(x: float, unit: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}{unit}"


def report(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    lines = [
        f"Abandonment: FacTool (emulated LM, Table 1), {res['deploy']}, Poisson {res['rate']:g} req/s "
        f"for {res['seconds']:g} s per run, {res['abandon_fraction']:.0%} abandoned uniformly "
        f"within {res['abandon_within']:g} s; load average {res['loadavg_before']} before, "
        f"{res['loadavg_after']} after (2 shared cores)",
        "",
        "| run | requests | abandoned | completed | failed | lost | live p50 | live p99 | LM tokens (engines / traces) | tokens per completed request | left after drain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        left = (
            "none"
            if r["clean"]
            else ", ".join(f"{k} {v}" for k, v in r["leftovers"].items() if v) or "not settled"
        )
        lines.append(
            f"| {r['run']} | {r['requests']} | {r['abandoned']} | {r['completed']} "
            f"| {r['failed'] + r['refused']} | {r['lost']} | {f2(r['live_p50'], ' s')} "
            f"| {f2(r['live_p99'], ' s')} | {r['lm_tokens']} / {r['lm_tokens_in_traces']} "
            f"| {f2(r['tokens_per_completed'])} | {left} |"
        )
    ab = runs[0]
    t, s, n = (
        ab["tokens_after_abandonment"],
        ab["steps_after_abandonment"],
        ab["sequences_running_at_abandonment"],
    )
    e, w = ab["ended_after_s"], ab["lm_stopped_after_s"]
    lines += [
        "",
        f"After abandonment ({ab['abandoned_traced']} abandoned requests with traces; runtime outcomes of this run: "
        + ", ".join(f"{k} {v}" for k, v in sorted(ab["runtime_outcomes"].items()))
        + "):",
        "",
        "| per abandoned request | mean | p50 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| LM tokens generated after the client left | {f2(t['mean'])} | {t['p50']:g} | {t['p99']:g} | {t['max']:g} |",
        f"| decoding steps after (most tokens of one sequence) | {f2(s['mean'])} | {s['p50']:g} | {s['p99']:g} | {s['max']:g} |",
        f"| LM sequences running when it left | {f2(n['mean'])} | {n['p50']:g} | {n['p99']:g} | {n['max']:g} |",
        f"| the runtime ended it after (ms) | {f2(e['mean'] * 1e3)} | {f2(e['p50'] * 1e3)} | {f2(e['p99'] * 1e3)} | {f2(e['max'] * 1e3)} |",
        f"| its last LM sequence stopped after (ms) | {f2(w['mean'] * 1e3)} | {f2(w['p50'] * 1e3)} | {f2(w['p99'] * 1e3)} | {f2(w['max'] * 1e3)} |",
        "",
        f"goal, within one decoding step of zero per request: {'met' if ab['goal_met'] else 'NOT met'}",
    ]
    sv = res["saved"]
    lines.append(
        f"the {sv['abandoned_requests']} abandoned requests cost {sv['tokens_spent']} LM tokens; waited for, "
        f"the same requests cost {sv['tokens_if_waited_for']} ({sv['share_saved']:.0%} saved); "
        f"all LM tokens: {sv['lm_tokens_both_runs'][0]} with abandonment, {sv['lm_tokens_both_runs'][1]} without"
    )
    late = ab["abandon_late_s"]
    if late["n"]:
        lines.append(
            f"(the load generator woke for its abandonments {f2(late['p50'] * 1e3)} ms late at p50, "
            f"{f2(late['max'] * 1e3)} ms at most; tokens are counted from the planned time)"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=bounded(float, 0.05, 50), default=2.0, help="requests/s")
    ap.add_argument("--seconds", type=bounded(float, 1, 3600), default=120.0, help="per run")
    ap.add_argument("--abandon-fraction", type=bounded(float, 0, 1), default=0.5)
    ap.add_argument("--abandon-within", type=bounded(float, 0.01, 600), default=6.0)
    ap.add_argument("--warmup", type=bounded(float, 1, 600), default=10.0, help="seconds")
    ap.add_argument("--settle-timeout", type=bounded(float, 1, 3600), default=180.0)
    ap.add_argument("--seed", type=bounded(int, 0, 2**31), default=1)
    ap.add_argument("--deploy", default=str(ROOT / "configs" / "factool.deploy.toml"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--fast", action="store_true", help="seconds-long correctness run")
    a = ap.parse_args()
    if a.fast:
        a.seconds, a.warmup, a.abandon_within, a.settle_timeout = 8.0, 2.0, 4.0, 120.0
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("ALTO_LOG_LEVEL", "WARNING")  # the instances' logs
    # SIGTERM unwinds like Ctrl-C, so that the instance processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("abandon: terminated"))
    with tempfile.TemporaryDirectory(prefix="alto-abandon-") as d:
        res = trio.run(drive, a, Path(d))
    print("\n".join(report(res)))
    if a.json:
        for r in res["runs"]:
            r.pop("_tokens_by_index")
            r.pop("_abandoned")
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
