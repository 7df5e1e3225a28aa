"""Prompt-aware routing at the paper's scale: routing policies over emulated GPU instances.

The paper's section 3.2 names the tension and its section 6.2 sketches the remedy: LM
engines reuse the KV cache of a shared prompt prefix, which pays only if requests with
the same prefix go to the same instance (prompt locality), but pinning prompts to
instances loses the freedom to balance load as prompt demand shifts. This benchmark
measures that trade-off with ``--instances`` (default 4) emulated GPU instances of one
LM stage, each with its own prefix cache, under five policies: ``round-robin`` and
``least-outstanding`` (ignore the prompt), ``prompt-sticky`` (consistent hashing with
bounded loads), ``prompt-affinity`` (remembered homes with the same bound) and
``prompt-cost`` (least queue depth plus a modelled cache miss; see
``alto.dataplane._schedulers``).

The workload: ``--templates`` prompt templates (default six, 1k-4k tokens of shared
prefix, e.g. few-shot prompts or retrieved documents) with Zipf frequencies (exponent
``--zipf``, default 1: the top template takes 41% of requests, the last 7%), each request
adding its own 32-256-token tail. The engine is the emulated one: Table 1's QA decoding
(62.5 +- 57.2 tokens at 20.7 ms per token, batch up to 32), prefill at 10k tokens/s in
2048-token chunks, 16-token cache blocks, and ``--cache-tokens`` (default 8192) of prefix
cache per instance, so that one instance holds about three of the six prefixes: the
regime where routing decides the hit rate. (With the engine's default capacity, 114,688
tokens, every template fits on every instance and the policies differ only in balance.)

The path is alto's own: a two-stage pipeline (``dispatch`` names the template as the
prompt key, as an upstream FacTool stage does; ``lm`` is the stage under test) runs in
``alto.testing.open_pipeline``, so every request is routed by the real scheduler class
through the real runtime, on trio's MockClock with autojump: the time axis is the
emulated GPUs'. For each policy, Poisson arrivals at offered loads ``--start``,
``--start + --step``, ... until the load is no longer sustained (achieved below 80% of
offered, as in the paper, or requests refused at the ingress); then per policy: throughput
at the latency target (the highest sustained offered load whose p50 stays under
``--target``), and at the highest load every policy sustains: the prefix-cache hit rate (prompt tokens reused / prompt tokens, from the
engines), imbalance (the LM instances' queue depths sampled every 0.25 s: sum of the
maximum over sum of the mean) and p50/p99 latency.

    python benchmarks/prompt_routing.py --json routing.json --plot routing.png
    python benchmarks/prompt_routing.py --fast      # a few seconds: a correctness check
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _emulated_load import (
    COUNTED,
    ROUTING_PIPELINE,
    LoadResult,
    TemplateLM,
    bounded,
    open_virtual,
    plot_panels,
    poisson_load,
    request_tail,
)

from alto.dataplane import available_schedulers
from alto.factool.factool_pb2 import Question

POLICIES = ("round-robin", "least-outstanding", "prompt-sticky", "prompt-affinity", "prompt-cost")
TEMPLATE_TOKENS = (2048, 3072, 1024, 4096, 1536, 2560)  # the i-th most frequent template's prefix
TAIL = (32, 256)  # request-specific prompt words
SAMPLE = 0.25  # seconds between queue-depth samples


@dataclass(frozen=True, slots=True)
class Point:
    policy: str
    load: LoadResult
    hit_rate: float
    imbalance: float
    prefill_share: float  # of the LM instances' busy time


def toml_inline(options: dict[str, Any]) -> str:
    """A TOML inline table of str, int and float values."""
    parts = [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "{ " + ", ".join(parts) + " }" if parts else "{}"


def pipeline_file(directory: Path, policy: str, args: argparse.Namespace) -> Path:
    spec = ",".join(f"t{i + 1}:{n}" for i, n in enumerate(TEMPLATE_TOKENS[: args.templates]))
    engine = {"profile": "qa", "cache_tokens": args.cache_tokens}
    sched: dict[str, Any] = {}
    if policy == "prompt-cost":
        given = {"miss_cost": args.miss_cost, "cache_keys": args.cache_keys}
        sched = {k: v for k, v in given.items() if v is not None}
    path = directory / f"routing-{policy}.toml"
    path.write_text(
        ROUTING_PIPELINE.format(
            scheduler=policy,
            scheduler_options=toml_inline(sched),
            templates=spec,
            engine_options=toml_inline(engine),
        )
    )
    return path


def requests_for(seed: int, templates: int, zipf: float) -> Any:
    """The i-th request of a point: the same for every policy (a function of seed and i)."""
    weights = [1 / (k + 1) ** zipf for k in range(templates)]
    names = [f"t{k + 1}" for k in range(templates)]

    def make(i: int) -> Question:
        rng = random.Random(f"{seed}:{i}")
        name = rng.choices(names, weights)[0]
        return Question(id=str(i), question=request_tail(rng, *TAIL), gold_pid=name)

    return make


async def one_point(
    config: Path, policy: str, rate: float, seeds: int, args: argparse.Namespace
) -> Point:
    TemplateLM.engines.clear()
    make = requests_for(seeds, args.templates, args.zipf)
    ratios: list[tuple[int, float]] = []
    async with open_virtual(config, instances={"lm": args.instances}) as p:
        assert len(TemplateLM.engines) == args.instances

        async def run(i: int) -> None:
            await p.run(make(i))

        async def sample() -> None:
            while True:
                depths = [
                    s.queue_depth for s in p.runtime.statistics().instances if s.stage == "lm"
                ]
                if sum(depths):
                    ratios.append((max(depths), sum(depths) / len(depths)))
                await trio.sleep(SAMPLE)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            load = await poisson_load(run, rate, args.seconds, seed=seeds)
            nursery.cancel_scope.cancel()
    stats = [e.statistics() for e in TemplateLM.engines]
    prompt = sum(s["prompt_tokens"] for s in stats)
    busy = sum(s["busy_seconds"] for s in stats)
    return Point(
        policy,
        load,
        sum(s["prompt_tokens_reused"] for s in stats) / prompt if prompt else math.nan,
        sum(m for m, _ in ratios) / sum(a for _, a in ratios) if ratios else math.nan,
        sum(s["prefill_seconds"] for s in stats) / busy if busy else math.nan,
    )


async def sweep(args: argparse.Namespace, log: bool) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    with tempfile.TemporaryDirectory() as d:
        for policy in args.policies:
            config = pipeline_file(Path(d), policy, args)
            out[policy] = []
            for k in range(args.max_points):
                rate = round(args.start + k * args.step, 6)
                started = time.perf_counter()
                pt = await one_point(config, policy, rate, 1000 + k, args)
                out[policy].append(pt)
                r = pt.load
                if log:
                    print(
                        f"  {policy} at {rate:g}/s: achieved {r.achieved:.2f}, p50 {r.p50:.2f} s, "
                        f"p99 {r.p99:.2f} s, hit {pt.hit_rate:.0%}, imbalance {pt.imbalance:.2f}, "
                        f"prefill {pt.prefill_share:.0%} of busy ({time.perf_counter() - started:.1f} s real)",
                        file=sys.stderr,
                    )
                if not r.counted:
                    break  # saturated: the load was not sustained
    return out


def summarise(
    res: dict[str, list[Point]], target: float
) -> tuple[float | None, list[dict[str, Any]]]:
    """The common load (the highest offered load every policy sustains) and per policy:
    throughput at the latency target and the metrics at the common load."""
    sustained = [{p.load.offered for p in points if p.load.counted} for points in res.values()]
    common_loads = set.intersection(*sustained) if sustained else set()
    common = max(common_loads) if common_loads else None
    rows = []
    for policy, points in res.items():
        ok = [p for p in points if p.load.counted and p.load.p50 <= target]
        best = max(ok, key=lambda p: p.load.offered) if ok else None
        at = next((p for p in points if p.load.offered == common), None)
        rows.append(
            {
                "policy": policy,
                "throughput_at_target": best.load.offered if best else None,
                "achieved_at_target": best.load.achieved if best else None,
                "common_load": common,
                "hit_rate": at.hit_rate if at else None,
                "imbalance": at.imbalance if at else None,
                "p50": at.load.p50 if at else None,
                "p99": at.load.p99 if at else None,
                "prefill_share": at.prefill_share if at else None,
            }
        )
    return common, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--instances", type=bounded(int, 2, 32), default=4, help="LM instances (default 4)"
    )
    ap.add_argument(
        "--templates",
        type=bounded(int, 2, len(TEMPLATE_TOKENS)),
        default=6,
        help="prompt templates (default 6)",
    )
    ap.add_argument(
        "--zipf",
        type=bounded(float, 0, 4),
        default=1.0,
        help="Zipf exponent of template frequencies (default 1)",
    )
    ap.add_argument(
        "--cache-tokens",
        type=bounded(int, 0, 1 << 24),
        default=8192,
        help="prefix cache per instance, tokens (default 8192)",
    )
    ap.add_argument(
        "--seconds",
        type=bounded(float, 1, 3600),
        default=300,
        help="emulated seconds of arrivals per point (default 300)",
    )
    ap.add_argument(
        "--start",
        type=bounded(float, 0.1, 1000),
        default=4,
        help="first offered load, req/s (default 4)",
    )
    ap.add_argument(
        "--step",
        type=bounded(float, 0.1, 1000),
        default=4,
        help="offered load step, req/s (default 4)",
    )
    ap.add_argument(
        "--max-points",
        type=bounded(int, 1, 100),
        default=30,
        help="at most this many loads per policy (default 30)",
    )
    ap.add_argument(
        "--target",
        type=bounded(float, 0.1, 600),
        default=2.0,
        help="p50 latency target, s (default 2)",
    )
    ap.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated scheduler names"
    )
    ap.add_argument(
        "--miss-cost",
        type=bounded(float, 0, 10_000),
        default=None,
        help="prompt-cost's miss_cost (default: the policy's)",
    )
    ap.add_argument(
        "--cache-keys",
        type=bounded(int, 1, 65_536),
        default=None,
        help="prompt-cost's cache_keys (default: the policy's)",
    )
    ap.add_argument("--json", metavar="PATH", help="write one object per (policy, load) point")
    ap.add_argument("--plot", metavar="PATH.png", help="write latency and hit-rate panels")
    ap.add_argument(
        "--fast",
        action="store_true",
        help="two loads of 10 s per policy, for a correctness check",
    )
    a = ap.parse_args(argv)
    a.policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    if not a.policies or len(a.policies) > 16:
        ap.error(f"--policies: give 1 to 16 scheduler names, got {len(a.policies)}")
    unknown = sorted(set(a.policies) - set(available_schedulers()))
    if unknown:
        ap.error(
            f"--policies: unknown scheduler(s) {', '.join(unknown)}; "
            f"available: {', '.join(available_schedulers())}"
        )
    if a.fast:
        a.seconds, a.start, a.step, a.max_points = 10.0, 6.0, 12.0, 2
    started = time.perf_counter()
    res = trio.run(sweep, a, not a.fast, clock=trio.testing.MockClock(autojump_threshold=0))
    elapsed = time.perf_counter() - started
    common, rows = summarise(res, a.target)

    print(
        f"Prompt-aware routing: {a.instances} emulated GPU instances (Table 1 QA decoding, "
        f"prefill 10k tokens/s, {a.cache_tokens} tokens of prefix cache each), "
        f"{a.templates} templates of {'/'.join(map(str, TEMPLATE_TOKENS[: a.templates]))} "
        f"prefix tokens at Zipf {a.zipf:g} frequencies, {TAIL[0]}-{TAIL[1]}-token tails, "
        f"Poisson arrivals, {a.seconds:g} emulated s per load ({elapsed:.0f} s real)"
    )
    print()
    common_text = f"{common:g} req/s" if common is not None else "none"
    print(
        f"| policy | throughput at p50 <= {a.target:g} s | cache hit rate | imbalance "
        f"| p50 | p99 | prefill share of GPU time |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for row in rows:
        tput = row["throughput_at_target"]
        print(
            f"| {row['policy']} | {f(tput, 'g')} req/s | {f(row['hit_rate'], '.0%')} "
            f"| {f(row['imbalance'], '.2f')} | {f(row['p50'], '.2f')} s | {f(row['p99'], '.2f')} s "
            f"| {f(row['prefill_share'], '.0%')} |"
        )
    print()
    print(
        f"cache hit rate, imbalance (max / mean LM queue depth over time), p50, p99 and "
        f"prefill share at the common load {common_text} (the highest offered load every "
        f"policy sustains: achieved >= {COUNTED:.0%} of offered, none refused)"
    )
    print()
    print("| policy | offered | achieved | p50 | p99 | hit rate | imbalance | refused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for policy, points in res.items():
        for pt in points:
            r = pt.load
            mark = "" if r.counted else " (not sustained)"
            print(
                f"| {policy} | {r.offered:g} | {r.achieved:.2f}{mark} | {r.p50:.2f} s | {r.p99:.2f} s "
                f"| {f(pt.hit_rate, '.0%')} | {f(pt.imbalance, '.2f')} | {r.failed} |"
            )

    if a.json:
        out = [
            {
                "policy": pt.policy,
                "offered": pt.load.offered,
                "achieved": round(pt.load.achieved, 4),
                "p50": round(pt.load.p50, 4),
                "p99": round(pt.load.p99, 4),
                "hit_rate": round(pt.hit_rate, 4),
                "imbalance": round(pt.imbalance, 4),
                "prefill_share": round(pt.prefill_share, 4),
                "counted": pt.load.counted,
                "sent": pt.load.sent,
                "failed": pt.load.failed,
            }
            for points in res.values()
            for pt in points
        ]
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    if a.plot:
        counted = {policy: [p for p in points if p.load.counted] for policy, points in res.items()}

        def value(p: Point, name: str) -> float:
            return float(getattr(p.load if hasattr(p.load, name) else p, name))

        def lines(x: str, y: str) -> dict[str, list[tuple[float, float]]]:
            return {
                policy: [(value(p, x), value(p, y)) for p in points]
                for policy, points in counted.items()
            }

        plot_panels(
            a.plot,
            f"{len(res)} routing policies over {a.instances} emulated GPUs with prefix caches "
            f"(sustained loads: achieved >= 80% of offered)",
            [
                (
                    "achieved load (req/s)",
                    "p50 latency (s)",
                    "(a) Median latency",
                    lines("achieved", "p50"),
                ),
                (
                    "achieved load (req/s)",
                    "p99 latency (s)",
                    "(b) P99 latency",
                    lines("achieved", "p99"),
                ),
                (
                    "offered load (req/s)",
                    "prompt tokens reused",
                    "(c) Prefix-cache hit rate",
                    lines("offered", "hit_rate"),
                ),
            ],
        )


if __name__ == "__main__":
    main()
