"""The ground-truth store on disk: one directory per request, its manifest and chunk files.

:mod:`curvinf.groundtruth` decides what is trained and measured, and names the request;
this module lays the store out, reads and verifies its files, and keeps its manifest.
The generic crash-safe files underneath (atomic writes, checksummed blobs, the lock) are
:mod:`curvinf.storage`. Layout::

    <out>/<name>-<hash>/
        manifest.json      human-readable request, layout, progress, cost, summary
        base.pt            the base model's weights and metrics
        chunk-00000.pt ... one per chunk of models, checksummed, written atomically
        .lock              held while a process builds the store (its pid inside)

Every file holds the store's ``key`` (the hash of its request) and every chunk its
model range ``start..stop``, so a file of another store or in the wrong place fails to
verify, and a lost manifest is rebuilt with the layout of the chunk files on disk
(:func:`open_manifest`). A finished store is read without its lock and without writing
(:func:`read_finished`), so a read-only directory will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from curvinf.storage import (
    CorruptFileError,
    StoreLock,
    read_blob,
    read_json,
    remove_temporaries,
    write_json,
)

FORMAT = 1
MANIFEST = "manifest.json"
BASE = "base.pt"


def utc_now() -> str:
    """The current UTC time in ISO 8601 to the second (the manifest's timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_path(store_dir: Path, name: str) -> Path:
    """The store directory: ``store_dir`` itself if it is a store (it has a manifest, or it
    is named like this request's store), else ``store_dir/name``."""
    if (store_dir / MANIFEST).exists() or store_dir.name == name:
        return store_dir
    return store_dir / name


@contextmanager
def locked_store(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Create the store directory, hold its lock inside the block, and first remove the
    partial files an interrupted run left (``StoreBusyError`` if another process builds it)."""
    _make_store_dir(path)
    with StoreLock(path):
        for leftover in remove_temporaries(path):
            say(f"removed {leftover.name}, a partial file left by an interrupted run")
        yield


def _make_store_dir(path: Path) -> None:
    """Create the store directory, or raise a ``PermissionError`` that says what to do."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise PermissionError(
            f"cannot create the ground-truth store {path} (permission denied); choose a "
            "writable store directory (CLI --out) or change its permissions."
        ) from err


def stored_manifest(path: Path) -> dict[str, Any] | None:
    """The store's manifest if it exists and is well formed, else None (read only)."""
    try:
        manifest = read_json(path / MANIFEST)
    except (CorruptFileError, OSError):
        return None
    ok = isinstance(manifest, dict) and "request" in manifest and "layout" in manifest
    return manifest if ok else None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the store's manifest atomically."""
    write_json(path / MANIFEST, manifest)


def check_request(manifest: dict[str, Any], request: dict[str, Any], key: str, path: Path) -> None:
    """Raise ``ValueError`` listing the differences if the store was built for another request."""
    if manifest["request"] != request or manifest.get("key") != key:
        diffs = _differences(manifest["request"], request)
        raise ValueError(
            f"the store at {path} was built for a different request; differences "
            f"(stored vs requested): {'; '.join(diffs) or 'key only'}. Use another output "
            "directory, or delete this store to rebuild it."
        )


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(stored) | set(wanted)):
            out += _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")
        return out
    return [] if stored == wanted else [f"{prefix.rstrip('.')}: {stored!r} vs {wanted!r}"]


def chunk_path(path: Path, index: int) -> Path:
    """The file of chunk ``index`` in the store ``path``."""
    return path / f"chunk-{index:05d}.pt"


def chunk_range(manifest: dict[str, Any], index: int) -> tuple[int, int]:
    """Models ``start, stop`` (``stop`` excluded) of chunk ``index`` under the manifest's layout."""
    size, total = manifest["layout"]["models_per_chunk"], manifest["layout"]["num_models"]
    return index * size, min(total, (index + 1) * size)


def models_in(manifest: dict[str, Any], indices: Iterable[int]) -> int:
    """How many models the chunks ``indices`` hold."""
    return sum(b - a for a, b in (chunk_range(manifest, c) for c in indices))


def _checked_blob(file: Path, key: str, expect: dict[str, Any]) -> dict:
    """The blob in ``file`` if it verifies, belongs to store ``key`` and holds ``expect``;
    else ``CorruptFileError``."""
    blob = read_blob(file)
    if not isinstance(blob, dict) or blob.get("key") != key:
        raise CorruptFileError(f"{file} belongs to another store (key mismatch).")
    for k, v in expect.items():
        if blob.get(k) != v:
            raise CorruptFileError(f"{file} holds {k}={blob.get(k)!r}, expected {v!r}.")
    return blob


def _verified(file: Path, key: str, expect: dict[str, Any]) -> dict | None:
    """:func:`_checked_blob`, or None if the file is missing, unreadable or fails the checks."""
    try:
        return _checked_blob(file, key, expect)
    except (CorruptFileError, OSError):
        return None


def _read_checked(
    file: Path, key: str, expect: dict[str, Any], repair: bool, say: Callable[[str], None]
) -> dict | None:
    """A verified blob, or None (after a message, the file removed) if damaged and ``repair``;
    ``CorruptFileError`` if damaged and not ``repair``."""
    try:
        return _checked_blob(file, key, expect)
    except CorruptFileError as err:
        if not repair:
            raise CorruptFileError(
                f"{err} Pass repair=True (CLI --repair) to recompute it, or delete the file."
            ) from err
        say(f"{err} Recomputing it.")
        file.unlink(missing_ok=True)
        return None


def read_base(path: Path, key: str, repair: bool, say: Callable[[str], None]) -> dict | None:
    """The verified ``base.pt`` blob, or None if it is to be (re)computed: missing, damaged
    under ``repair`` (``CorruptFileError`` without), or written before base weights were
    stored (then retrained; that is deterministic)."""
    file = path / BASE
    base = _read_checked(file, key, {}, repair, say) if file.exists() else None
    return base if base is not None and "params" in base else None


def read_chunks(
    path: Path, manifest: dict[str, Any], repair: bool, say: Callable[[str], None]
) -> dict[int, dict]:
    """The chunk blobs on disk that verify, by index; a damaged one is removed under
    ``repair`` and otherwise raises ``CorruptFileError``, as does a chunk the manifest
    lists as finished whose file is missing."""
    key = manifest["key"]
    chunks: dict[int, dict] = {}
    listed = set(manifest["progress"]["chunks_done"])
    for c in range(manifest["layout"]["num_chunks"]):
        file = chunk_path(path, c)
        a, b = chunk_range(manifest, c)
        if file.exists():
            blob = _read_checked(file, key, {"start": a, "stop": b}, repair, say)
            if blob is not None:
                chunks[c] = blob
        elif c in listed:
            msg = f"{file} is listed as finished in the manifest but is missing"
            if not repair:
                raise CorruptFileError(f"{msg}; pass repair=True (CLI --repair) to recompute it.")
            say(f"{msg}; recomputing it.")
    return chunks


def read_finished(path: Path, manifest: dict[str, Any]) -> tuple[dict, dict[int, dict]] | None:
    """The base blob and every chunk blob of a finished store, read without its lock and
    without writing; None if the manifest does not say it is complete or any file fails to
    verify (the locked path then decides)."""
    if not manifest.get("progress", {}).get("complete"):
        return None
    key = manifest["key"]
    base = _verified(path / BASE, key, {})
    if base is None or "params" not in base:
        return None
    chunks = {}
    for c in range(manifest["layout"]["num_chunks"]):
        a, b = chunk_range(manifest, c)
        chunks[c] = _verified(chunk_path(path, c), key, {"start": a, "stop": b})
        if chunks[c] is None:
            return None
    return base, chunks


def _chunk_size_on_disk(path: Path, key: str) -> int | None:
    """Models per chunk of the store's chunk files, from the first one that verifies (each
    records its model range ``start..stop``), or None if there is none."""
    for file in sorted(path.glob("chunk-*.pt")):
        index = file.stem.removeprefix("chunk-")
        blob = _verified(file, key, {}) if index.isdigit() else None
        if blob is None or not isinstance(blob.get("start"), int):
            continue
        index, start, stop = int(index), blob["start"], blob["stop"]
        size = stop - start if index == 0 else start // index
        if size >= 1 and start == index * size:
            return size
    return None


def open_manifest(
    path: Path,
    request: dict[str, Any],
    key: str,
    num_models: int,
    models_per_chunk: int | None,
    default_chunk: Callable[[], int],
    repair: bool,
    say: Callable[[str], None],
    device: str = "cpu",
) -> dict[str, Any]:
    """The store's manifest: the existing one (``ValueError`` if it is another request's,
    or was started on another device type than ``device``, :func:`check_device_type`),
    or a new one, written, whose layout is that of the chunk files already on disk (a lost
    manifest), else ``models_per_chunk``, else ``default_chunk()``, recording ``device``
    (the device type that trains it: ``"cpu"`` or ``"cuda"``). A damaged manifest raises
    ``CorruptFileError`` unless ``repair``, which rebuilds it."""
    file = path / MANIFEST
    if file.exists():
        try:
            manifest = read_json(file)
            if (
                not isinstance(manifest, dict)
                or "request" not in manifest
                or "layout" not in manifest
            ):
                raise CorruptFileError(f"{file} lacks 'request' or 'layout'.")
        except CorruptFileError as err:
            if not repair:
                raise CorruptFileError(
                    f"{err} The store's manifest is damaged; pass repair=True (CLI --repair) to "
                    "rebuild it (finished chunks that verify are kept), or delete the directory."
                ) from err
            say(f"{err} Rebuilding the manifest; chunks that verify are kept, the rest recomputed.")
        else:
            check_request(manifest, request, key, path)
            check_device_type(manifest, device, path)
            if (
                models_per_chunk is not None
                and models_per_chunk != manifest["layout"]["models_per_chunk"]
            ):
                say(
                    f"the store was created with {manifest['layout']['models_per_chunk']} models "
                    f"per chunk; keeping that (requested {models_per_chunk})"
                )
            return manifest
    on_disk = _chunk_size_on_disk(path, key)
    if on_disk is not None:
        asked = f", not the requested {models_per_chunk}" if models_per_chunk != on_disk else ""
        say(
            f"rebuilding the manifest of {path.name} from its chunk files: {on_disk} models per "
            f"chunk{asked if models_per_chunk else ''}; finished chunks are kept"
        )
        models_per_chunk = on_disk
    elif models_per_chunk is None:
        models_per_chunk = default_chunk()
    manifest = _new_manifest(request, key, num_models, models_per_chunk, device)
    write_manifest(path, manifest)
    return manifest


def check_device_type(manifest: dict[str, Any], device: str, path: Path) -> None:
    """``ValueError`` unless the store was started on the device type ``device`` (a manifest
    without the field was written before devices existed: ``"cpu"``). Its models then all
    train on one device type: CPU and CUDA kernels round differently, so a store mixing
    them would not be reproducible on either."""
    started = manifest.get("device", "cpu")
    if started != device:
        done = manifest.get("progress", {}).get("models_done", 0)
        total = manifest.get("layout", {}).get("num_models", "?")
        raise ValueError(
            f"the store at {path} was started on {started} ({done} of {total} models trained "
            f"there) and cannot be resumed on {device}: CPU and CUDA round differently, so one "
            f"store keeps one device type. Resume it with --device {started} "
            f"(device='{started}'), or build it afresh on {device} in another directory "
            "(or delete this one)."
        )


def _new_manifest(
    request: dict[str, Any],
    key: str,
    num_models: int,
    models_per_chunk: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """The manifest of a store with nothing trained yet, to be trained on ``device``
    (a device type, ``"cpu"`` or ``"cuda"``)."""
    return {
        "format": FORMAT,
        "key": key,
        "created": utc_now(),
        "device": device,
        "request": request,
        "layout": {
            "num_models": num_models,
            "models_per_chunk": models_per_chunk,
            "num_chunks": math.ceil(num_models / models_per_chunk),
            "model_order": "model i is subset i // num_seeds, seed i % num_seeds",
            "chunk_file": "chunk-{index:05d}.pt",
        },
        "progress": {"chunks_done": [], "models_done": 0, "complete": False},
        "cost": {
            "models_trained_total": 0,
            "wall_s_total": 0.0,
            "base_wall_s": None,
            "retrain_wall_s": 0.0,
            "retrain_cpu_s": 0.0,
        },
        "runs": [],
        "summary": None,
    }


__all__ = [
    "BASE",
    "FORMAT",
    "MANIFEST",
    "check_device_type",
    "check_request",
    "chunk_path",
    "chunk_range",
    "locked_store",
    "models_in",
    "open_manifest",
    "read_base",
    "read_chunks",
    "read_finished",
    "store_path",
    "stored_manifest",
    "utc_now",
    "write_manifest",
]
