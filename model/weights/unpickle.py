"""Reading torch pickles without running pickled code: torch's weights-only unpickler, plus the few numpy
globals the authors' checkpoints hold (arrays and scalars of plain numeric dtypes), and nothing else."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import CheckpointError
from model.weights.formats import EXPECTED
from model.weights.project_format import short_error

NUMERIC_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex


def _numeric_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype` as the unpickler may call it: a plain numeric dtype only. Structured, object, void
    and string dtypes are refused: with forged flags they read raw pickle bytes as object pointers."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a plain numeric dtype")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a dtype") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(
            f"numpy.dtype({spec!r}) (kind {dtype.kind!r}) is not a plain numeric dtype; "
            "structured, object, void and string dtypes are refused"
        )
    return dtype


def _numeric_dtype_classes() -> list[type]:
    """numpy.dtypes.Float32DType and the like: the types the unpickler may BUILD (set the state of)."""
    classes = []
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        scalar = getattr(cls, "type", None)
        is_scalar_type = isinstance(scalar, type) and issubclass(scalar, np.generic)
        if name.endswith("DType") and is_scalar_type and np.dtype(scalar).kind in NUMERIC_KINDS:
            classes.append(cls)
    return classes


def _numpy_allow_list() -> list[Any]:
    """The numpy globals the authors' checkpoints pickle (a `recalls` array, numpy scalars), under the
    module names of numpy 1.x (`numpy.core`) and 2.x (`numpy._core`). Nothing else may be unpickled;
    dtypes only numeric ones (`_numeric_dtype`, and `_check_numeric` on the result)."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [np.ndarray, (_numeric_dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core._reconstruct, f"{module}._reconstruct"), (core.scalar, f"{module}.scalar")]
    return allowed + _numeric_dtype_classes()


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """What the unpickler refused, without torch's advice around it (to re-run without weights_only)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _check_numeric(value: Any, where: str = "checkpoint") -> None:
    """Every numpy array or scalar in what was loaded has a plain numeric dtype (a second line behind
    `_numeric_dtype`: a dtype's state could still be forged after it was made)."""
    if isinstance(value, np.ndarray | np.generic):
        dtype = value.dtype
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: a numpy value of dtype {dtype!r} is not plain numeric")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_numeric(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_numeric(item, f"{where}[{i}]")


def _allowed_names(allowed: list[Any]) -> set[str]:
    return {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in allowed}


def safe_torch_load(path: Path) -> Any:
    """torch.load without executing arbitrary pickled code: weights-only, plus the numpy allow-list."""
    allowed = _numpy_allow_list()
    with open(path, "rb") as f:
        magic = f.read(2)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and magic == b"PK":
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (incomplete zip archive); {EXPECTED}")
    if not is_zip and not magic.startswith(b"\x80"):  # pickles start with the PROTO opcode
        raise CheckpointError(
            f"{path}: not a checkpoint (neither a torch zip archive nor a pickle); {EXPECTED}"
        )
    if is_zip:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint archive ({exc}); {EXPECTED}") from None
        refused = sorted(set(wanted) - _allowed_names(allowed))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the pickle references {', '.join(refused)}, which could run "
                "arbitrary code; only tensors, containers and numpy arrays/scalars are allowed"
            )
    try:
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        _check_numeric(loaded)
        return loaded
    except pickle.UnpicklingError as exc:
        first = _unpickler_reason(exc)
        raise CheckpointError(
            f"{path}: refused to load: not a weights-only pickle ({first}); only tensors, containers "
            "and numpy arrays/scalars are allowed"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({short_error(exc)}); {EXPECTED}"
        ) from None
