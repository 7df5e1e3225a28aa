"""Does prompt-sticky routing pay? Prefix-cache reuse across LM instances, side by side.

Two llama.cpp engines (Gemma 3 270M, one thread each) serve a stream of requests that
alternate between few-shot templates (``--templates``, default 2 of the FacTool pipeline's QA, claim and
query prompts: ~100-300 shared prompt tokens each, then a request-specific tail). Each policy routes the same
stream through alto's own scheduler classes (the ones the runtime calls per frame), with
the template name as the prompt key and the engines' outstanding requests as loads:

* round-robin and least-outstanding ignore the prompt: consecutive calls on an engine
  mostly switch templates, so llama.cpp re-evaluates the whole prompt;
* prompt-sticky keeps a template on one engine (until that engine carries more than 1.25x
  the mean load), so the shared prefix stays in the engine's KV cache; but its home comes
  from a hash, so two templates can share one engine while the other gets none;
* prompt-affinity uses the same bound with a remembered, spread-out home per template.

Prints, per policy: prompt tokens evaluated vs reused (llama.cpp's own counts via the
engine's statistics), wall time and mean/p90 request latency.

    python benchmarks/prompt_sticky.py --requests 36
"""

from __future__ import annotations

import argparse
import random
import statistics

import trio

from alto.dataplane import load_scheduler
from alto.engines import GenerationParams
from alto.engines._llamacpp import LlamaCppEngine
from alto.factool._stages import CLAIMS_PROMPT, QA_PROMPT, QUERIES_PROMPT
from alto.retrieval import load_questions


def workload(n: int, templates: int) -> list[tuple[str, str]]:
    qs = load_questions()[::53]
    rng = random.Random(7)  # a seeded random mix: no policy lines up with it by accident
    out = []
    for i in range(n):
        q = qs[i % len(qs)].question
        kind = rng.choice(("qa", "claims", "queries")[:templates])
        prompt = {
            "qa": QA_PROMPT.format(question=q),
            "claims": CLAIMS_PROMPT.format(text=q),
            "queries": QUERIES_PROMPT.format(claim=q),
        }[kind]
        out.append((kind, prompt))
    return out


async def run_policy(
    policy: str, engines: list[LlamaCppEngine], reqs: list[tuple[str, str]], concurrency: int
) -> dict[str, float]:
    sched = load_scheduler(policy)
    for i in range(len(engines)):
        sched.add_instance(i)
    loads = dict.fromkeys(range(len(engines)), 0)
    before = [dict(e.statistics()) for e in engines]
    latencies: list[float] = []
    sem = trio.Semaphore(concurrency)
    t0 = trio.current_time()

    async def one(kind: str, prompt: str) -> None:
        async with sem:
            i = sched.choose(kind.encode(), loads)
            loads[i] += 1
            t = trio.current_time()
            try:
                async for _ in engines[i].generate(
                    prompt, GenerationParams(max_tokens=8, stop=("\n",)), prompt_key=kind
                ):
                    pass
            finally:
                loads[i] -= 1
            latencies.append(trio.current_time() - t)

    async with trio.open_nursery() as n:
        for kind, prompt in reqs:
            n.start_soon(one, kind, prompt)
            await trio.sleep(0)  # submit in order
    wall = trio.current_time() - t0
    after = [e.statistics() for e in engines]

    def delta(k: str) -> float:
        return sum(a[k] - b[k] for a, b in zip(after, before, strict=True))

    return {
        "evaluated": delta("prompt_tokens_evaluated"),
        "reused": delta("prompt_tokens_reused"),
        "prompt": delta("prompt_tokens"),
        "wall": wall,
        "mean": statistics.mean(latencies),
        "p90": sorted(latencies)[int(0.9 * len(latencies))],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=36)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--templates", type=int, default=2, choices=(1, 2, 3))
    a = ap.parse_args()
    reqs = workload(a.requests, a.templates)
    engines = [LlamaCppEngine(n_threads=1, n_ctx=1024) for _ in range(2)]

    async def run() -> dict[str, dict[str, float]]:
        out = {}
        for policy in ("round-robin", "least-outstanding", "prompt-sticky", "prompt-affinity"):
            for e in engines:  # the same cold start for every policy
                async for _ in e.generate("Reset.", GenerationParams(max_tokens=1)):
                    pass
            out[policy] = await run_policy(policy, engines, reqs, a.concurrency)
        return out

    res = trio.run(run)
    print(
        f"Prompt-aware routing over 2 llama.cpp instances, {a.requests} requests, {a.templates} prompt templates, {a.concurrency} in flight"
    )
    print()
    print(
        "| policy | prompt tokens | evaluated | reused from cache | wall | mean latency | p90 latency |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for policy, r in res.items():
        print(
            f"| {policy} | {r['prompt']:.0f} | {r['evaluated']:.0f} | {r['reused'] / r['prompt']:.0%} | {r['wall']:.2f} s | {r['mean']:.2f} s | {r['p90']:.2f} s |"
        )
    rr = res["round-robin"]
    print()
    for name in ("prompt-sticky", "prompt-affinity"):
        r = res[name]
        print(
            f"{name} vs round-robin: {r['evaluated'] / rr['evaluated']:.2f}x the prompt tokens evaluated, {r['wall'] / rr['wall']:.2f}x the wall time"
        )


if __name__ == "__main__":
    main()
