"""Save a fitted curvature or its inverse once, load it later to score new queries.

:func:`save_curvature` writes a :class:`~curvinf.curvature.Curvature` from
:func:`curvinf.fit_curvature` (every rung of ``METHODS``) or an
:class:`~curvinf.curvature.InverseCurvature` from ``curv.inverse(reg)``;
:func:`load_curvature` gives back an object whose ``matvec``, ``eigenvalues``,
``inverse(reg).apply(V)`` and ``apply(V)`` equal the original's bit for bit.

The file is a plain ``torch.save`` archive that ``torch.load(path)`` reads with
its default ``weights_only=True``: a dict of tensors, numbers, strings, lists and
dicts, no pickled classes::

    {"format": "curvinf.curvature", "format_version": 1,
     "kind": "curvature" | "inverse", "method": "ggn", "num_params": D,
     "max_dense_bytes": float, "model_fingerprint": str | None,
     "blocks": [{"type": "dense", "index": (d,) int64, "U": (d, d), "evals": (d,)}
                | {"type": "kronecker" | "kronecker_gemm", "index": (d,) int64,
                   "U_out": (out, out), "U_in": (in', in'), "evals": (out, in'),
                   "has_bias": bool}
                | {"type": "diagonal", "index": (d,) int64, "evals": (d,)}, ...],
     "inverse": None | {"regularization": {"damping", "eps", "relative"},
                        "inv_evals": [tensor shaped like each block's evals, ...]},
     "checksum": sha256 hex of every tensor above, in order}

Only the eigendecomposition ``C = blockdiag(U Λ Uᵀ)`` is stored, never the dense
matrix as well: a dense rung takes ``8 (d² + 2d)`` bytes per block plus about
2 KB, e.g. 46.5 MB for the GGN of an MLP with D = 2,410 parameters (its matrix
and eigenvectors pickled together took 93 MB); K-FAC / EK-FAC take the two
Kronecker bases and ``out · in'`` eigenvalues per layer, a diagonal rung 16 D
bytes. Consequently a loaded dense rung's ``dense()`` is ``U diag(λ) Uᵀ``, equal
to the fitted matrix to rounding (~1e-16 relative), not bit for bit; every
product with it and with its inverses is bit for bit.

Files are written atomically (:func:`curvinf.storage.atomic_write`: temporary
file, ``fsync``, rename), so a reader sees the old file or the new one. A
truncated, altered or foreign file raises
:class:`~curvinf.storage.CorruptFileError` naming it; a file from a newer
format raises ``ValueError``.

The file records the fingerprint of the model the curvature was fitted on
(:func:`curvinf.params.model_fingerprint`); the loaded object carries it as
``model_fingerprint``, and ``load_curvature(path, model=model)`` refuses a model
whose fingerprint or parameter count differs.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvinf.curvature.dense import DenseCurvature, DiagonalCurvature
from curvinf.curvature.kronecker import (
    GemmKroneckerEigenBlock,
    KroneckerCurvature,
    KroneckerInverse,
)
from curvinf.curvature.operators import (
    DEFAULT_MAX_DENSE_BYTES,
    Curvature,
    DenseEigenBlock,
    DiagonalEigenBlock,
    EigenBlock,
    InverseCurvature,
    InverseOperator,
    KroneckerEigenBlock,
)
from curvinf.curvature.regularization import Regularization
from curvinf.devices import DeviceSpec, model_device, resolve_device
from curvinf.names import KRONECKER_RUNGS
from curvinf.params import check_fitted_on
from curvinf.storage import CorruptFileError, atomic_write, tensor_digest

FORMAT = "curvinf.curvature"
FORMAT_VERSION = 1

# block type in the file -> (class, tensor fields in order)
BLOCK_TYPES: dict[str, tuple[type[EigenBlock], tuple[str, ...]]] = {
    "dense": (DenseEigenBlock, ("index", "U", "evals")),
    "kronecker": (KroneckerEigenBlock, ("index", "U_out", "U_in", "evals")),
    "kronecker_gemm": (GemmKroneckerEigenBlock, ("index", "U_out", "U_in", "evals")),
    "diagonal": (DiagonalEigenBlock, ("index", "evals")),
}

SAVEABLE = (
    "a Curvature from curvinf.fit_curvature (any method in METHODS), its "
    "inverse(reg) (an InverseCurvature), or an object loaded by load_curvature"
)


class LoadedCurvature(Curvature):
    """A curvature read back by :func:`load_curvature`: the saved eigen blocks.

    Behaves like the rung it was saved from (``method``, ``num_params``,
    ``matvec``, ``dense``, ``eigenvalues``, ``inverse``) and carries the
    ``model_fingerprint`` of the model it was fitted on.
    """

    def __init__(
        self,
        method: str,
        num_params: int,
        blocks: list[EigenBlock],
        max_dense_bytes: float = DEFAULT_MAX_DENSE_BYTES,
        model_fingerprint: str | None = None,
    ) -> None:
        super().__init__(method, num_params, max_dense_bytes)
        self._blocks = blocks
        self.model_fingerprint = model_fingerprint

    def _eigen(self) -> list[EigenBlock]:
        return self._blocks

    def eigen_inverse(
        self, blocks: list[EigenBlock], inv_evals: list[torch.Tensor], reg: Regularization
    ) -> InverseCurvature:
        """A loaded K-FAC / EK-FAC keeps its Kronecker scoring route."""
        if self.method in KRONECKER_RUNGS:
            return KroneckerInverse(self, blocks, inv_evals, reg)
        return InverseCurvature(self, blocks, inv_evals, reg)

    def __repr__(self) -> str:
        return (
            f"LoadedCurvature(method={self.method!r}, num_params={self.num_params}, "
            f"model_fingerprint={self.model_fingerprint!r})"
        )


# ---------------------------------------------------------------------------------- saving


def _unsaveable_error(obj: object) -> TypeError:
    """The ``TypeError`` for an object :func:`save_curvature` cannot store, saying what to do."""
    name = type(obj).__name__
    if isinstance(obj, Curvature):
        why = (
            f"a {name} ({obj.method!r}) holds no fitted matrix, only products over the "
            "training data (matrix_free), so there is nothing to store"
        )
        todo = (
            f"fit it with fit_curvature({obj.method!r}, ...) and save that, save its "
            "inverse(reg) without a solver (eigendecomposed), or recompute it after loading "
            "the model"
        )
    elif isinstance(obj, InverseOperator):
        why = (
            f"a {name} (an iterative solver's or the Gram route's inverse) is computed from "
            "the model and the training data on demand; it holds no fitted curvature"
        )
        todo = (
            "save the fitted curvature from fit_curvature(...) (or its inverse(reg)), or "
            "recompute this inverse after loading the model"
        )
    else:
        why = f"got a {name}"
        todo = "pass the object fit_curvature(...) returned, or its inverse(reg)"
    return TypeError(f"save_curvature cannot save this object: {why}. It saves {SAVEABLE}; {todo}.")


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached on the CPU, owning exactly its own storage (a view would save its base);
    strides are kept, so products after loading run the same kernels."""
    return t.detach().cpu().clone()


def _block_record(block: EigenBlock) -> dict[str, Any]:
    """One eigen block as a dict of its type name and tensors (plus ``has_bias``)."""
    for type_name, (cls, fields) in BLOCK_TYPES.items():
        if type(block) is cls:
            record: dict[str, Any] = {"type": type_name}
            record.update({f: _compact(getattr(block, f)) for f in fields})
            if isinstance(block, KroneckerEigenBlock):
                record["has_bias"] = bool(block.has_bias)
            return record
    raise TypeError(
        f"save_curvature cannot save an eigen block of type {type(block).__name__}; it saves "
        f"{SAVEABLE}."
    )


def _record_tensors(record: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of a payload, in a fixed order: the blocks', then the inverse eigenvalues."""
    out = [blk[f] for blk in record["blocks"] for f in BLOCK_TYPES[blk["type"]][1]]
    if record["inverse"] is not None:
        out.extend(record["inverse"]["inv_evals"])
    return out


def _fingerprint_of(obj: Curvature | InverseCurvature) -> str | None:
    """The fitted model's fingerprint the object carries (an inverse: or its curvature's)."""
    fp = getattr(obj, "model_fingerprint", None)
    if fp is None and isinstance(obj, InverseCurvature):
        fp = getattr(obj.curvature, "model_fingerprint", None)
    return fp


def curvature_record(obj: Curvature | InverseCurvature) -> dict[str, Any]:
    """The payload :func:`save_curvature` writes for ``obj`` (format in the module doc)."""
    if isinstance(obj, InverseCurvature):
        curv, blocks = obj.curvature, obj.blocks
        inverse = {
            "regularization": dataclasses.asdict(obj.reg),
            "inv_evals": [_compact(s) for s in obj.inv_evals],
        }
    elif isinstance(obj, (DenseCurvature, DiagonalCurvature, KroneckerCurvature, LoadedCurvature)):
        curv, blocks, inverse = obj, obj.eigen(), None
    else:
        raise _unsaveable_error(obj)
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "inverse" if inverse is not None else "curvature",
        "method": str(curv.method),
        "num_params": int(curv.num_params),
        "max_dense_bytes": float(curv.max_dense_bytes),
        "model_fingerprint": _fingerprint_of(obj),
        "blocks": [_block_record(b) for b in blocks],
        "inverse": inverse,
    }
    record["checksum"] = tensor_digest(*_record_tensors(record))
    return record


def save_curvature(obj: Curvature | InverseCurvature, path: str | Path) -> Path:
    """Write a fitted curvature or its inverse to ``path`` atomically; return the path.

    ``obj``: the :class:`~curvinf.curvature.Curvature` that
    :func:`curvinf.fit_curvature` returned (any method), its
    ``inverse(reg)``, or an object :func:`load_curvature` returned. Matrix-free
    curvatures and solver or Gram inverses hold nothing fitted and raise
    ``TypeError``. The file stores the eigendecomposition only (size and format:
    module doc) and the fitted model's fingerprint ``obj.model_fingerprint``; it
    loads with ``torch.load(path)`` (``weights_only=True``) or :func:`load_curvature`.
    """
    record = curvature_record(obj)
    buf = io.BytesIO()
    torch.save(record, buf)
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------- loading


def _read_record(path: Path) -> dict[str, Any]:
    """The payload of ``path``, checked for format, version and checksum."""
    raw = path.read_bytes()
    try:
        record = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptFileError(
            f"{path} is not a curvinf curvature file, or it is truncated or damaged "
            f"({len(raw)} bytes; torch.load: {reason})."
        ) from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFileError(
            f"{path} is a torch file but not a curvinf curvature file (no "
            f"'format': {FORMAT!r}); write one with curvinf.save_curvature."
        )
    version = record.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CorruptFileError(f"{path} has an invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in curvature file format version {version} by a newer "
            f"curvinf; this curvinf reads versions up to {FORMAT_VERSION}. Upgrade curvinf, "
            "or refit and save the curvature with this version."
        )
    try:
        digest = tensor_digest(*_record_tensors(record))
    except (KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{path} lacks a field of the curvature format ({err!r}).") from err
    if digest != record.get("checksum"):
        raise CorruptFileError(f"{path} fails its checksum (its tensors were altered).")
    return record


def _block_from_record(record: dict[str, Any], device: torch.device) -> EigenBlock:
    """An eigen block from its dict, its tensors on ``device`` (``KeyError`` or
    ``TypeError`` on a malformed one)."""
    cls, fields = BLOCK_TYPES[record["type"]]
    kwargs = {f: record[f].to(device) for f in fields}
    if issubclass(cls, KroneckerEigenBlock):
        kwargs["has_bias"] = bool(record["has_bias"])
    return cls(**kwargs)


def _check_blocks(blocks: list[EigenBlock], num_params: int) -> None:
    """``ValueError`` unless the blocks' positions cover ``0..num_params-1`` once each."""
    if not blocks:
        raise ValueError("the file holds no blocks")
    positions = torch.cat([b.index.reshape(-1) for b in blocks])
    if positions.dtype != torch.int64 or not torch.equal(
        positions.sort().values, torch.arange(num_params, device=positions.device)
    ):
        raise ValueError(f"the blocks' positions do not cover the {num_params} parameters once")
    for b in blocks:
        if not (torch.is_tensor(b.eigenvalues) and b.eigenvalues.dtype == torch.float64):
            raise ValueError("eigenvalues are not float64 tensors")


def _curvature_from_record(record: dict[str, Any], device: torch.device) -> LoadedCurvature:
    blocks = [_block_from_record(b, device) for b in record["blocks"]]
    num_params = int(record["num_params"])
    _check_blocks(blocks, num_params)
    return LoadedCurvature(
        str(record["method"]),
        num_params,
        blocks,
        float(record["max_dense_bytes"]),
        record["model_fingerprint"],
    )


def _inverse_from_record(curv: LoadedCurvature, record: dict[str, Any]) -> InverseCurvature:
    inv_evals = [t.to(curv.device) for t in record["inv_evals"]]
    blocks = curv.eigen()
    if len(inv_evals) != len(blocks) or any(
        s.shape != b.eigenvalues.shape for s, b in zip(inv_evals, blocks, strict=False)
    ):
        raise ValueError("the inverse eigenvalues do not match the blocks")
    inv = curv.eigen_inverse(blocks, inv_evals, Regularization(**record["regularization"]))
    try:  # the fingerprint may be a read-only property reading the curvature's
        inv.model_fingerprint = curv.model_fingerprint  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return inv


def load_curvature(
    path: str | Path, model: nn.Module | None = None, *, device: DeviceSpec | None = None
) -> LoadedCurvature | InverseCurvature:
    """Read a file written by :func:`save_curvature`.

    Returns a :class:`LoadedCurvature` (a :class:`~curvinf.curvature.Curvature`:
    ``inverse(reg)``, ``matvec``, ``dense``, ``eigenvalues``) or, for a saved
    inverse, an :class:`~curvinf.curvature.InverseCurvature` (``apply``, ``dense``,
    ``reg``, ``rank``), both carrying ``model_fingerprint`` of the fitted model.
    With ``model``, raise ``ValueError`` unless it is that model (same parameter
    count and fingerprint). A truncated, altered or foreign file raises
    :class:`~curvinf.storage.CorruptFileError`; a newer format ``ValueError``.

    Files hold CPU tensors; the loaded object's go to ``device``
    (:func:`curvinf.devices.resolve_device`), by default the ``model``'s device, or the
    CPU without a model, so it scores where the model lives.
    """
    path = Path(path)
    if device is not None:
        target = resolve_device(device)
    else:
        target = (model_device(model) if model is not None else None) or torch.device("cpu")
    record = _read_record(path)
    try:
        curv = _curvature_from_record(record, target)
        obj: LoadedCurvature | InverseCurvature = curv
        if record["kind"] == "inverse":
            obj = _inverse_from_record(curv, record["inverse"])
        elif record["kind"] != "curvature":
            raise ValueError(f"unknown kind {record['kind']!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{path} is not a valid curvature file: {err}.") from err
    if model is not None:
        check_fitted_on(obj, model, source=str(path), required=True)
    return obj


__all__ = [
    "FORMAT_VERSION",
    "LoadedCurvature",
    "curvature_record",
    "load_curvature",
    "save_curvature",
]
