"""The FacTool-inspired claim verification pipeline (configs/factool.toml)."""

from ._stages import (
    AnswerQuestion,
    EncodeQuery,
    ExtractClaims,
    GenerateQueries,
    Rerank,
    StreamingBM25,
    claims_prompt,
    qa_prompt,
    queries_prompt,
)

__all__ = [
    "AnswerQuestion",
    "EncodeQuery",
    "ExtractClaims",
    "GenerateQueries",
    "Rerank",
    "StreamingBM25",
    "claims_prompt",
    "qa_prompt",
    "queries_prompt",
]
