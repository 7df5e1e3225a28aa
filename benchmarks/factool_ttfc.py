"""Time to first claim (and first evidence): streaming vs baseline, same questions, one run.

Starts the FacTool pipeline with the real small LM on the CPU (configs/factool.toml, then
configs/factool-baseline.toml, both with configs/factool.cpu.toml), sends the same SQuAD
questions one at a time to each, and prints per-mode medians of: time to the answer,
time to the first claim, time to the first evidence, time to the whole result.

    python benchmarks/factool_ttfc.py --questions 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import trio

import alto
from alto.factool.factool_pb2 import Question
from alto.retrieval import load_questions

ROOT = Path(__file__).resolve().parents[1]


async def measure(config: str, questions: list[Question], deploy: str) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    async with trio.open_nursery() as nursery:
        info: alto.ServeInfo = await nursery.start(
            lambda task_status: alto.serve(
                ROOT / "configs" / config, ROOT / "configs" / deploy, http=None,
                write_discovery=False, handle_signals=False, ready_timeout=300, task_status=task_status,
            )
        )  # fmt: skip
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as client:
            await client.run(questions[0])  # warm-up: first calls load caches
            for q in questions:
                t0 = trio.current_time()
                row: dict[str, float] = {}
                async for r in client.submit(q):
                    t = trio.current_time() - t0
                    key = {
                        "answer_out": "answer",
                        "claims_out": "first claim",
                        "evidence": "first evidence",
                    }[r.queue]
                    row.setdefault(key, t)
                row["done"] = trio.current_time() - t0
                rows.append(row)
                print(
                    f"  {config}: {q.question[:60]!r}: "
                    + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()),
                    file=sys.stderr,
                )
        nursery.cancel_scope.cancel()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--deploy", default="factool.cpu.toml")
    a = ap.parse_args()
    qs = load_questions()[a.offset :: 97][: a.questions]  # spread over articles
    questions = [Question(id=q.id, question=q.question, gold_pid=q.gold_pid) for q in qs]

    async def run() -> dict[str, list[dict[str, float]]]:
        return {
            "streaming": await measure("factool.toml", questions, a.deploy),
            "baseline": await measure("factool-baseline.toml", questions, a.deploy),
        }

    res = trio.run(run)
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
    s, b = med["streaming"], med["baseline"]
    print()
    print(
        f"streaming / baseline: first claim {s['first claim'] / b['first claim']:.2f}x, first evidence {s['first evidence'] / b['first evidence']:.2f}x, whole result {s['done'] / b['done']:.2f}x"
    )


if __name__ == "__main__":
    main()
