"""Artifacts built on first use: built exactly once, published atomically, verified.

Some things alto needs are too big to ship or too slow to build at every start, so they
are built the first time they are needed and kept in alto's cache directory: the
assembled default model file (Gemma 3 270M, GGUF, about 250 MB), a BM25 index, the
reranker's passage encodings. Several stage instances (separate processes) start at
once and all want the same artifact; a machine may crash or a user may press Ctrl-C in
the middle of a build. The rules, which every such artifact follows:

* **One builder.** :func:`ensure_file` and :func:`ensure_directory` take an exclusive
  ``fcntl.flock`` on a sibling lock file (``.NAME.lock``) before building. Processes
  that start at once queue on it; when the builder is done they find its result and use
  it. The kernel drops the lock when its holder dies, so a crashed builder never blocks
  anyone. (flock locks belong to an open file description, so threads of one process
  that call these functions also exclude each other.)
* **Atomic publication.** The build writes into a temporary file or directory next to
  the final path (``.NAME.tmp-PID-RANDOM``: same directory, hence same file system);
  the result is fsync'ed, then renamed into place (``os.replace``; a directory that is
  replaced is first renamed aside, then removed), and the parent directory is fsync'ed.
  A reader therefore sees nothing or a complete artifact, never a half-written one.
* **Verification.** A file with a known sha256 (the model) is hashed once; a small
  sidecar stamp (``.NAME.verified.json``: size, mtime, inode, sha256) written after the
  check lets later starts skip the 250 MB re-hash as long as the file's ``stat`` still
  matches; when it does not, the file is hashed again. A directory carries a completion
  manifest (``.alto-artifact.json``: a key describing what was built from what, and
  every file with its size), written last, inside the temporary directory, before the
  rename. Whatever fails these checks (a truncated file, a directory without manifest,
  one built for another key, a file of the wrong size) is rebuilt with a logged
  warning, never fatal; temporary leftovers of a crashed build are removed by the next
  builder (they cannot belong to a live one: every builder holds the lock).
* **Never someone else's data.** A directory is only ever replaced when it is an
  artifact (it has a manifest), is empty, or holds only files a build of it would write
  (the caller names them: what an older version or an interrupted build may have
  left). Anything else at the path is refused with :class:`ArtifactError`: an
  ``index_dir`` pointing at the home directory must not get it deleted.

Where: :func:`cache_dir` (``$ALTO_CACHE_DIR``, else ``$XDG_CACHE_HOME/alto``, else
``~/.cache/alto``); :func:`cache_path` resolves a user-given relative path (e.g. a
stage's ``index_dir``) against it, so one environment variable moves every cache.

Before instances start, ``alto serve`` can build everything once with
:func:`prepare_artifacts`: it calls the optional ``prepare(options)`` static or class
method of each stage's entry class (blocking; it builds or verifies what the stage will
need given its pipeline ``options``). Instances stay safe without it: the lock makes
concurrent first use safe.

Errors: :class:`ArtifactError` (an :class:`alto.AltoError`): the cache location is
invalid, a build failed or produced something else than expected (e.g. the model's
sha256 does not match: the package that ships it is damaged), or the path holds
something that is not ours to replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._config import PipelineConfig, resolve
from ._errors import AltoError

logger = logging.getLogger("alto.artifacts")

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "cache_dir",
    "cache_path",
    "directory_fingerprint",
    "ensure_directory",
    "ensure_file",
    "prepare_artifacts",
    "publish_directory",
]

MANIFEST_NAME = ".alto-artifact.json"
"""The completion manifest inside a directory artifact (written last)."""

_MANIFEST_FORMAT = "alto-artifact/1"
_STAMP_FORMAT = "alto-verified/1"
_HASH_BLOCK = 1 << 20


class ArtifactError(AltoError):
    """An artifact could not be built or placed; ``path`` is the artifact's final path
    (``None`` when the cache location itself is wrong)."""

    def __init__(self, path: Path | None, message: str) -> None:
        self.path = path
        super().__init__(message)


# -- where -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """alto's cache directory: ``$ALTO_CACHE_DIR``, else ``$XDG_CACHE_HOME/alto``, else
    ``~/.cache/alto``. Not created here.

    Raises :class:`ArtifactError` when ``ALTO_CACHE_DIR`` is a relative path (stage
    instances and ``alto serve`` may run in other directories, so a relative path would
    mean different places). A relative ``XDG_CACHE_HOME`` is ignored, as the XDG Base
    Directory specification asks.
    """
    value = os.environ.get("ALTO_CACHE_DIR", "")
    if value:
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ArtifactError(
                None, f"ALTO_CACHE_DIR must be an absolute path or start with ~/, got {value!r}"
            )
        return path
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "alto"
    return Path.home() / ".cache" / "alto"


def cache_path(path: str | os.PathLike[str]) -> Path:
    """A user-given artifact path: ``~`` is expanded, an absolute path stays as it is, and
    a relative one is relative to :func:`cache_dir` (so ``ALTO_CACHE_DIR`` moves it).

    Raises :class:`ArtifactError` for an empty path, or as :func:`cache_dir` does.
    """
    text = os.fspath(path)
    if not text:
        raise ArtifactError(None, "an artifact path must not be empty")
    p = Path(text).expanduser()
    return p if p.is_absolute() else cache_dir() / p


# -- the lock ----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive inter-process lock of the artifact at ``path``.

    The lock file stays after use: removing it would let a process that opened the old
    file and one that creates a new one both believe they hold "the" lock.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
    except OSError as exc:
        raise ArtifactError(path, f"cannot create the lock for {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            logger.info(
                "waiting for %s: another process%s is building it",
                path,
                f" (pid {holder})" if holder.isdigit() else "",
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Who holds it, for the message above (advisory only).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- helpers -----------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; what cannot be removed is left for later."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _clean_stale(path: Path) -> None:
    """Remove temporary leftovers of earlier builds of ``path``.

    Call only while holding the lock: every build holds it, so no live build owns them.
    """
    prefix = glob.escape(str(path.parent / f".{path.name}."))
    for pattern in ("tmp-*", "old-*"):
        for leftover in glob.glob(prefix + pattern):
            logger.info("removing %s, left over by an interrupted build", leftover)
            _remove(Path(leftover))


def _discard(path: Path) -> None:
    """Take ``path`` out of the way atomically (rename aside), then remove it."""
    aside = _temp_name(path, "old")
    os.rename(path, aside)
    _remove(aside)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = _temp_name(path, "tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_path(path.parent, directory=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _normalise_key(key: Mapping[str, Any]) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(json.dumps(dict(key), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"an artifact key must be JSON-serialisable: {exc}") from exc
    return value


def _run_build(path: Path, build: Callable[[Path], None], tmp: Path, what: str) -> None:
    try:
        build(tmp)
    except AltoError:
        raise
    except Exception as exc:
        raise ArtifactError(path, f"building {what} failed: {type(exc).__name__}: {exc}") from exc


# -- files -------------------------------------------------------------------------------


def _stamp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.verified.json"


def _stamp_matches(path: Path, expected: str | None) -> bool:
    """Whether the stamp vouches for the file now at ``path`` (no hashing)."""
    stamp = _read_json(_stamp_path(path))
    if stamp is None or stamp.get("format") != _STAMP_FORMAT:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if expected is not None and stamp.get("sha256") != expected:
        return False
    return (
        stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
        and stamp.get("inode") == st.st_ino
        and stamp.get("device") == st.st_dev
    )


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    _write_json_atomic(
        _stamp_path(path),
        {
            "format": _STAMP_FORMAT,
            "sha256": digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino,
            "device": st.st_dev,
        },
    )


def ensure_file(
    path: str | os.PathLike[str],
    build: Callable[[Path], None],
    *,
    sha256: str | None = None,
    what: str | None = None,
) -> Path:
    """The verified file at ``path``, built by ``build`` if it is missing or wrong.

    ``build(tmp)`` must create the complete file at ``tmp`` (a path that does not exist
    yet, in the same directory as ``path``). ``sha256``: the expected digest (hex), when
    known; the built file must match it, and an existing file is accepted only if it does.
    Without it, an existing file is accepted only if a stamp written after an earlier
    successful build vouches for it. ``what`` names the artifact in log messages.

    Blocking (hashing, building, waiting for another process's build): call it from a
    worker thread in async code. Raises :class:`ArtifactError` when the build fails,
    produces a file with another digest, or ``path`` is a directory.
    """
    path = Path(path)
    what = what or str(path)
    expected = sha256.lower() if sha256 is not None else None
    if expected is not None and (
        len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)
    ):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if _stamp_matches(path, expected):
        return path  # the common case: a stat and a small read
    with _locked(path):
        if _stamp_matches(path, expected):
            return path  # built by the process we waited for
        if path.is_dir():
            raise ArtifactError(path, f"{path} is a directory, expected the file {what}: remove it")
        if path.exists():
            # Present but not vouched for: from before stamps existed, touched since,
            # or a leftover of a non-atomic writer. Hash it once to find out.
            digest = _sha256_file(path)
            stamp = _read_json(_stamp_path(path)) or {}
            if digest == (expected if expected is not None else stamp.get("sha256")):
                _write_stamp(path, digest)
                return path
            logger.warning(
                "%s is incomplete or corrupt (sha256 %s, expected %s): rebuilding it",
                path,
                digest,
                expected if expected is not None else stamp.get("sha256", "a stamped build"),
            )
        else:
            logger.info("building %s at %s (first use)", what, path)
        _clean_stale(path)
        started = time.monotonic()
        tmp = _temp_name(path, "tmp")
        try:
            _run_build(path, build, tmp, what)
            if not tmp.is_file():
                raise ArtifactError(path, f"building {what} produced no file")
            _fsync_path(tmp)
            digest = _sha256_file(tmp)
            if expected is not None and digest != expected:
                raise ArtifactError(
                    path,
                    f"built {what} but its sha256 is {digest}, expected {expected}: "
                    "its source is damaged (reinstall the package that ships it)",
                )
            os.replace(tmp, path)
            _fsync_path(path.parent, directory=True)
            _write_stamp(path, digest)
        except OSError as exc:
            raise ArtifactError(path, f"cannot build {what} at {path}: {exc}") from exc
        finally:
            _remove(tmp)
        logger.info("built %s in %.1f s", what, time.monotonic() - started)
    return path


# -- directories -------------------------------------------------------------------------


def _manifest_problem(path: Path, key: dict[str, Any]) -> str | None:
    """Why the directory at ``path`` is not a complete artifact for ``key`` (None: it is)."""
    if not path.is_dir():
        return "missing" if not path.exists() else "not a directory"
    manifest = _read_json(path / MANIFEST_NAME)
    if manifest is None:
        return f"it has no completion manifest ({MANIFEST_NAME}): an interrupted or older build"
    if manifest.get("format") != _MANIFEST_FORMAT:
        return f"its manifest has format {manifest.get('format')!r}, not {_MANIFEST_FORMAT!r}"
    if manifest.get("key") != key:
        return f"it was built for {manifest.get('key')!r}, not {key!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "its manifest lists no files"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return None


def _replaceable(path: Path, leftover_names: Collection[str]) -> bool:
    """Whether the existing directory at ``path`` is ours to replace (see the module doc)."""
    if (path / MANIFEST_NAME).is_file():
        return True
    allowed = set(leftover_names)
    try:
        entries = list(path.iterdir())
    except OSError:
        return False
    return all(e.name in allowed and e.is_file() and not e.is_symlink() for e in entries)


def _place_directory(
    path: Path,
    build: Callable[[Path], None],
    key: dict[str, Any],
    what: str,
    leftover_names: Collection[str],
) -> None:
    """Build into a temporary directory and rename it to ``path``. Hold the lock."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ArtifactError(
            path, f"{path} exists and is not a directory (or is a symbolic link): remove it"
        )
    if path.is_dir() and not _replaceable(path, leftover_names):
        raise ArtifactError(
            path,
            f"{path} exists and is not an alto artifact (no {MANIFEST_NAME}); refusing to "
            f"replace it with {what}: remove it or choose another directory",
        )
    _clean_stale(path)
    started = time.monotonic()
    tmp = _temp_name(path, "tmp")
    try:
        tmp.mkdir()
        _run_build(path, build, tmp, what)
        if (tmp / MANIFEST_NAME).exists():
            raise ArtifactError(path, f"building {what} wrote {MANIFEST_NAME}, a reserved name")
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _fsync_tree(tmp)
        manifest = {"format": _MANIFEST_FORMAT, "key": key, "files": files}
        with (tmp / MANIFEST_NAME).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp, directory=True)
        if path.exists():
            _discard(path)
        os.rename(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OSError as exc:
        raise ArtifactError(path, f"cannot build {what} at {path}: {exc}") from exc
    finally:
        _remove(tmp)
    logger.info("built %s in %.1f s", what, time.monotonic() - started)


def ensure_directory(
    path: str | os.PathLike[str],
    build: Callable[[Path], None],
    *,
    key: Mapping[str, Any],
    what: str | None = None,
    leftover_names: Collection[str] = (),
) -> Path:
    """The complete directory at ``path`` built for ``key``, built by ``build`` if needed.

    ``build(tmp)`` fills ``tmp``, an empty directory next to ``path`` (it must not write
    :data:`MANIFEST_NAME`). ``key``: JSON-serialisable, what the contents were built
    from (format version, inputs' digests); a directory built for another key is
    rebuilt. ``leftover_names``: the file names a build writes, so that a directory
    holding only those (an older version's or an interrupted build's output) may be
    replaced. ``what`` names the artifact in log messages.

    Blocking: call it from a worker thread in async code. Raises :class:`ArtifactError`
    when the build fails or ``path`` holds something that is not ours to replace.
    """
    path = Path(path)
    what = what or str(path)
    norm = _normalise_key(key)
    if _manifest_problem(path, norm) is None:
        return path
    with _locked(path):
        problem = _manifest_problem(path, norm)
        if problem is None:
            return path  # built by the process we waited for
        if problem == "missing":
            logger.info("building %s at %s (first use)", what, path)
        else:
            logger.warning("%s is not usable (%s): rebuilding it", path, problem)
        _place_directory(path, build, norm, what, leftover_names)
    return path


def publish_directory(
    path: str | os.PathLike[str],
    build: Callable[[Path], None],
    *,
    key: Mapping[str, Any],
    what: str | None = None,
    leftover_names: Collection[str] = (),
) -> Path:
    """Build a directory artifact and put it at ``path`` atomically, replacing what is
    there (an explicit save). Arguments and errors as :func:`ensure_directory`."""
    path = Path(path)
    with _locked(path):
        _place_directory(path, build, _normalise_key(key), what or str(path), leftover_names)
    return path


def directory_fingerprint(path: str | os.PathLike[str], *, small: int = 64 * 1024) -> str:
    """A cheap identity of a directory's contents (e.g. a model checkpoint) for keys:
    sha256 over every file's relative path and size, plus the contents of files up to
    ``small`` bytes (configs). Independent of where the directory is.

    Raises :class:`ArtifactError` if ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(root, f"{root} is not a directory")
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        size = p.stat().st_size
        digest.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        if size <= small:
            digest.update(p.read_bytes())
    return digest.hexdigest()


# -- before instances start --------------------------------------------------------------


def prepare_artifacts(pipeline: PipelineConfig, log: Callable[[str], None] | None = None) -> None:
    """Build or verify, once, every artifact the pipeline's stages will need.

    For each stage whose entry is a class with a ``prepare`` attribute, calls
    ``prepare(options)`` with the stage's pipeline ``options`` (read-only). Meant for
    ``alto serve`` before it spawns instances, so that they find everything built
    instead of queueing on the lock. Blocking: from Trio,
    ``await trio.to_thread.run_sync(prepare_artifacts, pipeline)``. ``log`` receives
    one line per stage prepared (default: the ``alto.artifacts`` logger at INFO).

    Raises :class:`ArtifactError` naming the stage when its ``prepare`` fails (an
    :class:`alto.AltoError` it raises on purpose passes through unchanged), and
    ``ValueError`` when an entry cannot be imported.
    """
    say = log if log is not None else logger.info
    for name, stage in pipeline.stages.items():
        entry = resolve(stage.entry, what="stage entry")
        prepare = getattr(entry, "prepare", None) if inspect.isclass(entry) else None
        if prepare is None:
            continue
        if not callable(prepare):
            raise ArtifactError(None, f"stage {name!r}: {stage.entry}.prepare is not callable")
        started = time.monotonic()
        try:
            prepare(MappingProxyType(dict(stage.options)))
        except AltoError:
            raise
        except Exception as exc:
            raise ArtifactError(
                None,
                f"stage {name!r} ({stage.entry}): preparing its artifacts failed: "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        say(f"stage {name!r}: artifacts ready ({time.monotonic() - started:.1f} s)")
