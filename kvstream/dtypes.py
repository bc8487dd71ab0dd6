"""The element types a KV chunk may have, by the names its header records, and the dtype a model config declares.

The ground floor of the layout (:mod:`kvstream.layout` re-exports every name here).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import LayoutError

#: dtypes a KV chunk may have, by the name written into headers.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Name of ``dtype`` as written into chunk headers (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises
    ------
    LayoutError
        If kvstream does not ship chunks of this dtype.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise LayoutError(f"Unsupported KV dtype {dtype}; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`. Raises :class:`LayoutError` for an unknown name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise LayoutError(f"Unknown KV dtype name {name!r}; known: {sorted(DTYPES)}") from None


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a transformers config declares (``config.dtype``, or ``torch_dtype`` of older versions), if any.

    A config built in code often declares none (``None``), and ``model.to(dtype)`` does not update it.
    """
    declared = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.replace("torch.", ""))
    return declared if isinstance(declared, torch.dtype) else None


__all__ = ["DTYPES", "dtype_name", "dtype_from_name", "config_dtype"]
