"""Crash-safe files for resumable stores: atomic writes, checksummed blobs, JSON, a lock.

- :func:`atomic_write`: write to a temporary file in the same directory, flush,
  ``fsync``, ``os.replace`` onto the final name, ``fsync`` the directory. A
  reader sees the old file or the new one, never half of one, even if the
  writer is killed with SIGKILL or the machine loses power.
- Blobs (:func:`write_blob` / :func:`read_blob`): ``MAGIC + sha256(payload) +
  payload`` with ``payload = torch.save(obj)``; a truncated or altered file
  fails the checksum and raises :class:`CorruptFileError`.
- :func:`request_hash`: sha256 of canonical JSON, the key of a store.
- :class:`StoreLock`: an exclusive ``flock`` on a store directory, released by the
  kernel when its process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

MAGIC = b"CURVINF-BLOB-1\n"
TMP_SUFFIX = ".tmp"


class CorruptFileError(ValueError):
    """A store file is truncated, altered or unreadable."""


class StoreBusyError(RuntimeError):
    """Another process holds the store's lock; ``pid`` is its process id when known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        fh = open(tmp, "wb")
    except PermissionError as err:
        raise PermissionError(
            f"cannot write {path}: {path.parent} is not writable; make it writable, or use "
            "another output directory."
        ) from err
    with fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory``; return them."""
    leftovers = sorted(Path(directory).glob(f".*{TMP_SUFFIX}"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


def write_blob(path: str | Path, obj: Any) -> None:
    """Atomically save ``obj`` (tensors, numbers, strings, lists, dicts) with a sha256 checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def read_blob(path: str | Path) -> Any:
    """Load a blob written by :func:`write_blob`; raise :class:`CorruptFileError` if damaged."""
    path = Path(path)
    raw = path.read_bytes()
    head = len(MAGIC) + 32
    if len(raw) < head or not raw.startswith(MAGIC):
        raise CorruptFileError(f"{path} is not a curvinf blob or is truncated ({len(raw)} bytes).")
    digest, payload = raw[len(MAGIC) : head], raw[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptFileError(f"{path} fails its sha256 checksum (truncated or altered).")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # pragma: no cover - checksum passed but torch cannot read it
        raise CorruptFileError(f"{path} passes its checksum but cannot be loaded: {err}") from err


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save large ``tensors`` atomically, streamed to disk (no in-memory copy, unlike
    :func:`write_blob`), with their :func:`tensor_digest` for :func:`read_tensors`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    record = {"tensors": cpu, "digest": tensor_digest(*cpu.values())}
    with open(tmp, "wb") as fh:
        torch.save(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_tensors(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load what :func:`write_tensors` saved (``mmap``: the tensors map the file instead of
    being read into memory); :class:`CorruptFileError` if the file is unreadable or its
    tensors fail their digest."""
    try:
        record = torch.load(path, weights_only=True, mmap=mmap)
        tensors, digest = record["tensors"], record["digest"]
    except Exception as err:
        raise CorruptFileError(f"{path} is not a readable tensor file: {err}") from err
    if tensor_digest(*tensors.values()) != digest:
        raise CorruptFileError(f"{path} fails its sha256 digest (truncated or altered).")
    return tensors


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def request_hash(obj: Any) -> str:
    """sha256 hex digest of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, human-readable JSON."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read JSON; raise :class:`CorruptFileError` naming the file if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}).") from err


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the dtypes, shapes and bytes of ``tensors`` (a data fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy(force=True))  # the buffer itself: no copy of a large tensor
    return h.hexdigest()


class StoreLock:
    """Exclusive, non-blocking lock on ``directory`` (file ``.lock``); a context manager.

    The holder writes its process id into the lock file, so a process that finds the
    lock taken can say who holds it (:attr:`StoreBusyError.pid`). ``purpose`` completes
    the busy message: "<directory> is being <purpose> by another process".
    """

    def __init__(self, directory: str | Path, purpose: str = "built") -> None:
        self.path = Path(directory) / ".lock"
        self.purpose = purpose
        self._fh: Any = None

    def __enter__(self) -> StoreLock:
        try:
            self._fh = open(self.path, "a+")
        except PermissionError as err:
            raise PermissionError(
                f"cannot take the lock {self.path}: {self.path.parent} is not writable; make it "
                "writable, or use another output directory."
            ) from err
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            pid = _lock_owner(self._fh)
            self._fh.close()
            raise StoreBusyError(
                f"{self.path.parent} is being {self.purpose} by another process "
                f"(pid {pid or 'unknown'}; it holds {self.path}); wait for it to finish or use "
                "another output directory.",
                pid=pid,
            ) from err
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()}\n")
        self._fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()


def lock_holder(directory: str | Path) -> int | None:
    """The process id holding ``directory``'s :class:`StoreLock` (0 if it wrote none), or
    None if nobody holds it. Takes nothing: the probe is released at once."""
    path = Path(directory) / ".lock"
    try:
        fh = open(path)
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_owner(fh) or 0
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None


def _lock_owner(fh: Any) -> int | None:
    """The process id a lock holder wrote into its lock file, or None if unreadable."""
    fh.seek(0)
    text = fh.read().strip()
    return int(text) if text.isdigit() else None


def check_directory(path: str | Path, *, name: str = "out", writable: bool = False) -> Path:
    """``path`` as a ``Path`` if it is a directory or can be created as one; else raise.

    Raises ``NotADirectoryError`` if ``path`` or one of its parents is a file, and (with
    ``writable``) ``PermissionError`` if the directory, or the existing parent it would be
    created in, cannot be written. Nothing is created.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise NotADirectoryError(f"{name} {path} {where}; pass a directory.")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == path else f"would be created in {existing}, which is"
        raise PermissionError(
            f"{name} {path} {where} not writable; choose a writable directory or change its "
            "permissions."
        )
    return path


__all__ = [
    "CorruptFileError",
    "StoreBusyError",
    "StoreLock",
    "atomic_write",
    "canonical_json",
    "check_directory",
    "read_blob",
    "read_json",
    "remove_temporaries",
    "request_hash",
    "tensor_digest",
    "write_blob",
    "write_json",
]


def _csv_cell(v: Any) -> str:
    """A CSV cell: ``repr`` for floats (exact round trip), empty for ``None`` and NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def write_table(
    rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...], out: str | Path, stem: str
) -> tuple[Path, Path]:
    """``out/<stem>.csv`` and ``out/<stem>.jsonl`` with ``columns`` of ``rows``, each written
    atomically; returns their paths. Missing keys become empty cells / ``null``."""
    import csv

    out = Path(out)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    csv_path, jsonl_path = out / f"{stem}.csv", out / f"{stem}.jsonl"
    atomic_write(csv_path, buf.getvalue().encode())
    lines = [json.dumps({c: row.get(c) for c in columns}) for row in rows]
    atomic_write(jsonl_path, ("\n".join(lines) + "\n").encode() if lines else b"")
    return csv_path, jsonl_path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (one object per non-empty line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
