"""Load vs latency of the FacTool pipeline, streaming vs baseline (the paper's Figure 3).

LM stages are the emulated engine calibrated to the paper's Table 1 (continuous batching,
per-output timings), so the LM side behaves like GPU instances; BM25 and the MiniLM
reranker are real and run on this machine's 2 CPU cores. For each mode (configs/
factool-emulated.toml, and the same file with ``stream = false``) and each offered load,
requests (SQuAD questions) arrive as a Poisson process for ``--seconds``; the table gives
the achieved load (completed requests / time from the first arrival to the last
completion), and median and p99 end-to-end latency. As in the paper, a point counts only
where the achieved load is at least 80% of the offered load (marked otherwise).

    python benchmarks/factool_load.py --rates 0.5,1,2,3 --seconds 20
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import trio

import alto
from alto.factool.factool_pb2 import Question
from alto.retrieval import load_questions

ROOT = Path(__file__).resolve().parents[1]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def one_rate(
    client: alto.Client, rate: float, seconds: float, questions: list[Question]
) -> dict[str, float]:
    """Poisson arrivals at ``rate`` for ``seconds``; wait for every request to end."""
    rng = random.Random(int(rate * 1000))
    lat: list[float] = []
    first_claim: list[float] = []
    first_evidence: list[float] = []
    failed = 0
    t0 = trio.current_time()
    last_done = t0

    async def request(q: Question) -> None:
        nonlocal failed, last_done
        start = trio.current_time()
        seen: dict[str, float] = {}
        try:
            async for r in client.submit(q):
                seen.setdefault(r.queue, trio.current_time() - start)
        except alto.AltoError:
            failed += 1
            return
        now = trio.current_time()
        lat.append(now - start)
        if "claims_out" in seen:
            first_claim.append(seen["claims_out"])
        if "evidence" in seen:
            first_evidence.append(seen["evidence"])
        last_done = max(last_done, now)

    sent = 0
    async with trio.open_nursery() as load:
        while trio.current_time() - t0 < seconds:
            load.start_soon(request, questions[sent % len(questions)])
            sent += 1
            await trio.sleep(rng.expovariate(rate))
    achieved = len(lat) / max(1e-9, last_done - t0)
    return {
        "sent": sent,
        "done": len(lat),
        "failed": failed,
        "achieved": achieved,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "claim50": pct(first_claim, 0.5),
        "evidence50": pct(first_evidence, 0.5),
    }


async def one_mode(
    config: Path, deploy: Path, rates: list[float], seconds: float, questions: list[Question]
) -> dict[float, dict[str, float]]:
    out: dict[float, dict[str, float]] = {}
    async with trio.open_nursery() as nursery:
        info: alto.ServeInfo = await nursery.start(
            lambda task_status: alto.serve(
                config, deploy, http=None, write_discovery=False, handle_signals=False,
                ready_timeout=600, task_status=task_status,
            )
        )  # fmt: skip
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
            await client.run(questions[0])  # warm-up
            for rate in rates:
                out[rate] = await one_rate(client, rate, seconds, questions)
                print(f"  {config.name} at {rate}/s: {out[rate]}", file=sys.stderr)
        nursery.cancel_scope.cancel()
    return out


def prepare_passage_store() -> None:
    """Build the reranker's offline passage encodings once (configs/factool-emulated.toml
    names the directory), so that instance start-up only maps them."""
    import torch

    from alto.factool._stages import _passage_store
    from alto.retrieval import MaxSimReranker

    d = Path("~/.cache/alto/minilm-dev-passages").expanduser()
    if not (d / "ids.json").exists():
        print(f"encoding the dev passages once into {d} ...", file=sys.stderr)
        torch.set_num_threads(2)
        d.parent.mkdir(parents=True, exist_ok=True)
        _passage_store(MaxSimReranker(), str(d), "dev")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.5,1,2,3")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--deploy", default=str(ROOT / "configs" / "factool.deploy.toml"))
    a = ap.parse_args()
    rates = [float(r) for r in a.rates.split(",")]
    prepare_passage_store()
    qs = load_questions()[::7]
    questions = [Question(id=q.id, question=q.question, gold_pid=q.gold_pid) for q in qs]
    streaming = ROOT / "configs" / "factool-emulated.toml"
    with tempfile.TemporaryDirectory() as d:
        baseline = Path(d) / "factool-emulated-baseline.toml"
        baseline.write_text(
            streaming.read_text()
            .replace("stream = true", "stream = false")
            .replace('name = "factool-emulated"', 'name = "factool-emulated-baseline"')
        )

        async def run() -> dict[str, dict[float, dict[str, float]]]:
            return {
                "streaming": await one_mode(streaming, Path(a.deploy), rates, a.seconds, questions),
                "baseline": await one_mode(baseline, Path(a.deploy), rates, a.seconds, questions),
            }

        res = trio.run(run)
    print(
        f"FacTool pipeline, emulated LM stages (Table 1 timings), real BM25 + MiniLM, deployment {Path(a.deploy).name}, {a.seconds:.0f} s per point"
    )
    print()
    print(
        "| offered (req/s) | mode | achieved (req/s) | p50 latency | p99 latency "
        "| first claim p50 | first evidence p50 | failed |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        for mode in ("streaming", "baseline"):
            r = res[mode][rate]
            mark = "" if r["achieved"] >= 0.8 * rate else " (below 80% of offered)"
            print(
                f"| {rate:g} | {mode} | {r['achieved']:.2f}{mark} | {r['p50']:.2f} s | {r['p99']:.2f} s "
                f"| {r['claim50']:.2f} s | {r['evidence50']:.2f} s | {r['failed']:.0f} |"
            )
    print()
    for rate in rates:
        s, b = res["streaming"][rate], res["baseline"][rate]
        print(
            f"at {rate:g} req/s: baseline / streaming latency p50 {b['p50'] / s['p50']:.2f}x, p99 {b['p99'] / s['p99']:.2f}x"
        )


if __name__ == "__main__":
    main()
