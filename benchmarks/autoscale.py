"""Stages follow demand: a step load (low, 4x, low) on the emulated FacTool pipeline with
the LM stages autoscaled, beside the paper's fixed deployment.

For each run, ``alto serve`` runs the emulated FacTool pipeline
(``configs/factool-emulated.toml``: LM stages are the emulated engine calibrated to the
paper's Table 1 with continuous batching, BM25 is real, the query encoder and the reranker
are emulated devices) in this process (``alto.testing.open_server``):

* **fixed**: the paper's deployment, ``configs/factool.deploy.toml`` (QA 2, claims 2,
  queries 3, BM25 4, encoder 1, reranker 4);
* **autoscaled**: ``configs/factool.autoscale.deploy.toml``, the same with QA, claim
  extraction and query generation autoscaled between 1 and 4 instances at a target queue
  depth of 4 sequences per instance (the file says why).

A load generator in its own process (``_served_load.py``, socket client) sends SQuAD
questions as a Poisson process whose rate steps ``--low`` -> ``--high`` -> ``--low``
requests/s, ``--phase-seconds`` each; both runs get the same arrivals (same seed). Every
0.5 s the driver samples each stage's instances (starting, ready or draining: what holds a
GPU) and target from ``runtime.statistics()``, and it keeps every scale event with its
reason (``scale_log``).

Reported per run and phase: requests, p50/p99 latency (client side, by arrival phase),
mean instances per stage; per run the LM instance-seconds; the autoscaler's events with
their reasons; ``--plot PATH.png``: instances per stage over time and latency over time,
both runs; ``--json PATH``. ``--fast`` is a seconds-long correctness run (shorter phases
and autoscaling delays), not a measurement.

    python benchmarks/autoscale.py --plot docs/figures/autoscale.png --json autoscale.json
    python benchmarks/autoscale.py --phase-seconds 300 --low 1 --high 4
    python benchmarks/autoscale.py --fast
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _emulated_load import bounded  # the benchmarks directory is not a package
from _served_load import (
    LM_STAGES,
    ROOT,
    Phase,
    leftovers,
    pct,
    phases_of,
    run_loadgen,
    settle,
    write_deploy,
    write_pipeline,
)

RUNS = (
    ("fixed", ROOT / "configs" / "factool.deploy.toml"),
    ("autoscaled", ROOT / "configs" / "factool.autoscale.deploy.toml"),
)
STAGES = (*LM_STAGES, "bm25", "encoder", "rerank")
SAMPLE_EVERY = 0.5  # seconds
HELD = ("starting", "ready", "draining")  # states in which an instance holds its GPU


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def sample(
    runtime: Any, samples: list[dict[str, Any]], events: dict[tuple[Any, ...], Any]
) -> None:
    """Every SAMPLE_EVERY seconds until cancelled: instances per stage (held, ready,
    target) at wall time ``wall``; and every scale event not seen yet."""
    while True:
        stats = runtime.statistics()
        held = dict.fromkeys(STAGES, 0)
        ready = dict.fromkeys(STAGES, 0)
        for inst in stats.instances:
            if inst.state in HELD:
                held[inst.stage] = held.get(inst.stage, 0) + 1
            if inst.state == "ready":
                ready[inst.stage] = ready.get(inst.stage, 0) + 1
        target = {s.name: s.target_instances for s in stats.stages}
        samples.append({"wall": time.time(), "held": held, "ready": ready, "target": target})
        for ev in stats.scale_log:
            key = (ev.time, ev.stage, ev.from_instances, ev.to_instances, ev.by, ev.reason)
            events.setdefault(key, ev)
        await trio.sleep(SAMPLE_EVERY)


async def one_run(
    name: str, source: Path, a: argparse.Namespace, workdir: Path, run: int
) -> dict[str, Any]:
    from alto.testing import open_server

    tag = f"autoscale-{name}-{os.getpid()}"
    pipeline = write_pipeline(workdir, tag)
    replace = {}
    if a.fast and name == "autoscaled":
        # Phases of seconds: the autoscaler must act within them.
        replace = {"up_delay = 2.0": "up_delay = 1.0", "down_delay = 30.0": "down_delay = 3.0"}
    deploy = write_deploy(source, workdir, tag, {"trace_sample_rate": "0.0"}, replace)
    schedule = ",".join(f"{a.phase_seconds}:{r}" for r in (a.low, a.high, a.low))
    phases = phases_of(schedule)
    samples: list[dict[str, Any]] = []
    events: dict[tuple[Any, ...], Any] = {}
    async with open_server(pipeline, deploy, ready_timeout=900) as info:
        runtime = info.runtime
        # Warm-up at the low rate (engines, sockets, BM25's caches), not reported.
        await run_loadgen(
            info,
            workdir / f"warmup-{name}.json",
            schedule=f"{a.warmup}:{a.low}",
            seed=a.seed + 7,
            run=0,
        )
        await settle(runtime, a.settle_timeout)
        wall_of = time.time() - trio.current_time()  # this run's trio clock as wall time
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample, runtime, samples, events)
            load = await run_loadgen(
                info, workdir / f"{name}.json", schedule=schedule, seed=a.seed, run=run
            )
            settled = await settle(runtime, a.settle_timeout)
            nursery.cancel_scope.cancel()
        left = leftovers(runtime)
    t0 = load["t0_wall"]
    records: list[dict[str, Any]] = load["records"]
    timeline = [
        {"t": round(s["wall"] - t0, 3), **{k: s[k] for k in ("held", "ready", "target")}}
        for s in samples
    ]
    scale_events = [
        {
            "t": round(ev.time + wall_of - t0, 3),
            "stage": ev.stage,
            "from": ev.from_instances,
            "to": ev.to_instances,
            "by": ev.by,
            "reason": ev.reason,
        }
        # Those of the warm-up too (negative times): they set where the load starts from.
        for ev in sorted(events.values(), key=lambda e: e.time)
    ]
    per_phase = [phase_row(p, i, records, timeline) for i, p in enumerate(phases)]
    end = phases[-1].end
    in_load = [s for s in timeline if 0 <= s["t"] < end]
    instance_seconds = {st: sum(s["held"][st] for s in in_load) * SAMPLE_EVERY for st in STAGES}
    done = [r for r in records if r["status"] == "done"]
    return {
        "run": name,
        "deploy": str(source.relative_to(ROOT)),
        "requests": len(records),
        "completed": len(done),
        "failed": sum(1 for r in records if r["status"] in ("failed", "refused")),
        "lost": sum(1 for r in records if r.get("status") not in ("done", "failed", "refused")),
        "p50": pct([r["done_wall"] - r["submitted_wall"] for r in done], 0.5),
        "p99": pct([r["done_wall"] - r["submitted_wall"] for r in done], 0.99),
        "phases": per_phase,
        "instance_seconds": instance_seconds,
        "lm_instance_seconds": sum(instance_seconds[s] for s in LM_STAGES),
        "scale_events": scale_events,
        "timeline": timeline,
        "latencies": [
            [round(r["arrival"], 3), round(r["done_wall"] - r["submitted_wall"], 4)] for r in done
        ],
        "settled": settled,
        "leftovers": left,
        "clean": settled and not any(left.values()),
        "errors": sorted({r["error"] for r in records if r.get("error")})[:5],
    }


def phase_row(
    p: Phase, index: int, records: list[dict[str, Any]], timeline: list[dict[str, Any]]
) -> dict[str, Any]:
    mine = [r for r in records if p.start <= r["arrival"] < p.end]
    lat = [r["done_wall"] - r["submitted_wall"] for r in mine if r["status"] == "done"]
    samples = [s for s in timeline if p.start <= s["t"] < p.end]
    mean = {
        st: (sum(s["held"][st] for s in samples) / len(samples)) if samples else math.nan
        for st in STAGES
    }
    return {
        "phase": index + 1,
        "start": p.start,
        "end": p.end,
        "offered": p.rate,
        "requests": len(mine),
        "achieved": len(mine) / (p.end - p.start),
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "failed": sum(1 for r in mine if r["status"] != "done"),
        "mean_instances": mean,
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| run | phase | offered | requests | p50 | p99 | mean instances qa / claims / queries | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        for p in r["phases"]:
            m = p["mean_instances"]
            rows.append(
                f"| {r['run']} | {p['phase']} ({p['start']:g}-{p['end']:g} s) | {p['offered']:g}/s "
                f"| {p['requests']} | {p['p50']:.2f} s | {p['p99']:.2f} s "
                f"| {m['qa']:.2f} / {m['claims']:.2f} / {m['queries']:.2f} | {p['failed']} |"
            )
    return rows


def events_table(runs: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| run | t (< 0: warm-up) | stage | instances | by | reason |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for r in runs:
        for e in r["scale_events"]:
            rows.append(
                f"| {r['run']} | {e['t']:.1f} s | {e['stage']} | {e['from']} -> {e['to']} "
                f"| {e['by']} | {e['reason']} |"
            )
    return rows


def summary(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in runs:
        left = (
            "nothing left"
            if r["clean"]
            else ", ".join(f"{k} {v}" for k, v in r["leftovers"].items() if v) or "not settled"
        )
        secs = ", ".join(f"{s} {r['instance_seconds'][s]:.0f}" for s in LM_STAGES)
        lines.append(
            f"{r['run']}: {r['requests']} requests, {r['completed']} completed, {r['failed']} failed, "
            f"{r['lost']} lost; p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s; LM instance-seconds "
            f"{r['lm_instance_seconds']:.0f} ({secs}); {len(r['scale_events'])} scale events; "
            f"after the drain: {left}"
        )
    by = {r["run"]: r for r in runs}
    if "fixed" in by and "autoscaled" in by and by["fixed"]["lm_instance_seconds"]:
        ratio = by["autoscaled"]["lm_instance_seconds"] / by["fixed"]["lm_instance_seconds"]
        lines.append(f"autoscaled / fixed LM instance-seconds: {ratio:.2f}")
    return lines


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    colours = {"qa": "tab:blue", "claims": "tab:orange", "queries": "tab:green"}
    styles = {"fixed": "--", "autoscaled": "-"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for ax in (ax1, ax2):
        for p in runs[0]["phases"]:
            if p["offered"] > min(q["offered"] for q in runs[0]["phases"]):
                ax.axvspan(p["start"], p["end"], color="grey", alpha=0.12, linewidth=0)
    # Stages at the same count would hide each other: each is drawn slightly offset.
    offsets = {"qa": -0.06, "claims": 0.0, "queries": 0.06}
    for r in runs:
        ts = [s["t"] for s in r["timeline"]]
        for st in LM_STAGES:
            ax1.step(
                ts,
                [s["held"][st] + offsets[st] for s in r["timeline"]],
                where="post",
                linestyle=styles.get(r["run"], "-"),
                color=colours[st],
                label=f"{st} ({r['run']})",
                linewidth=1.6 if r["run"] == "autoscaled" else 1.0,
            )
    ax1.set_ylabel("instances")
    ax1.set_yticks(range(0, 6))
    ax1.set_title(
        "LM stage instances over time (starting, ready or draining; lines offset by 0.06)"
    )
    ax1.set_xlim(left=0)
    ax1.legend(ncol=2, fontsize=8, loc="upper left")
    ax1.grid(alpha=0.3)
    window = max(5.0, res["phase_seconds"] / 12)
    for r, colour in zip(runs, ("tab:grey", "tab:red"), strict=False):
        pts = sorted(r["latencies"])
        ax2.scatter(
            [p[0] for p in pts], [p[1] for p in pts], s=4, alpha=0.25, color=colour, linewidths=0
        )
        xs, p50s, p99s = [], [], []
        t, end = 0.0, max((p[0] for p in pts), default=0.0)
        while t <= end:
            lat = [p[1] for p in pts if t - window / 2 <= p[0] < t + window / 2]
            if lat:
                xs.append(t)
                p50s.append(pct(lat, 0.5))
                p99s.append(pct(lat, 0.99))
            t += window / 4
        ax2.plot(xs, p50s, color=colour, label=f"{r['run']} p50 ({window:g} s windows)")
        ax2.plot(xs, p99s, color=colour, linestyle=":", label=f"{r['run']} p99")
    ax2.set_xlabel("seconds since the load started (shaded: the 4x phase)")
    ax2.set_ylabel("latency (s), by arrival")
    ax2.set_title("Request latency over time")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.suptitle(
        f"FacTool (emulated LM, Table 1): step load {res['low']:g} -> {res['high']:g} -> "
        f"{res['low']:g} req/s, {res['phase_seconds']:g} s per phase"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def drive(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_before = loadavg()
    runs = []
    for i, (name, source) in enumerate(RUNS, start=1):
        r = await one_run(name, source, a, workdir, i)
        print(
            f"  {name}: {r['requests']} requests, p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, "
            f"{len(r['scale_events'])} scale events, lost {r['lost']}, clean {r['clean']}",
            file=sys.stderr,
            flush=True,
        )
        runs.append(r)
    return {
        "benchmark": "autoscale",
        "pipeline": "configs/factool-emulated.toml (emulated retrieval)",
        "low": a.low,
        "high": a.high,
        "phase_seconds": a.phase_seconds,
        "sample_every": SAMPLE_EVERY,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--low", type=bounded(float, 0.05, 50), default=1.0, help="requests/s")
    ap.add_argument("--high", type=bounded(float, 0.05, 50), default=4.0, help="requests/s")
    ap.add_argument("--phase-seconds", type=bounded(float, 2, 3600), default=180.0)
    ap.add_argument("--warmup", type=bounded(float, 1, 600), default=10.0, help="seconds")
    ap.add_argument("--settle-timeout", type=bounded(float, 1, 3600), default=300.0)
    ap.add_argument("--seed", type=bounded(int, 0, 2**31), default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the figure here (PNG)")
    ap.add_argument("--fast", action="store_true", help="seconds-long correctness run")
    a = ap.parse_args()
    if a.fast:
        a.phase_seconds, a.warmup, a.settle_timeout = 10.0, 2.0, 120.0
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("ALTO_LOG_LEVEL", "WARNING")  # the instances' logs
    # SIGTERM unwinds like Ctrl-C, so that the instance processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("autoscale: terminated"))
    with tempfile.TemporaryDirectory(prefix="alto-autoscale-") as d:
        res = trio.run(drive, a, Path(d))
    print(
        f"Autoscaling: FacTool (emulated LM, Table 1), step load {a.low:g} -> {a.high:g} -> "
        f"{a.low:g} req/s, {a.phase_seconds:g} s per phase; load average {res['loadavg_before']} "
        f"before, {res['loadavg_after']} after (2 shared cores)"
    )
    print()
    print("\n".join(table(res["runs"])))
    print()
    print("\n".join(events_table(res["runs"])))
    print()
    print("\n".join(summary(res["runs"])))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
