"""File-level safety for the store: hashing, `.npy` header checks, atomic folder writes and an
all-or-nothing multi-file commit for live edits.

Why two mechanisms: a fresh store (encode_kv) is built in a sibling temp folder and swapped in with
one rename (an atomic exchange when the folder already exists), so an interrupted run leaves the
old store. Edits touch several files inside a live store; they are staged in `.pending/`, a
`COMMIT` marker is written last (the commit point), then files are moved in. `recover()` (called on
load) finishes a committed edit or discards an uncommitted one, so the store is always old or new.

Two advisory locks (fcntl.flock) live inside the store: `.writer.lock`, held by the one process
allowed to change the store (a serving process holds it for its lifetime, an offline edit for the
edit), and `.commit.lock`, exclusive while a commit is applied or recovered, shared while a reader
that must not write (a read-only server) loads. The kernel drops both when a process dies.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

PENDING = ".pending"
COMMIT = "COMMIT"
WRITER_LOCK = ".writer.lock"
COMMIT_LOCK = ".commit.lock"


class StoreError(ValueError):
    """A store that does not agree with its manifest (or is missing pieces); message names the file."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


# ---- locks --------------------------------------------------------------------------------------

_held: dict[str, list[int]] = {}  # real store path -> [fd, depth]: writer locks this process holds
_held_guard = threading.Lock()


def acquire_writer(root: str | Path) -> None:
    """Take the store's writer lock (re-entrant within this process); StoreLockedError if another
    process holds it. The lock file records the holder's pid for the message."""
    key = os.path.realpath(root)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            return
        path = Path(root) / WRITER_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"{path}: the store is in use by another writer (pid {holder}); stop it, or "
                                   "start this server with --read_only") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held[key] = [fd, 1]


def release_writer(root: str | Path) -> None:
    """Undo one `acquire_writer`; the lock is dropped when the outermost holder releases."""
    key = os.path.realpath(root)
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def writer_lock(root: str | Path) -> Iterator[None]:
    acquire_writer(root)
    try:
        yield
    finally:
        release_writer(root)


@contextlib.contextmanager
def commit_lock(root: str | Path, exclusive: bool) -> Iterator[None]:
    """Exclusive while a commit is applied, shared while a non-writing reader loads (blocking)."""
    path = Path(root) / COMMIT_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive or not path.exists():  # a read-only folder nobody can write: nothing to wait for
            if exclusive:
                raise
            yield
            return
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_store_id() -> str:
    return uuid.uuid4().hex


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: {what} is not valid JSON ({err})") from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save without pickle into an already-temporary location (callers handle atomicity)."""
    with open(path, "wb") as handle:
        np.save(handle, np.asarray(array, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d


def npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, without reading the data."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
        except ValueError as err:
            raise StoreError(f"{path}: not a valid .npy file ({err})") from None
        if fortran:
            raise StoreError(f"{path}: Fortran-ordered arrays are not supported")
        return tuple(shape), np.dtype(dtype), handle.tell()


def check_npy(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Header and file size must match the manifest exactly (catches truncation and swaps)."""
    if not path.is_file():
        raise StoreError(f"{path}: missing (the manifest lists it)")
    got_shape, got_dtype, offset = npy_header(path)
    if got_shape != tuple(shape):
        raise StoreError(f"{path}: shape {got_shape} but the manifest says {tuple(shape)}")
    if got_dtype != np.dtype(dtype):
        raise StoreError(f"{path}: dtype {got_dtype} but the manifest says {dtype}")
    need = offset + int(np.prod(shape, dtype=np.int64)) * got_dtype.itemsize
    size = path.stat().st_size
    if size != need:
        raise StoreError(f"{path}: file has {size} bytes, shape {got_shape} {got_dtype} needs {need} "
                         f"({'truncated' if size < need else 'trailing bytes'})")


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# ---- whole-folder replacement -------------------------------------------------------------

def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where the OS offers it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp sibling folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the old folder
        else:  # portable fallback: a short window where `target` is absent, never half-written
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- multi-file commit inside a live folder -------------------------------------------------

Writer = Callable[[Path], None]


def commit_files(root: str | Path, writers: dict[str, Writer], _crash_after: str | None = None) -> None:
    """Replace several files under `root` all-or-nothing (see module doc).

    `writers` maps a relative path to a function writing that file at the path it is given.
    `_crash_after` ("stage" or "commit") exists for tests that simulate an interruption."""
    root = Path(root)
    with commit_lock(root, exclusive=True):
        _recover_locked(root)
        pending = root / PENDING
        pending.mkdir()
        try:
            for rel, write in writers.items():
                dest = pending / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                write(dest)
        except BaseException:
            shutil.rmtree(pending, ignore_errors=True)
            raise
        if _crash_after == "stage":
            raise KeyboardInterrupt("simulated crash before commit")
        _fsync_dir(pending)
        write_json_atomic(pending / COMMIT, {"files": sorted(writers)})
        if _crash_after == "commit":
            raise KeyboardInterrupt("simulated crash after commit")
        _apply(root)


def _apply(root: Path) -> None:
    pending = root / PENDING
    files = read_json(pending / COMMIT, "commit marker")["files"]
    for rel in files:
        src = pending / rel
        if src.exists():  # already moved by an earlier, interrupted apply
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, root / rel)
    _fsync_dir(root)
    shutil.rmtree(pending)


def recover(root: str | Path) -> str | None:
    """Finish a committed edit or drop an uncommitted one; returns what it did (or None)."""
    if not (Path(root) / PENDING).exists():
        return None
    with commit_lock(root, exclusive=True):  # never under a commit another process is writing
        return _recover_locked(Path(root))


def check_no_unfinished_commit(root: str | Path) -> None:
    """For readers that must not write: a committed but unapplied edit means files are mixed."""
    if (Path(root) / PENDING / COMMIT).is_file():
        raise StoreError(f"{Path(root) / PENDING}: an edit was committed but not applied (a writer crashed); "
                         "open the store once without --read_only to finish it")


def _recover_locked(root: Path) -> str | None:
    pending = Path(root) / PENDING
    if not pending.exists():
        return None
    if (pending / COMMIT).is_file():
        _apply(Path(root))
        return "rolled forward"
    shutil.rmtree(pending)
    return "rolled back"
