"""Streaming BM25: score a query while the LM is still writing it.

Stage 4 of the paper's FacTool pipeline "exposes an interface to compute document
relevance scores token-by-token and then sum across all query tokens". That works
because BM25 is a sum over query terms: score(q, d) = sum over terms t in q of
score(t, d). So the BM25 stage need not wait for the whole search query; it adds one
per-term score vector (one float per passage) as each term arrives and, when the query
ends, only has to pick the top k. :class:`StreamingQuery` is that accumulator and
:meth:`BM25Index.token_scores` the per-term vector.

The index itself is bm25s (eager BM25: it precomputes every term's score for every
passage into a sparse matrix, so a term's score vector is one column; Lucene's BM25
variant, k1=1.5, b=0.75, as bm25s and Lucene default to). A term's vector is exactly
what ``bm25s.BM25.get_scores([term])`` returns, and the streaming sum equals bm25s's
score for the whole query (the tests hold us to that).

Words versus LM tokens
----------------------
An LM streams sub-word pieces (" Super", "B", "owl", " 50"), not words. A piece cannot
be scored until the word it belongs to is complete, i.e. until a character that cannot
continue a word arrives (a space, punctuation, the end of the query). The accumulator
keeps the unfinished word and scores it when such a boundary arrives; ``finish()``
closes the last word. Word boundaries are those of bm25s's default tokenizer: a word is
a maximal run of ``\\w`` characters, lowercased, kept if it has at least two characters
and is not an English stopword (bm25s's list, which is NLTK's). :func:`tokenize` applies
exactly the same rules to a whole text, and the corpus is indexed with it, so a term
reaches the index the same way whether it arrived whole or in pieces.

A passage's title is indexed with its text (as DPR and most Wikipedia retrievers do):
"Super_Bowl_50" becomes the words "super", "bowl", "50".
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .._artifacts import ensure_directory, publish_directory
from ._corpus import Passage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["BM25Index", "StreamingQuery", "tokenize"]

ScoreVector: TypeAlias = "npt.NDArray[np.float32]"
"""One float32 score per passage of the index, in index order."""

# A maximal run of word characters: the unit that a word boundary closes. Runs are then
# lowercased and cut into terms with bm25s's default token pattern (lowercasing can split
# a run, e.g. "İ" lowercases to "i" plus a combining dot that is not a word character).
_WORD_RUN = re.compile(r"\w+")
_TERM = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default token_pattern

# Written next to bm25s's own files by BM25Index.save(); bump when the tokenizer changes.
_META_NAME = "alto_bm25.json"
# Every file a save writes: a directory holding only these (an older alto's save, which
# wrote in place, or one cut short) may be replaced.
_FILE_NAMES = frozenset(
    {
        _META_NAME,
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
    }
)
_FORMAT = "alto-bm25/1"
_TOKENIZER = "word-run, lower, (?u)\\b\\w\\w+\\b, bm25s STOPWORDS_EN"


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _terms_of_run(run: str) -> list[str]:
    stop = _stopwords()
    return [t for t in _TERM.findall(run.lower()) if t not in stop]


def tokenize(text: str) -> list[str]:
    """Cut ``text`` into BM25 terms: the same terms a :class:`StreamingQuery` scores.

    Equivalent to ``bm25s.tokenize(text, stopwords="en", return_ids=False)`` except in
    one corner: a Greek capital sigma at the end of a word lowercases to "σ" here and
    may become a final "ς" there (Python's context-sensitive lowercasing).
    """
    return [term for run in _WORD_RUN.findall(text) for term in _terms_of_run(run)]


def _passage_text(passage: Passage) -> str:
    return f"{passage.title.replace('_', ' ')}\n{passage.text}"


def _top_k(scores: ScoreVector, k: int) -> list[tuple[int, float]]:
    import numpy as np

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    # A zero score means no query term occurs in the passage: not a match at all.
    matching = np.flatnonzero(scores > 0)
    # Stable sort over ascending indices: equal scores keep the lower passage index first,
    # so results are deterministic.
    order = matching[np.argsort(-scores[matching], kind="stable")[:k]]
    return [(int(i), float(scores[i])) for i in order]


class BM25Index:
    """A BM25 index over passages, scored term by term.

    Build one with :meth:`from_passages` (seconds for SQuAD; see the README for
    timings) or read a saved one with :meth:`load`. ``passage_ids[i]`` is the id of the
    passage that score index ``i`` refers to. Needs the ``bm25s`` package (the ``llm``
    extra).
    """

    def __init__(self, retriever: Any, passage_ids: Sequence[str]) -> None:
        # Private: use from_passages / from_texts / load.
        n_docs = int(retriever.scores["num_docs"])
        if n_docs != len(passage_ids):
            raise ValueError(f"index has {n_docs} documents but {len(passage_ids)} passage ids")
        self._bm25 = retriever
        self._passage_ids = tuple(passage_ids)

    @classmethod
    def from_passages(
        cls, passages: Iterable[Passage], *, k1: float = 1.5, b: float = 0.75
    ) -> BM25Index:
        """Index passages (title and text). Raises ``ValueError`` if there are none."""
        passages = list(passages)
        return cls.from_texts(
            [_passage_text(p) for p in passages], [p.id for p in passages], k1=k1, b=b
        )

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        k1: float = 1.5,
        b: float = 0.75,
    ) -> BM25Index:
        """Index plain texts; ``ids`` default to ``"0"``, ``"1"``, ...

        Raises ``ValueError`` if ``texts`` is empty or ``ids`` does not match it.
        """
        import bm25s

        if not texts:
            raise ValueError("cannot index an empty corpus")
        if ids is None:
            ids = [str(i) for i in range(len(texts))]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index([tokenize(t) for t in texts], show_progress=False)
        return cls(retriever, ids)

    @property
    def passage_ids(self) -> tuple[str, ...]:
        return self._passage_ids

    def __len__(self) -> int:
        return len(self._passage_ids)

    @property
    def vocabulary_size(self) -> int:
        return len(self._bm25.vocab_dict)

    def token_scores(self, token: str) -> ScoreVector:
        """The score of one term for every passage: a float32 vector of ``len(self)``.

        ``token`` is a term as :func:`tokenize` yields it (lowercase, not a stopword); a
        term the corpus never uses scores zero everywhere. The result is a new array the
        caller may modify.
        """
        import numpy as np

        if not token:
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self._bm25.get_scores([token]), dtype=np.float32)

    def scores(self, query: str) -> ScoreVector:
        """Batch scores of a whole query (what a :class:`StreamingQuery` adds up to)."""
        import numpy as np

        terms = tokenize(query)
        if not terms:
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` best passages for a whole query, as ``(passage_index, score)``."""
        return _top_k(self.scores(query), k)

    def stream(self) -> StreamingQuery:
        """Start a query that is scored as its text arrives."""
        return StreamingQuery(self)

    def save(self, directory: str | Path) -> None:
        """Write the index to ``directory``, atomically: it is built next to it and
        renamed into place, so a reader sees the old index or the new one, never a mix.

        The directory holds bm25s's own files, ``alto_bm25.json`` with the passage ids
        and the tokenizer's description, and a completion manifest
        (:mod:`alto._artifacts`). An existing index there is replaced; a directory that
        holds anything else is refused (:class:`alto._artifacts.ArtifactError`), so that
        a mistyped path never deletes someone's files.
        """
        publish_directory(
            directory,
            self._write,
            key=_artifact_key(self._passage_ids),
            what=f"a BM25 index of {len(self)} passages",
            leftover_names=_FILE_NAMES,
        )

    @classmethod
    def ensure(cls, directory: str | Path, passages: Sequence[Passage]) -> BM25Index:
        """The index of ``passages`` saved in ``directory``, built and saved first if it
        is missing, incomplete, or was built from other passages or by an incompatible
        version. Several processes may call this at once: one builds, the others wait
        for it and load its result (see :mod:`alto._artifacts`).

        Blocking (seconds when it builds). Raises ``ValueError`` if ``passages`` is
        empty and :class:`alto._artifacts.ArtifactError` if the index cannot be written
        or ``directory`` holds something else.
        """
        built: list[BM25Index] = []

        def build(tmp: Path) -> None:
            index = cls.from_passages(passages)
            index._write(tmp)
            built.append(index)

        ids = [p.id for p in passages]
        ensure_directory(
            directory,
            build,
            key=_artifact_key(ids),
            what=f"a BM25 index of {len(ids)} passages",
            leftover_names=_FILE_NAMES,
        )
        if built:
            return built[0]  # ours: no need to read it back
        return cls.load(directory)

    def _write(self, directory: Path) -> None:
        self._bm25.save(directory, show_progress=False)
        meta = {"format": _FORMAT, "tokenizer": _TOKENIZER, "passage_ids": self._passage_ids}
        (directory / _META_NAME).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> BM25Index:
        """Read an index written by :meth:`save` (or by an older alto's ``save``).

        ``mmap=True`` maps the score arrays instead of reading them (many processes then
        share one copy in the page cache). Raises ``FileNotFoundError`` if the directory
        holds no index and ``ValueError`` if it was written by an incompatible version
        (rebuild it then). To load only a complete index built from given passages, and
        build it otherwise, use :meth:`ensure`.
        """
        import bm25s

        directory = Path(directory)
        meta_path = directory / _META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no alto BM25 index in {directory} ({_META_NAME} missing)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT or meta.get("tokenizer") != _TOKENIZER:
            raise ValueError(
                f"{meta_path}: index format {meta.get('format')!r} with tokenizer "
                f"{meta.get('tokenizer')!r}; this version reads {_FORMAT!r} with "
                f"{_TOKENIZER!r}: rebuild the index"
            )
        retriever = bm25s.BM25.load(directory, mmap=mmap, show_progress=False)
        return cls(retriever, meta["passage_ids"])


def _artifact_key(passage_ids: Sequence[str]) -> dict[str, Any]:
    """What a saved index was built from: format, tokenizer, and the passages' ids (their
    digest: the texts come from the packaged corpus, which the ids name)."""
    digest = hashlib.sha256("\0".join(passage_ids).encode("utf-8")).hexdigest()
    return {
        "kind": "bm25",
        "format": _FORMAT,
        "tokenizer": _TOKENIZER,
        "passages": len(passage_ids),
        "passage_ids_sha256": digest,
    }


class StreamingQuery:
    """Accumulates BM25 scores of a query whose text arrives in pieces.

    Feed it text with :meth:`add_token` as the LM produces it; each word is scored as
    soon as the piece that ends it arrives. Call :meth:`finish` at the end of the query
    to score its last word, then read :meth:`top_k`. (:meth:`top_k` may be called at any
    time; before :meth:`finish` it ranks by the words completed so far.)
    """

    def __init__(self, index: BM25Index) -> None:
        import numpy as np

        self._index = index
        self._scores: ScoreVector = np.zeros(len(index), dtype=np.float32)
        self._pending = ""  # the tail of the text: a word that no boundary has closed yet
        self._terms: list[str] = []
        self._finished = False

    def add_token(self, piece: str) -> list[str]:
        """Append ``piece`` (an LM token, a word, any fragment) to the query text.

        Returns the terms this piece completed and scored, in order (often none: the
        piece may only extend a word, or be a stopword). Raises ``RuntimeError`` after
        :meth:`finish`.
        """
        if self._finished:
            raise RuntimeError("add_token() after finish(): the query is complete")
        text = self._pending + piece
        runs = _WORD_RUN.findall(text)
        if runs and text.endswith(runs[-1]):
            # The text ends inside a word: the next piece may continue it.
            self._pending = runs.pop()
        else:
            self._pending = ""
        return self._score_runs(runs)

    def finish(self) -> list[str]:
        """End the query: score the word still open, if any; returns the terms it added.

        Idempotent.
        """
        runs = [self._pending] if self._pending else []
        self._pending = ""
        self._finished = True
        return self._score_runs(runs)

    def _score_runs(self, runs: list[str]) -> list[str]:
        added: list[str] = []
        for run in runs:
            for term in _terms_of_run(run):
                self._scores += self._index.token_scores(term)
                added.append(term)
        self._terms.extend(added)
        return added

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def terms(self) -> tuple[str, ...]:
        """The terms scored so far, in arrival order (duplicates count twice, as in bm25s)."""
        return tuple(self._terms)

    @property
    def scores(self) -> ScoreVector:
        """The running score of every passage (a read-only view)."""
        view = self._scores.view()
        view.flags.writeable = False
        return view

    def top_k(self, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` best passages so far as ``(passage_index, score)``, best first.

        Passages that match no term (score 0) are left out, so fewer than ``k`` may come
        back; equal scores rank the lower index first. Raises ``ValueError`` if k < 1.
        """
        return _top_k(self._scores, k)
