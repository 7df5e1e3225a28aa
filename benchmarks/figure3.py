"""The paper's Figure 3: latency vs achieved load, streaming vs baseline, the paper's way.

For each mode, ``alto serve`` runs the FacTool pipeline (``configs/factool-emulated.toml``:
LM stages are the emulated engine calibrated to the paper's Table 1, with continuous
batching; BM25 is real) on the paper's deployment (``configs/factool.deploy.toml``: QA 2,
claims 2, queries 3, BM25 4, encoder 1, reranker 4 instances), and a load generator in its
own process sends SQuAD questions as a Poisson process at increasing offered loads:

* a point lasts ``--seconds`` of arrivals (default 180: long enough for the tail not to
  dominate), then the generator waits for every request to end;
* achieved load = completed requests / (last completion - first arrival), as in the paper;
  a point counts only where it is at least 80% of the offered load (otherwise it is shown
  and marked, and the sweep of that mode stops: it is past saturation);
* the sweep raises the offered load by ``--factor`` from ``--start`` (or takes ``--rates``),
  until a point does not count or its median passes ``--stop-p50`` (far past the target).

Modes (``--modes``): ``streaming`` (the paper's: claims and query tokens streamed),
``baseline`` (every LM stage waits for its whole generation: the paper's "Compound AI
Systems Today"; a request's claims then reach query generation together and their
queries are generated in parallel), ``sentences`` (streaming, plus the QA answer streamed
sentence by sentence into claim extraction: ``configs/factool-emulated-sentences.toml``;
claim extraction then runs per sentence and draws claims in proportion to the text, 3.3
per 62.5 words as Table 1 on average), and ``streaming-proportional`` /
``baseline-proportional`` (the paper's modes with that claim distribution, to separate
the two effects). ``streaming`` and ``baseline`` are the paper-faithful reproduction.

Measuring the pipeline, not this 2-core machine: with ``--retrieval emulated`` (the
default) the ColBERT query encoder and the reranker take their calibrated time per query
without using this machine's CPU (docs/figure3.md, "Emulated retrieval"), so the LM stages
(emulated GPUs) are what saturates, as on the paper's 8-A100 node; ``--retrieval real``
runs MiniLM on the CPU. Per point and stage the run reports the CPU seconds its processes
used (``/proc``) and the emulated GPU/device busy seconds (the engines' own counters), and
names the bottleneck: the resource closest to saturation.

Output: a table per mode, the summary the paper's claims are about (the highest achieved
load with p50 <= 4 s per mode and their ratio; the P99 ratio at the lowest load),
``--json PATH`` (one object per point), ``--plot PATH.png`` (median and P99 latency vs
achieved load, both modes, the 4 s target). ``--fast`` is a seconds-long run for the test
suite (correctness of the machinery, not a measurement).

    python benchmarks/figure3.py --json fig3.json --plot docs/figures/figure3.png
    python benchmarks/figure3.py --fast
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = 4.0  # the paper's latency target, seconds per request (p50)
COUNTED = 0.8  # a point counts where achieved >= 80% of offered
CLK_TCK = os.sysconf("SC_CLK_TCK")

_PROPORTIONAL = {
    'engine_options = { profile = "claims" }': (
        'engine_options = { profile = "claims", outputs_per_input_word = 0.0528 }'
    )
}
MODES = {
    "streaming": ("factool-emulated.toml", {}),
    "baseline": ("factool-emulated.toml", {"stream = true": "stream = false"}),
    "sentences": ("factool-emulated-sentences.toml", {}),
    # The paper's two modes with the sentences mode's claim counts (proportional to the
    # answer's length, Table 1's 3.3 per 62.5 words): separates what streaming sentences
    # gains from what the other claim distribution changes.
    "streaming-proportional": ("factool-emulated.toml", dict(_PROPORTIONAL)),
    "baseline-proportional": (
        "factool-emulated.toml",
        {**_PROPORTIONAL, "stream = true": "stream = false"},
    ),
}
# Calibrated per-query times of the emulated retrieval devices (docs/figure3.md).
ENCODER_SECONDS = 0.005  # a BERT-base-class query encoder at batch 1 on one A100
RERANK_SECONDS = 0.002  # MaxSim over 5 candidates from a precomputed index, one core


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---------------------------------------------------------------- the load generator


def role_loadgen(a: argparse.Namespace) -> None:
    """A separate process: Poisson arrivals of SQuAD questions through the socket client;
    writes one record per request to ``--out``."""
    import trio

    import alto
    from alto.factool.factool_pb2 import Question
    from alto.retrieval import load_questions

    qs = load_questions()
    rng = random.Random(a.seed)
    order = rng.sample(range(len(qs)), k=min(len(qs), 5000))
    records: list[dict[str, Any]] = []

    async def main() -> None:
        async with alto.open_client(address="unix:" + a.socket, token=a.token) as client:
            t0 = trio.current_time()

            async def one(i: int, q: Any) -> None:
                start = trio.current_time()
                rec: dict[str, Any] = {
                    "arrival": start - t0,
                    "first": {},
                    "results": 0,
                    "per_queue": {},
                }
                try:
                    async for r in client.submit(
                        Question(id=q.id, question=q.question, gold_pid=q.gold_pid),
                        timeout=a.request_timeout,
                    ):
                        rec["results"] += 1
                        rec["first"].setdefault(r.queue, trio.current_time() - start)
                        rec["per_queue"][r.queue] = rec["per_queue"].get(r.queue, 0) + 1
                        rec["request_id"] = r.request_id
                    rec["status"] = "done"
                except alto.OverloadedError:
                    rec["status"] = "refused"
                except alto.AltoError as exc:
                    rec["status"] = "failed"
                    rec["error"] = str(exc)[:200]
                rec["done"] = trio.current_time() - t0
                records.append(rec)

            sent = 0
            async with trio.open_nursery() as n:
                while trio.current_time() - t0 < a.seconds:
                    q = qs[order[sent % len(order)]]
                    n.start_soon(one, sent, q)
                    sent += 1
                    await trio.sleep(rng.expovariate(a.rate))

    trio.run(main)
    Path(a.out).write_text(json.dumps(records))


# ---------------------------------------------------------------- the driver


@dataclass
class Point:
    mode: str
    offered: float
    achieved: float
    p50: float
    p99: float
    failed: int
    sent: int
    completed: int
    first_claim_p50: float
    first_evidence_p50: float
    claims_per_request: float  # the work each request made (equal across modes on average)
    evidence_per_request: float
    counted: bool
    window_s: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per stage (+ runtime, loadgen)
    busy_seconds: dict[str, float] = field(default_factory=dict)  # emulated devices, per stage
    utilisation: dict[str, float] = field(default_factory=dict)  # busy / (window * instances)
    host_cpu_share: float = 0.0  # CPU seconds of everything / (window * cores)
    bottleneck: str = ""


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class Server:
    """``alto serve`` of one mode, as a subprocess."""

    def __init__(self, pipeline: Path, deploy: Path, workdir: Path, name: str) -> None:
        self.name = name
        env = {**os.environ, "ALTO_RUN_DIR": str(workdir), "ALTO_LOG_LEVEL": "WARNING"}
        self.log = open(workdir / f"{name}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alto", "serve", str(pipeline), "--deploy", str(deploy),
             "--http", "127.0.0.1:0"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        disc = workdir / f"{name}.json"
        deadline = time.monotonic() + 600
        while not disc.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"alto serve {name} did not start; see {workdir / name}.log")
            time.sleep(0.2)
        info = json.loads(disc.read_text())
        self.socket, self.token, self.http = info["socket"], info["token"], info["http"]

    def instances(self) -> list[dict[str, Any]]:
        import httpx

        r = httpx.get(self.http + "/api/instances", timeout=30)
        r.raise_for_status()
        out: list[dict[str, Any]] = r.json()["instances"]
        return out

    def sample(self) -> dict[str, Any]:
        """CPU seconds per stage, emulated busy seconds per stage, instances per stage."""
        cpu: dict[str, float] = {"runtime": _cpu(self.proc.pid)}
        busy: dict[str, float] = {}
        tokens: dict[str, float] = {}
        capacity: dict[str, float] = {}
        count: dict[str, int] = {}
        for inst in self.instances():
            if inst["state"] not in ("ready", "draining"):
                continue
            stage = inst["stage"]
            if inst.get("pid"):
                cpu[stage] = cpu.get(stage, 0.0) + _cpu(int(inst["pid"]))
            g = inst.get("gauges") or {}
            b = g.get("busy_seconds", g.get("emulated_busy_seconds"))
            if b is not None:
                busy[stage] = busy.get(stage, 0.0) + float(b)
            if "tokens_generated" in g:
                tokens[stage] = tokens.get(stage, 0.0) + float(g["tokens_generated"])
                # The most tokens per second one instance can decode (a full batch).
                mb, ts, al = float(g["max_batch"]), float(g["token_seconds"]), float(g["alpha"])
                capacity[stage] = mb / (ts * (1 + al * (mb - 1)))
            count[stage] = count.get(stage, 0) + 1
        return {
            "cpu": cpu,
            "busy": busy,
            "tokens": tokens,
            "capacity": capacity,
            "count": count,
            "t": time.monotonic(),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def write_configs(mode: str, workdir: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    base, edits = MODES[mode]
    text = (ROOT / "configs" / base).read_text()
    for old, new in edits.items():
        assert old in text, (base, old)
        text = text.replace(old, new)
    name = f"fig3-{mode}-{os.getpid()}"
    text = text.replace('name = "factool-emulated-sentences"', f'name = "{name}"')
    text = text.replace('name = "factool-emulated"', f'name = "{name}"')
    if a.retrieval == "emulated":
        text = set_options(text, "encoder", f"emulate_seconds = {ENCODER_SECONDS}")
        text = set_options(text, "rerank", f"k = 3, emulate_seconds = {RERANK_SECONDS}")
    pipeline = workdir / f"{name}.toml"
    pipeline.write_text(text)
    deploy_text = Path(a.deploy).read_text()
    extra = f"trace_sample_rate = {a.trace_sample_rate}\n"
    if "[runtime]" in deploy_text:
        deploy_text = deploy_text.replace("[runtime]\n", "[runtime]\n" + extra, 1)
    else:
        deploy_text = "[runtime]\n" + extra + deploy_text
    deploy = workdir / f"{name}.deploy.toml"
    deploy.write_text(deploy_text)
    return pipeline, deploy


def set_options(text: str, stage: str, options: str) -> str:
    """Replace the ``options`` line of ``[stages.STAGE]`` (or add one)."""
    head = f"[stages.{stage}]\n"
    i = text.index(head) + len(head)
    j = text.find("\n[", i)
    j = len(text) if j < 0 else j + 1
    body = [ln for ln in text[i:j].splitlines() if not ln.startswith("options")]
    return text[:i] + "\n".join([*body, f"options = {{ {options} }}"]) + "\n" + text[j:]


def run_point(
    server: Server, mode: str, rate: float, a: argparse.Namespace, workdir: Path
) -> Point:
    out = workdir / f"{mode}-{rate:g}.json"
    before = server.sample()
    t_start = time.monotonic()
    loadgen = subprocess.Popen(
        [sys.executable, __file__, "--role", "loadgen", "--socket", server.socket,
         f"--token={server.token}", "--rate", str(rate), "--seconds", str(a.seconds), "--out", str(out),
         "--seed", str(int(rate * 1000)), "--request-timeout", str(a.request_timeout)],
    )  # fmt: skip
    lg_cpu = 0.0
    try:
        while loadgen.poll() is None:
            lg_cpu = max(lg_cpu, _cpu(loadgen.pid))
            time.sleep(0.5)
    finally:
        if loadgen.poll() is None:  # interrupted: the generator goes with us
            loadgen.kill()
            loadgen.wait()
    after = server.sample()
    window = time.monotonic() - t_start
    records: list[dict[str, Any]] = json.loads(out.read_text())
    done = [r for r in records if r["status"] == "done"]
    lat = [r["done"] - r["arrival"] for r in done]
    first_arrival = min((r["arrival"] for r in records), default=0.0)
    last_done = max((r["done"] for r in done), default=first_arrival)
    achieved = len(done) / max(1e-9, last_done - first_arrival)
    cpu = {
        k: after["cpu"].get(k, 0.0) - before["cpu"].get(k, 0.0)
        for k in after["cpu"]
        if after["cpu"].get(k, 0.0) - before["cpu"].get(k, 0.0) >= 0
    }
    cpu["loadgen"] = lg_cpu
    busy = {k: after["busy"][k] - before["busy"].get(k, 0.0) for k in after["busy"]}
    # Device utilisation: for an LM stage, the tokens it decoded against what its
    # instances could decode with full batches (continuous batching: a GPU busy with one
    # sequence is far from saturated); for the emulated retrieval devices, busy time.
    util = {k: busy[k] / (window * max(1, after["count"].get(k, 1))) for k in busy}
    for k, cap in after["capacity"].items():
        done_tokens = after["tokens"][k] - before["tokens"].get(k, 0.0)
        util[k] = done_tokens / (window * max(1, after["count"].get(k, 1)) * cap)
    host = sum(cpu.values()) / (window * (os.cpu_count() or 1))
    candidates = {f"{k} (emulated device)": v for k, v in util.items()}
    candidates["host CPU"] = host
    bottleneck = max(candidates, key=lambda k: candidates[k])
    return Point(
        mode=mode,
        offered=rate,
        achieved=achieved,
        p50=pct(lat, 0.5),
        p99=pct(lat, 0.99),
        failed=sum(1 for r in records if r["status"] != "done"),
        sent=len(records),
        completed=len(done),
        first_claim_p50=pct(
            [r["first"]["claims_out"] for r in done if "claims_out" in r["first"]], 0.5
        ),
        first_evidence_p50=pct(
            [r["first"]["evidence"] for r in done if "evidence" in r["first"]], 0.5
        ),
        claims_per_request=_mean([r["per_queue"].get("claims_out", 0) for r in done]),
        evidence_per_request=_mean([r["per_queue"].get("evidence", 0) for r in done]),
        counted=achieved >= COUNTED * rate,
        window_s=window,
        cpu_seconds={k: round(v, 2) for k, v in cpu.items()},
        busy_seconds={k: round(v, 2) for k, v in busy.items()},
        utilisation={k: round(v, 3) for k, v in util.items()},
        host_cpu_share=round(host, 3),
        bottleneck=f"{bottleneck} {candidates[bottleneck]:.0%}",
    )


def sweep(
    mode: str, a: argparse.Namespace, workdir: Path, on_point: Callable[[Point], None]
) -> list[Point]:
    """Run ``mode``'s points, handing each to ``on_point`` as soon as it is measured."""
    pipeline, deploy = write_configs(mode, workdir, a)
    server = Server(pipeline, deploy, workdir, pipeline.stem)
    points: list[Point] = []
    try:
        warm = argparse.Namespace(**{**vars(a), "seconds": 2.0})
        run_point(server, mode, 1.0, warm, workdir)  # warm-up: engines, sockets, caches
        rates = [float(r) for r in a.rates.split(",")] if a.rates else None
        rate = a.start
        while True:
            if rates is not None:
                if not rates:
                    break
                rate = rates.pop(0)
            p = run_point(server, mode, rate, a, workdir)
            points.append(p)
            on_point(p)
            print(
                f"  {mode:9s} offered {rate:6.2f}/s achieved {p.achieved:6.2f}/s p50 {p.p50:6.2f} s "
                f"p99 {p.p99:6.2f} s failed {p.failed}  bottleneck: {p.bottleneck}",
                file=sys.stderr,
                flush=True,
            )
            if rates is None:
                if not p.counted or rate * a.factor > a.max_rate or p.p50 > a.stop_p50:
                    break
                rate = round(rate * a.factor, 3)
    finally:
        server.stop()
    return points


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_at(points: list[Point], mode: str, target: float) -> float:
    """The highest load ``mode`` sustains with p50 <= ``target``: the achieved load where
    its counted points' median crosses the target, interpolated linearly between the two
    points around the crossing (the paper reads it off its plot the same way); 0 when even
    its lightest point is over the target; its highest counted load when none is."""
    ps = sorted((p for p in points if p.mode == mode and p.counted), key=lambda p: p.achieved)
    if not ps or ps[0].p50 > target:
        return 0.0
    for lo, hi in itertools.pairwise(ps):
        if hi.p50 > target:
            frac = (target - lo.p50) / (hi.p50 - lo.p50)
            return lo.achieved + frac * (hi.achieved - lo.achieved)
    return ps[-1].achieved


TARGETS = (4.0, 4.5, 5.0, 6.0)  # the paper's 4 s, and how the ratio moves with it


def summary(points: list[Point], modes: list[str]) -> list[str]:
    lines = []
    for mode in modes:
        lines.append(
            f"highest load with p50 <= {TARGET:g} s, {mode}: {load_at(points, mode, TARGET):.2f} req/s"
            + ("" if load_at(points, mode, TARGET) else " (its lightest point is over the target)")
        )
    pairs = [
        (m, "baseline-proportional" if "proportional" in m or m == "sentences" else "baseline")
        for m in modes
    ]
    pairs = [(m, b) for m, b in pairs if m != b and b in modes]
    for mode, base in pairs:
        ratios = []
        for t in TARGETS:
            lb, lm = load_at(points, base, t), load_at(points, mode, t)
            ratios.append(
                f"{t:g} s: " + (f"{lm / lb:.2f}x" if lb else "baseline never" if lm else "neither")
            )
        lines.append(
            f"{mode} / {base}, load at a p50 target of "
            + ", ".join(ratios)
            + " (paper: up to 3x at 4 s)"
        )
    lowest = {
        m: min((p for p in points if p.mode == m), key=lambda p: p.offered, default=None)
        for m in modes
    }
    for mode, base in pairs:
        b, s = lowest.get(base), lowest.get(mode)
        if b is not None and s is not None and s.p99 > 0:
            lines.append(
                f"P99 at the lowest load ({b.offered:g} req/s), {base} / {mode}: {b.p99 / s.p99:.2f}x (paper: 1.8x)"
            )
    return lines


def table(points: list[Point]) -> list[str]:
    rows = [
        "| mode | offered | achieved | p50 | p99 | first claim p50 | first evidence p50 | claims / evidence per request | failed | bottleneck |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in points:
        mark = "" if p.counted else " (<80%)"
        rows.append(
            f"| {p.mode} | {p.offered:g} | {p.achieved:.2f}{mark} | {p.p50:.2f} s | {p.p99:.2f} s "
            f"| {p.first_claim_p50:.2f} s | {p.first_evidence_p50:.2f} s "
            f"| {p.claims_per_request:.1f} / {p.evidence_per_request:.1f} | {p.failed} | {p.bottleneck} |"
        )
    return rows


def cpu_table(points: list[Point]) -> list[str]:
    stages = sorted({k for p in points for k in p.cpu_seconds})
    rows = [
        "| mode | offered | "
        + " | ".join(f"{s} CPU s" for s in stages)
        + " | host CPU | LM device utilisation |",
        "| --- | ---: | " + " | ".join("---:" for _ in stages) + " | ---: | --- |",
    ]
    for p in points:
        util = ", ".join(f"{k} {v:.0%}" for k, v in sorted(p.utilisation.items()))
        rows.append(
            f"| {p.mode} | {p.offered:g} | "
            + " | ".join(f"{p.cpu_seconds.get(s, 0):.1f}" for s in stages)
            + f" | {p.host_cpu_share:.0%} | {util} |"
        )
    return rows


def plot(points: list[Point], modes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One row per claim distribution, so that each mode is drawn next to its own baseline.
    groups = [
        [m for m in modes if m in ("baseline", "streaming")],
        [m for m in modes if m not in ("baseline", "streaming")],
    ]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for row, group in zip(axes, groups, strict=True):
        paper = group[0] in ("baseline", "streaming")
        for ax, key, title in ((row[0], "p50", "Median latency"), (row[1], "p99", "P99 latency")):
            for mode in group:
                ps = sorted(
                    (p for p in points if p.mode == mode and p.counted), key=lambda p: p.achieved
                )
                ax.plot(
                    [p.achieved for p in ps], [getattr(p, key) for p in ps], marker="o", label=mode
                )
            ax.axhline(
                TARGET, color="grey", linestyle="--", linewidth=1, label=f"{TARGET:g} s target"
            )
            ax.set_xlabel("achieved load (requests / s)")
            ax.set_ylabel("seconds")
            claims = "claims as Table 1" if paper else "claims in proportion to the answer"
            ax.set_title(f"{title} vs achieved load ({claims})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("FacTool pipeline, paper deployment, emulated LM stages (Table 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["loadgen"])
    ap.add_argument("--socket")
    ap.add_argument("--token")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=180.0, help="arrivals per point (seconds)")
    ap.add_argument("--modes", default="streaming,baseline")
    ap.add_argument("--rates", help="comma-separated offered loads (default: an automatic sweep)")
    ap.add_argument("--start", type=float, default=1.0)
    ap.add_argument("--factor", type=float, default=1.5)
    ap.add_argument("--max-rate", type=float, default=64.0)
    ap.add_argument(
        "--stop-p50", type=float, default=12.0, help="end a sweep past this median (seconds)"
    )
    ap.add_argument("--deploy", default=str(ROOT / "configs" / "factool.deploy.toml"))
    ap.add_argument("--retrieval", choices=["emulated", "real"], default="emulated")
    ap.add_argument("--trace-sample-rate", type=float, default=0.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--fast", action="store_true", help="seconds-long run for the test suite")
    ap.add_argument("--from-json", help="print (and plot) the results of an earlier --json run")
    a = ap.parse_args()
    if a.role == "loadgen":
        return role_loadgen(a)
    # SIGTERM unwinds like Ctrl-C, so that every alto serve started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("figure3: terminated"))
    for name, value, lo, hi in (
        ("--seconds", a.seconds, 1, 3600),
        ("--start", a.start, 0.05, 1000),
        ("--factor", a.factor, 1.05, 10),
        ("--max-rate", a.max_rate, 0.05, 1000),
        ("--stop-p50", a.stop_p50, TARGET, 3600),
        ("--trace-sample-rate", a.trace_sample_rate, 0, 1),
        ("--request-timeout", a.request_timeout, 1, 3600),
    ):
        if not lo <= value <= hi:
            ap.error(f"{name} must be in {lo}..{hi}, got {value}")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    if a.fast:
        a.seconds, a.rates = 3.0, "1"
    points: list[Point] = []
    if a.from_json:
        points = [Point(**p) for p in json.loads(Path(a.from_json).read_text())]
        modes = list(dict.fromkeys(p.mode for p in points))
    else:

        def save(p: Point) -> None:
            # Written after every point, so an interrupted sweep keeps what it measured.
            points.append(p)
            if a.json:
                write_atomically(Path(a.json), json.dumps([asdict(q) for q in points], indent=1))

        with tempfile.TemporaryDirectory(prefix="alto-fig3-") as d:
            for mode in modes:
                sweep(mode, a, Path(d), save)
    print(
        f"Figure 3: FacTool, {Path(a.deploy).name}, emulated LM stages (Table 1), "
        f"{a.retrieval} retrieval, {a.seconds:g} s of arrivals per point"
    )
    print()
    print("\n".join(table(points)))
    print()
    print("\n".join(cpu_table(points)))
    print()
    print("\n".join(summary(points, modes)))
    if a.plot:
        plot(points, modes, a.plot)


if __name__ == "__main__":
    main()
