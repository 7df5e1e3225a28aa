"""A critical-path model of one FacTool request from the paper's Table 1, per mode.

Monte Carlo over ``--requests`` requests (seeded): QA answers of 62.5 +- 57.2 words at
20.7 ms per token, claims (3.3 per 62.5-word answer, as alto's emulated claims stage
draws them: proportional to the answer's length) of 9.8 +- 3.5 words at 41.2 ms, 2.5 +- 1.3
queries per claim of 5.5 +- 3.1 words at 59.8 ms (cv 1.33), and a retrieval time
``--retrieval`` after a query ends. Counts and lengths are lognormal, as in
``alto.engines._emulated``; sentences of about 20 words.

Modes, by when each piece of work may start:

* ``baseline``: claim extraction after the whole answer; query generation after all of
  a request's claims, the claims' queries in parallel; retrieval after all of a claim's
  queries (the paper's "Compound AI Systems Today" as alto's baseline config runs it);
* ``baseline-serial``: the same, but one request's claims' queries one after another (a
  reading of the paper's baseline that figure3-model readers should see, never choose
  silently: it flatters streaming);
* ``streaming``: the paper's: each claim's queries start when the claim is written, each
  query's retrieval when the query is;
* ``sentences``: streaming, plus each sentence of the answer goes to claim extraction as
  soon as it is complete.

Load: continuous batching slows every token by ``1 + alpha * (B - 1)`` when B sequences
share an LM instance (the emulated engine's model, alpha 0.05). B per stage follows from
Little's law at offered load ``lambda``: sequences per request times their duration, over
the stage's instances (the paper's deployment: QA 2, claims 2, queries 3). The model
finds, per mode, the highest load at which the median stays under the 4 s target, and
prints the ratios that the paper's two headline numbers are about.

    python benchmarks/critical_path.py                 # a table, about 10 s
    python benchmarks/critical_path.py --json model.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

QA = (62.5, 57.2, 0.0207, 0.1)
CLAIMS_PER_WORD = 3.3 / 62.5
CLAIM_WORDS = (9.8, 3.5, 0.4036 / 9.8, 0.25)
QUERIES = (2.5, 1.3)
QUERY_WORDS = (5.5, 3.1, 0.0598, 79.3 / 59.8)
SENTENCE_WORDS = 20.0
MAX_CLAIMS, MAX_QUERIES = 12, 8  # the pipeline's max_claims and max_queries
INSTANCES = {"qa": 2, "claims": 2, "queries": 3}
ALPHA = 0.05
TARGET = 4.0
MODES = ("baseline", "baseline-serial", "streaming", "sentences")


def lognormal(rng: random.Random, mean: float, std: float) -> float:
    s2 = math.log1p((std / mean) ** 2)
    return rng.lognormvariate(math.log(mean) - s2 / 2, math.sqrt(s2))


def count(rng: random.Random, mean: float, std: float, least: int = 1) -> int:
    return max(least, round(lognormal(rng, mean, std)))


class Request:
    """One request's sampled work: token times (at batch 1) for every output."""

    def __init__(self, rng: random.Random, proportional: bool) -> None:
        words = min(400, count(rng, QA[0], QA[1]))  # the QA stage's max_tokens
        self.qa = [lognormal(rng, QA[2], QA[2] * QA[3]) for _ in range(words)]
        # sentence ends (word indexes) and the claims of each sentence
        self.sentences: list[int] = []
        i = 0
        while i < words:
            i = min(words, i + count(rng, SENTENCE_WORDS, SENTENCE_WORDS / 2))
            self.sentences.append(i)
        if proportional:  # in proportion to the answer (alto's emulated claims with
            # outputs_per_input_word: what splitting into sentences needs)
            mean = CLAIMS_PER_WORD * words
            n_claims = count(rng, mean, mean * 1.8 / 3.3, 0)
        else:  # independent of the answer, as Table 1 gives the counts
            n_claims = count(rng, 3.3, 1.8)
        n_claims = min(MAX_CLAIMS, n_claims)
        self.claims = [
            [lognormal(rng, CLAIM_WORDS[2], CLAIM_WORDS[2] * CLAIM_WORDS[3])
             for _ in range(count(rng, CLAIM_WORDS[0], CLAIM_WORDS[1]))]
            for _ in range(n_claims)
        ]  # fmt: skip
        self.queries = [
            [[lognormal(rng, QUERY_WORDS[2], QUERY_WORDS[2] * QUERY_WORDS[3])
              for _ in range(count(rng, QUERY_WORDS[0], QUERY_WORDS[1]))]
             for _ in range(min(MAX_QUERIES, count(rng, *QUERIES)))]
            for _ in range(n_claims)
        ]  # fmt: skip
        # Which sentence each claim comes from (claims spread evenly over sentences).
        n_s = len(self.sentences)
        self.claim_sentence = [c * n_s // max(1, n_claims) for c in range(n_claims)]

    def latency(self, mode: str, slow: dict[str, float], retrieval: float) -> float:
        """End-to-end latency with every token of a stage slowed by ``slow[stage]``."""
        qa_t = [t * slow["qa"] for t in self.qa]
        answer = sum(qa_t)
        claim_t = [sum(c) * slow["claims"] for c in self.claims]
        query_t = [[sum(q) * slow["queries"] for q in qs] for qs in self.queries]
        if not self.claims:
            return answer
        if mode in ("baseline", "baseline-serial"):
            claims_done = answer + sum(claim_t)
            if mode == "baseline":
                return claims_done + max(sum(qs) for qs in query_t) + retrieval
            return claims_done + sum(sum(qs) for qs in query_t) + retrieval
        end = 0.0
        if mode == "streaming":
            t = answer
            for c, qs in zip(claim_t, query_t, strict=True):
                t += c  # claims come out one after another
                done = t
                for q in qs:  # one query after another, each retrieved as it ends
                    done += q
                    end = max(end, done + retrieval)
            return end
        # sentences: claim extraction of sentence s starts when s is written (and when
        # the extraction of the previous sentence is done: one sequence per request)
        sent_end = [sum(qa_t[:i]) for i in self.sentences]
        free = 0.0
        by_sentence: dict[int, list[int]] = {}
        for ci, s in enumerate(self.claim_sentence):
            by_sentence.setdefault(s, []).append(ci)
        for s, ready in enumerate(sent_end):
            t = max(ready, free)
            for ci in by_sentence.get(s, []):
                t += claim_t[ci]
                done = t
                for q in query_t[ci]:
                    done += q
                    end = max(end, done + retrieval)
            free = t
        return max(end, answer)

    def busy(self) -> dict[str, float]:
        """Sequence-seconds per stage at batch 1 (for Little's law)."""
        return {
            "qa": sum(self.qa),
            "claims": sum(sum(c) for c in self.claims),
            "queries": sum(sum(sum(q) for q in qs) for qs in self.queries),
        }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def slowdown(requests: list[Request], rate: float) -> dict[str, float]:
    """Per-token slowdown per stage at ``rate`` req/s: a fixed point of
    B = rate * sequence-seconds per request * slowdown / instances."""
    mean_busy = {k: sum(r.busy()[k] for r in requests) / len(requests) for k in INSTANCES}
    slow = dict.fromkeys(INSTANCES, 1.0)
    for _ in range(100):
        new = {}
        for k, n in INSTANCES.items():
            batch = max(1.0, rate * mean_busy[k] * slow[k] / n)
            new[k] = 1 + ALPHA * (batch - 1)
        if all(abs(new[k] - slow[k]) < 1e-6 for k in INSTANCES):
            break
        slow = new
    return slow


def at_load(
    requests: list[Request], mode: str, rate: float, retrieval: float
) -> tuple[float, float]:
    slow = slowdown(requests, rate)
    lat = [r.latency(mode, slow, retrieval) for r in requests]
    return pct(lat, 0.5), pct(lat, 0.99)


def highest(f: Callable[[float], float], hi: float = 64.0) -> float:
    """The highest rate in 0..hi where f(rate) <= TARGET (bisection; 0 if never)."""
    if f(0.0) > TARGET:
        return 0.0
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if f(mid) <= TARGET:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--retrieval", type=float, default=0.1, help="seconds after a query ends")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not 100 <= a.requests <= 1_000_000 or not 0 <= a.retrieval <= 10:
        ap.error("--requests must be in 100..1000000 and --retrieval in 0..10")
    rows: list[dict[str, Any]] = []  # one JSON object per mode and claim model
    for claims in ("independent", "proportional"):
        rng = random.Random(a.seed)
        reqs = [Request(rng, claims == "proportional") for _ in range(a.requests)]
        for mode in MODES:
            if mode == "sentences" and claims == "independent":
                continue  # splitting into sentences needs claims in proportion to the text
            p50, p99 = at_load(reqs, mode, 0.0, a.retrieval)
            best = highest(lambda r, m=mode, q=reqs: at_load(q, m, r, a.retrieval)[0])  # type: ignore[misc]
            rows.append(
                {
                    "mode": mode,
                    "claims": claims,
                    "p50_zero_load": p50,
                    "p99_zero_load": p99,
                    "max_load_at_target": best,
                }
            )
    print(
        f"Critical-path model, {a.requests} requests (Table 1), retrieval {a.retrieval:g} s, alpha {ALPHA}"
    )
    print()
    print(
        "| mode | claims per request | p50 at zero load | p99 at zero load | baseline / mode p99 "
        "| highest load with p50 <= 4 s (model) | vs baseline |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        base = next(b for b in rows if b["mode"] == "baseline" and b["claims"] == r["claims"])
        best = base["max_load_at_target"]
        ratio = r["max_load_at_target"] / best if best else math.inf
        print(
            f"| {r['mode']} | {r['claims']} | {r['p50_zero_load']:.2f} s | {r['p99_zero_load']:.2f} s "
            f"| {base['p99_zero_load'] / r['p99_zero_load']:.2f}x | {r['max_load_at_target']:.2f} req/s | {ratio:.2f}x |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
