"""The paper's Figure 2 from real traces: one request's partial outputs, stage by stage.

One SQuAD question goes through the FacTool pipeline in each mode (``baseline``: each LM
stage waits for its whole generation; ``streaming``: the paper's; ``sentences``: plus the
answer streamed sentence by sentence), on the paper's deployment with emulated LM stages
(Table 1) and emulated retrieval, traced by the runtime (``alto.dataplane._tracing``).
The pipelines run in this process on trio's virtual clock (the emulated GPUs' time, as in
``figure5.py``), so the picture is the same on every machine.

Each row is a stage; a faint bar is one input being processed (from the moment it
reached the instance to the moment it was done), a square is one partial output leaving
the stage, at the time the runtime relayed it. The request's end is marked.

    python benchmarks/figure2.py --plot docs/figures/figure2.png
    python benchmarks/figure2.py --json trace.json --question 7
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing
from _emulated_load import open_virtual
from figure3 import MODES, write_configs

from alto.factool.factool_pb2 import Question
from alto.retrieval import load_questions

STAGES = ["qa", "claims", "queries", "bm25", "encoder", "rerank"]


async def trace_one(pipeline: Path, deploy: Path, question: Question) -> dict[str, Any]:
    import alto

    deployment = alto.load_deployment(deploy, alto.load_pipeline(pipeline))
    instances = {name: d.instances for name, d in deployment.stages.items()}
    async with open_virtual(pipeline, instances) as p:
        results = await p.run(question)
        timeline = p.runtime.request_timeline(results[0].request_id)
    assert timeline is not None and timeline["trace"] is not None
    return dict(timeline)


def run(modes: list[str], question: Question) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="alto-fig2-") as d:
        ns = argparse.Namespace(
            deploy=str(Path(__file__).resolve().parents[1] / "configs" / "factool.deploy.toml"),
            retrieval="emulated",
            trace_sample_rate=1.0,
        )
        for mode in modes:
            pipeline, deploy = write_configs(mode, Path(d), ns)
            out[mode] = trio.run(
                trace_one, pipeline, deploy, question, clock=trio.testing.MockClock()
            )
    return out


def plot(traces: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(traces)
    end = max(t["latency_s"] for t in traces.values())
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.6), sharey=True)
    axes = [axes] if len(modes) == 1 else list(axes)
    colours = {
        "qa": "C0",
        "claims": "C1",
        "queries": "C2",
        "bm25": "C3",
        "encoder": "C4",
        "rerank": "C5",
    }
    for ax, mode in zip(axes, modes, strict=True):
        trace = traces[mode]["trace"]
        for row, stage in enumerate(STAGES):
            y = len(STAGES) - 1 - row
            for s in trace["spans"]:
                if s["stage"] == stage:
                    ax.barh(y, s["ended"] - s["received"], left=s["received"], height=0.6,
                            color=colours[stage], alpha=0.18, linewidth=0)  # fmt: skip
            outs = [h["t"] for h in trace["hops"] if h["from"] == stage]
            ax.scatter(outs, [y] * len(outs), marker="s", s=22, color=colours[stage], zorder=3)
        ax.axvline(traces[mode]["latency_s"], color="black", linewidth=1, linestyle="--")
        ax.set_title(f"{mode}: done at {traces[mode]['latency_s']:.2f} s")
        ax.set_xlim(0, math.ceil(end * 1.05 * 2) / 2)
        ax.set_xlabel("seconds since the request arrived")
        ax.set_yticks(range(len(STAGES)), list(reversed(STAGES)))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("One FacTool request: partial outputs (squares) and processing (bars) per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="baseline,streaming,sentences")
    ap.add_argument("--question", type=int, default=3, help="index into the SQuAD dev questions")
    ap.add_argument("--plot")
    ap.add_argument("--json")
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    qs = load_questions()
    if not 0 <= a.question < len(qs):
        ap.error(f"--question must be in 0..{len(qs) - 1}")
    q = qs[a.question]
    traces = run(modes, Question(id=q.id, question=q.question, gold_pid=q.gold_pid))
    print(f"question {a.question}: {q.question}")
    print()
    print("| mode | done | first claim | first evidence | outputs relayed | spans |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, t in traces.items():
        hops = t["trace"]["hops"]
        first: dict[str, float] = {}  # sink queue -> time of its first output
        for h in hops:
            if h["to"] == "sink":
                first.setdefault(h["queue"], h["t"])
        print(
            f"| {mode} | {t['latency_s']:.2f} s | {first.get('claims_out', math.nan):.2f} s "
            f"| {first.get('evidence', math.nan):.2f} s | {len(hops)} | {len(t['trace']['spans'])} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(traces, indent=1))
    if a.plot:
        plot(traces, a.plot)


if __name__ == "__main__":
    main()
