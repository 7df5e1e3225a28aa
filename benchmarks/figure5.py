"""The paper's Figure 5: each LM prompt of the FacTool pipeline alone on one GPU.

Each of the pipeline's three LM prompts (question answering, claim extraction, search
query generation) runs as its own one-stage pipeline (``configs/figure5-{qa,claims,
queries}.toml``: the real FacTool stage classes with their real prompts, on one instance of
the emulated engine: Table 1's output sizes and per-token times, continuous batching,
prefill and a prefix cache calibrated to vLLM on an A100). Requests arrive as a Poisson
process at increasing offered loads, raised by ``--factor`` from ``--start`` until the
load is no longer sustained (the point where this prompt saturates its GPU); every point reports achieved load and median and p99 latency, and, as in the
paper, only points with achieved >= 80% of offered count (the others are printed, marked,
and left out of the plot). A point where the ingress refused requests (more than the
runtime's ``max_inflight_requests``, 1024, in flight) does not count either: with 12-minute
points a load 20% past saturation still achieves more than 80% of offered, but only by
queueing without end.

The path is alto's own: ``alto.testing.open_pipeline`` runs the real runtime, scheduler,
worker and stage code in this process over socket pairs, under trio's MockClock with
autojump, so a request's latency is what the client sees (for claims and queries: until
the last claim or query token of the request has streamed out and the request is done).
The time axis is the emulated GPU's: alto's own processing costs no virtual time, and
minutes of emulated load run in seconds to a minute or two of real time.

Inputs: SQuAD dev questions for QA; for claims, the emulated QA answer to each question
(so the prompt has Table 1's answer length); for queries, one emulated claim of it.

    python benchmarks/figure5.py --json figure5.json --plot docs/figures/figure5.png
    python benchmarks/figure5.py --fast          # a few seconds: a correctness check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _emulated_load import (
    COUNTED,
    LoadResult,
    bounded,
    open_virtual,
    plot_panels,
    poisson_load,
    rate_sweep,
)
from google.protobuf.message import Message

from alto.engines import EmulatedEngine
from alto.factool.factool_pb2 import Answer, Claim, Question
from alto.retrieval import load_questions

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("qa", "claims", "queries")
LABELS = {"qa": "question answering", "claims": "claim extraction", "queries": "query generation"}


def inputs(prompt: str, n: int) -> list[Message]:
    """``n`` inputs of the prompt's stage, deterministic."""
    questions = load_questions()[::7][:n]
    if prompt == "qa":
        return [Question(id=q.id, question=q.question) for q in questions]
    qa = EmulatedEngine("qa")
    answers = [
        Answer(question_id=q.id, question=q.question, text=qa.plan(q.question)[0])
        for q in questions
    ]
    if prompt == "claims":
        return list(answers)
    claims = EmulatedEngine("claims")
    return [Claim(question_id=a.question_id, text=claims.plan(a.text)[0]) for a in answers]


async def one_point(
    prompt: str, rate: float, seconds: float, requests: list[Message], seed: int
) -> LoadResult:
    """A fresh pipeline (an idle GPU, an empty cache) under one offered load."""
    async with open_virtual(ROOT / "configs" / f"figure5-{prompt}.toml") as p:

        async def run(i: int) -> None:
            await p.run(requests[i % len(requests)])

        return await poisson_load(run, rate, seconds, seed)


async def sweep(
    rates: list[float], seconds: float, pool: int, log: bool
) -> dict[str, list[LoadResult]]:
    out: dict[str, list[LoadResult]] = {}
    for prompt in PROMPTS:
        requests = inputs(prompt, pool)
        out[prompt] = []
        for k, rate in enumerate(rates):
            started = time.perf_counter()
            r = await one_point(prompt, rate, seconds, requests, seed=1000 * k + 7)
            out[prompt].append(r)
            if log:
                print(
                    f"  {prompt} at {rate:g}/s: achieved {r.achieved:.2f}, p50 {r.p50:.2f} s, "
                    f"p99 {r.p99:.2f} s, {r.sent} sent, {r.failed} failed "
                    f"({time.perf_counter() - started:.1f} s real)",
                    file=sys.stderr,
                )
            if not r.counted:
                break  # saturated: the load was not sustained
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--seconds",
        type=bounded(float, 1, 3600),
        default=720,
        help="emulated seconds of arrivals per point (default 720: the paper's 12 minutes)",
    )
    ap.add_argument(
        "--start",
        type=bounded(float, 0.01, 1000),
        default=1.0,
        help="the first offered load, req/s (default 1)",
    )
    ap.add_argument(
        "--factor",
        type=bounded(float, 1.05, 4),
        default=1.25,
        help="each point offers this times the previous load (default 1.25)",
    )
    ap.add_argument(
        "--max-points",
        type=bounded(int, 2, 100),
        default=40,
        help="stop after this many points even if not saturated (default 40)",
    )
    ap.add_argument("--json", metavar="PATH", help="write one object per point")
    ap.add_argument("--plot", metavar="PATH.png", help="write the two panels of Figure 5")
    ap.add_argument(
        "--fast",
        action="store_true",
        help="a coarse sweep of short points, for a correctness check in seconds",
    )
    a = ap.parse_args(argv)
    if a.fast:
        a.seconds, a.start, a.factor = 30.0, 2.0, 2.5
    rates = rate_sweep(a.start, a.factor, a.max_points)
    started = time.perf_counter()
    res = trio.run(
        sweep, rates, a.seconds, 400, not a.fast, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    elapsed = time.perf_counter() - started

    print(
        f"Figure 5: each FacTool LM prompt alone on one emulated GPU (Table 1 timings, "
        f"prefill and prefix cache), Poisson arrivals, {a.seconds:g} emulated s per point, "
        f"offered load x{a.factor:g} from {a.start:g} req/s until not sustained "
        f"({elapsed:.0f} s real)"
    )
    print()
    print("| prompt | offered (req/s) | achieved (req/s) | p50 latency | p99 latency | refused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for prompt, points in res.items():
        for r in points:
            mark = "" if r.counted else " (not sustained)"
            print(
                f"| {prompt} | {r.offered:g} | {r.achieved:.2f}{mark} | {r.p50:.2f} s | {r.p99:.2f} s "
                f"| {r.failed} |"
            )
    print()
    for prompt, points in res.items():
        counted = [r for r in points if r.counted]
        top = max(counted, key=lambda r: r.achieved) if counted else None
        where = f"{top.achieved:.2f} req/s (offered {top.offered:g})" if top else "no point"
        print(f"{prompt}: highest sustained load (achieved >= {COUNTED:.0%} of offered): {where}")

    if a.json:
        rows = [
            {
                "prompt": prompt,
                "offered": r.offered,
                "achieved": round(r.achieved, 4),
                "p50": round(r.p50, 4),
                "p99": round(r.p99, 4),
                "counted": r.counted,
                "sent": r.sent,
                "failed": r.failed,
            }
            for prompt, points in res.items()
            for r in points
        ]
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if a.plot:
        panels = []
        titles = {
            "p50": "(a) Median latency vs achieved load",
            "p99": "(b) P99 latency vs achieved load",
        }
        for stat, name in titles.items():
            lines = {
                LABELS[prompt]: [(r.achieved, getattr(r, stat)) for r in points if r.counted]
                for prompt, points in res.items()
            }
            panels.append(("achieved load (req/s)", f"{stat} latency (s)", name, lines))
        plot_panels(
            a.plot,
            "Each FacTool prompt alone on one emulated GPU (sustained loads: achieved >= 80% of offered)",
            panels,
        )


if __name__ == "__main__":
    main()
