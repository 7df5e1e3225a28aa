"""The retrieval corpus: SQuAD v1.1 questions and passages.

The paper drives its FacTool-style pipeline with SQuAD questions and retrieves evidence
from a local passage corpus, so we do the same. Two corpora:

- ``"dev"``: the 2,067 context paragraphs of the SQuAD v1.1 dev set, packaged in the
  wheel (``alto/data/``, 0.6 MB) with its 10,570 questions. Small enough for tests and
  examples; every question's ``gold_pid`` names its paragraph here.
- ``"all"``: the 20,958 train + dev paragraphs (5.8 MB compressed), the larger corpus of
  the benchmarks. It is kept out of the wheel and read from the checkout
  (``data/squad/v1.1-all.paragraphs.jsonl.gz``) or from a path you pass.

Both are JSON lines, gzip-compressed, one record a line; the format and the CC BY-SA 4.0
notice are in ``alto/data/README.md``. Records are read into frozen dataclasses so that a
passage can be shared between stages and used as a dict key without defensive copies.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

__all__ = ["Passage", "Question", "load_passages", "load_questions"]

_DEV_QUESTIONS = "dev-v1.1.questions.jsonl.gz"
_DEV_PASSAGES = "dev-v1.1.paragraphs.jsonl.gz"
# Relative to the checkout root (src/alto/retrieval/_corpus.py is three levels below it).
_ALL_PASSAGES = Path("data") / "squad" / "v1.1-all.paragraphs.jsonl.gz"


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable paragraph: ``id`` is stable across corpora (``dev_<title>_<n>``)."""

    id: str
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Question:
    """One SQuAD question with its reference answers and the id of its gold passage.

    ``answers`` and ``answer_starts`` are parallel (a character offset into the gold
    passage's text for each annotator's answer; answers repeat when annotators agree).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    gold_pid: str


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read questions from a ``.jsonl`` or ``.jsonl.gz`` file; by default the packaged dev set.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` (naming
    the file and line) if a record lacks a field or has one of the wrong type.
    """
    source = path if path is not None else _packaged(_DEV_QUESTIONS)
    out: list[Question] = []
    for where, record in _read_jsonl(source):
        try:
            out.append(
                Question(
                    id=_str(record["id"]),
                    question=_str(record["question"]),
                    answers=tuple(_str(a) for a in record["answers"]),
                    answer_starts=tuple(_int(s) for s in record["answer_starts"]),
                    gold_pid=_str(record["gold_pid"]),
                )
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a question record ({exc!r})") from exc
    return out


def load_passages(
    path: str | Path | None = None, corpus: Literal["dev", "all"] = "dev"
) -> list[Passage]:
    """Read passages from ``path``, or else the named corpus (see the module docstring).

    ``corpus="dev"`` reads the packaged dev paragraphs. ``corpus="all"`` reads the train
    + dev paragraphs from the checkout; it raises ``FileNotFoundError`` (naming where it
    looked) in an installed wheel, where you must pass ``path`` instead. A record that
    lacks ``id``, ``title`` or ``text`` raises ``ValueError`` naming the file and line.
    """
    source: str | Path | resources.abc.Traversable
    if path is not None:
        source = path
    elif corpus == "dev":
        source = _packaged(_DEV_PASSAGES)
    elif corpus == "all":
        source = _checkout_file(_ALL_PASSAGES)
    else:
        raise ValueError(f"unknown corpus {corpus!r}; expected 'dev' or 'all'")
    out: list[Passage] = []
    for where, record in _read_jsonl(source):
        try:
            out.append(
                Passage(
                    id=_str(record["id"]),
                    title=_str(record["title"]),
                    text=_str(record["text"]),
                )
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a passage record ({exc!r})") from exc
    return out


def _packaged(name: str) -> resources.abc.Traversable:
    # One name per joinpath(): namespace-package paths take no more on Python 3.11.
    return resources.files("alto").joinpath("data").joinpath(name)


def _checkout_file(relative: Path) -> Path:
    # Benchmarks run from a checkout; the file is deliberately not in the wheel.
    candidates = [Path(__file__).resolve().parents[3] / relative, Path.cwd() / relative]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{relative} is not packaged with alto and was not found (tried: {tried}); "
        "run from a checkout of the repository or pass its path"
    )


def _read_jsonl(
    source: str | Path | resources.abc.Traversable,
) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(source, str):
        source = Path(source)
    name = str(source)
    with ExitStack() as stack:
        raw = stack.enter_context(source.open("rb"))
        stream: Iterable[bytes] = raw
        if name.endswith(".gz"):
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            yield where, record


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
