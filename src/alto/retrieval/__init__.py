"""Retrieval for the FacTool-style pipeline: the SQuAD corpus, streaming BM25, MaxSim reranking.

Stages 4 and 5 of the paper's claim verifier: :class:`BM25Index` and
:class:`StreamingQuery` score a search query term by term while the LM is still writing
it; :class:`MaxSimReranker` reranks BM25's candidates by ColBERT-style late interaction.
:func:`load_questions` and :func:`load_passages` read the SQuAD v1.1 data the pipeline
and its benchmarks run on.

Importing this package is cheap: numpy, bm25s, torch and sentence-transformers (the ``llm``
extra) are imported only when an index or a reranker is built.
"""

from ._bm25 import BM25Index, StreamingQuery, tokenize
from ._colbert import MaxSimReranker, PassageStore, RerankerStatistics, from_bytes, maxsim, to_bytes
from ._corpus import Passage, Question, load_passages, load_questions

__all__ = [
    "BM25Index",
    "MaxSimReranker",
    "Passage",
    "PassageStore",
    "Question",
    "RerankerStatistics",
    "StreamingQuery",
    "from_bytes",
    "load_passages",
    "load_questions",
    "maxsim",
    "to_bytes",
    "tokenize",
]
