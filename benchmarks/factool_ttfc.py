"""Time to first claim (and first evidence): streaming vs baseline, same questions, one run.

Serves the FacTool pipeline with the real small LM on the CPU in both modes at once
(configs/factool.toml and configs/factool-baseline.toml, each with configs/factool.cpu.toml),
sends the same SQuAD questions one at a time, alternating between the two (the other one
idles meanwhile, so drift in the machine's load hits both alike), and prints per-mode
medians of: time to the answer, time to the first claim, time to the first evidence,
time to the whole result.

Every request is traced, so a second table says where the time goes on the path to the
first evidence (when the first claim left claim extraction, when query generation started
on it, when its first query's BM25 group closed, when the encoder and reranker finished
it) and how fast each LM stage generated (tokens per second while it ran, from the
instances' spans): on this 2-core machine the LM instances of different stages compete
for the cores when streaming lets them run at the same time.

    python benchmarks/factool_ttfc.py --questions 6
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

import alto
from alto.factool.factool_pb2 import Question
from alto.retrieval import load_questions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"streaming": "factool.toml", "baseline": "factool-baseline.toml"}


async def measure(deploy: str, questions: list[Question]) -> dict[str, list[dict[str, float]]]:
    """Both modes served at once; each question goes to one, then the other (which sits
    idle meanwhile), so that drift in what else the machine does hits both alike."""
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in CONFIGS}
    async with trio.open_nursery() as nursery:
        clients: dict[str, alto.Client] = {}
        infos: dict[str, alto.ServeInfo] = {}
        for mode, config in CONFIGS.items():
            infos[mode] = await nursery.start(
                lambda task_status, c=config: alto.serve(
                    ROOT / "configs" / c, ROOT / "configs" / deploy, http=None,
                    write_discovery=False, handle_signals=False, ready_timeout=300,
                    task_status=task_status,
                )
            )  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            for mode, info in infos.items():
                clients[mode] = await stack.enter_async_context(
                    alto.open_client(address="unix:" + info.socket_path, token=info.token)
                )
                await clients[mode].run(questions[0])  # warm-up: first calls load caches
            for q in questions:
                for mode, client in clients.items():
                    rows[mode].append(await one(client, infos[mode], mode, q))
        nursery.cancel_scope.cancel()
    return rows


async def one(
    client: alto.Client, info: alto.ServeInfo, mode: str, q: Question
) -> dict[str, float]:
    t0 = trio.current_time()
    row: dict[str, float] = {}
    r: Any = None
    async for r in client.submit(q):
        t = trio.current_time() - t0
        key = {"answer_out": "answer", "claims_out": "first claim", "evidence": "first evidence"}[
            r.queue
        ]
        row.setdefault(key, t)
    row["done"] = trio.current_time() - t0
    if r is not None:
        row.update(breakdown(info.runtime.request_timeline(r.request_id)))
    print(
        f"  {mode}: {q.question[:60]!r}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
        file=sys.stderr,
    )
    return row


def breakdown(timeline: dict[str, Any] | None) -> dict[str, float]:
    """Where the time to the first evidence went, and each LM stage's token rate."""
    out: dict[str, float] = {}
    trace = (timeline or {}).get("trace")
    if not trace:
        return out
    spans, hops = trace["spans"], trace["hops"]
    claims = sorted(
        (h for h in hops if h["from"] == "claims" and h["queue"] == "claims"), key=lambda h: h["t"]
    )
    if claims:
        first_claim = claims[0]
        out["claim left claims stage"] = first_claim["t"]
        path = first_claim["key_path"]
        q = [s for s in spans if s["stage"] == "queries" and s["key_path"] == path]
        if q:
            out["queries started on it"] = q[0]["started"]
        closes = sorted(
            h["t"]
            for h in hops
            if h["kind"] == "group_closed" and h["key_path"][: len(path)] == path
        )
        if closes:
            out["its first query closed"] = closes[0]
    for stage in ("qa", "claims", "queries"):
        rates = [
            s["attributes"]["gen_ai.usage.output_tokens"] / (s["ended"] - s["started"])
            for s in spans
            if s["stage"] == stage
            and s.get("attributes", {}).get("gen_ai.usage.output_tokens")
            and s["ended"] > s["started"]
        ]
        if rates:
            out[f"{stage} tokens/s"] = statistics.median(rates)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--deploy", default="factool.cpu.toml")
    a = ap.parse_args()
    qs = load_questions()[a.offset :: 97][: a.questions]  # spread over articles
    questions = [Question(id=q.id, question=q.question, gold_pid=q.gold_pid) for q in qs]

    res = trio.run(measure, a.deploy, questions)
    print(
        f"FacTool pipeline, real Gemma 3 270M (llama.cpp) + BM25 + MiniLM, {len(questions)} SQuAD questions, one at a time"
    )
    print()
    print("| mode | answer (p50) | first claim (p50) | first evidence (p50) | whole result (p50) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    med = {}
    for mode, rows in res.items():
        m = {
            k: statistics.median(r[k] for r in rows if k in r)
            for k in ("answer", "first claim", "first evidence", "done")
        }
        med[mode] = m
        print(
            f"| {mode} | {m['answer']:.2f} s | {m['first claim']:.2f} s | {m['first evidence']:.2f} s | {m['done']:.2f} s |"
        )
    keys = [
        "claim left claims stage",
        "queries started on it",
        "its first query closed",
        "qa tokens/s",
        "claims tokens/s",
        "queries tokens/s",
    ]
    print()
    print(
        "Where the time to the first evidence goes (medians; seconds since submission, from traces):"
    )
    print()
    print("| mode | " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for mode, rows in res.items():
        vals = []
        for k in keys:
            xs = [r[k] for r in rows if k in r]
            vals.append(f"{statistics.median(xs):.2f}" if xs else "-")
        print(f"| {mode} | " + " | ".join(vals) + " |")
    s, b = med["streaming"], med["baseline"]
    print()
    print(
        f"streaming / baseline: first claim {s['first claim'] / b['first claim']:.2f}x, first evidence {s['first evidence'] / b['first evidence']:.2f}x, whole result {s['done'] / b['done']:.2f}x"
    )


if __name__ == "__main__":
    main()
