"""A session's segments: what each recorded forward or history-rewriting operation was, and its JSON form.

:class:`~kvstream.streaming.session.Manifest` lists them in order; :mod:`kvstream.streaming.session`
re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import CorruptChunkError


@dataclass(frozen=True)
class Prefill:
    """A long forward streamed one chunk per layer: ``keys[l]`` holds ``[1, 2, batch, H, tokens, D]``."""

    start: int
    tokens: int
    batch: int
    keys: dict[int, str]
    kind: str = field(default="layers", init=False)


@dataclass(frozen=True)
class Step:
    """A short forward (a decode step) streamed as one chunk of every listed layer: ``[L, 2, batch, H, tokens, D]``."""

    start: int
    tokens: int
    batch: int
    key: str
    layers: tuple[int, ...]
    kind: str = field(default="all", init=False)


@dataclass(frozen=True)
class Rows:
    """Batch rows reordered (beam search, ``kind="reorder"``) or selected (``kind="select"``): row ``r`` of the
    cache after it is row ``index[r]`` before; ``key`` holds the int64 ``index`` of ``rows`` entries."""

    kind: str
    key: str
    rows: int


@dataclass(frozen=True)
class Repeat:
    """Every batch row repeated ``repeats`` times in place (``repeat_interleave`` on the batch axis)."""

    repeats: int
    kind: str = field(default="repeat", init=False)


@dataclass(frozen=True)
class Crop:
    """The newest tokens dropped: every layer's position length is ``length`` afterwards (``tokens``: the
    argument ``crop`` was called with, kept for the record)."""

    length: int
    tokens: int
    kind: str = field(default="crop", init=False)


@dataclass(frozen=True)
class Reset:
    """The cache was emptied."""

    kind: str = field(default="reset", init=False)


Segment = Union[Prefill, Step, Rows, Repeat, Crop, Reset]


def int_field(doc: dict, name: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    """``doc[name]`` checked to be an int (not a bool) in ``[lo, hi]`` (``hi=None``: no upper bound).

    Raises
    ------
    CorruptChunkError
        If the field is missing, not an int or out of range; the message starts with ``where``.
    """
    v = doc.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise CorruptChunkError(f"{where}: field {name!r} must be an int {bound}, got {v!r}")
    return v


def str_field(doc: dict, name: str, where: str) -> str:
    """``doc[name]`` checked to be a non-empty string.

    Raises
    ------
    CorruptChunkError
        If the field is missing, not a string or empty; the message starts with ``where``.
    """
    v = doc.get(name)
    if not isinstance(v, str) or not v:
        raise CorruptChunkError(f"{where}: field {name!r} must be a non-empty string, got {v!r}")
    return v


def segment_to_dict(seg: Segment) -> dict:
    """The JSON form of a segment (``kind`` plus its fields; layer ids of a Prefill as string keys)."""
    if isinstance(seg, Prefill):
        return {"kind": "layers", "start": seg.start, "tokens": seg.tokens, "batch": seg.batch,
                "keys": {str(l): k for l, k in seg.keys.items()}}
    if isinstance(seg, Step):
        return {"kind": "all", "start": seg.start, "tokens": seg.tokens, "batch": seg.batch, "key": seg.key,
                "layers": list(seg.layers)}
    if isinstance(seg, Rows):
        return {"kind": seg.kind, "key": seg.key, "rows": seg.rows}
    if isinstance(seg, Repeat):
        return {"kind": "repeat", "repeats": seg.repeats}
    if isinstance(seg, Crop):
        return {"kind": "crop", "length": seg.length, "tokens": seg.tokens}
    return {"kind": "reset"}


def segment_from_dict(doc: Any, where: str, num_layers: int) -> Segment:
    """Inverse of :func:`segment_to_dict`, checking every field. Raises :class:`CorruptChunkError`."""
    if not isinstance(doc, dict):
        raise CorruptChunkError(f"{where}: a segment must be a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind == "layers":
        keys = doc.get("keys")
        if not isinstance(keys, dict):
            raise CorruptChunkError(f"{where}: field 'keys' must be an object of layer -> key")
        parsed = {}
        for l, k in keys.items():
            if not (isinstance(l, str) and l.isdigit() and int(l) < num_layers) or not isinstance(k, str) or not k:
                raise CorruptChunkError(f"{where}: bad layer key entry {l!r}: {k!r}")
            parsed[int(l)] = k
        return Prefill(int_field(doc, "start", where), int_field(doc, "tokens", where, 1), int_field(doc, "batch", where, 1), parsed)
    if kind == "all":
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers) or not all(
                isinstance(l, int) and not isinstance(l, bool) and 0 <= l < num_layers for l in layers):
            raise CorruptChunkError(f"{where}: field 'layers' must list distinct layer ids in [0, {num_layers})")
        return Step(int_field(doc, "start", where), int_field(doc, "tokens", where, 1), int_field(doc, "batch", where, 1),
                    str_field(doc, "key", where), tuple(layers))
    if kind in ("reorder", "select"):
        return Rows(kind, str_field(doc, "key", where), int_field(doc, "rows", where))
    if kind == "repeat":
        return Repeat(int_field(doc, "repeats", where, 1))
    if kind == "crop":
        return Crop(int_field(doc, "length", where), int(doc.get("tokens", 0)) if isinstance(doc.get("tokens", 0), int)
                    else 0)
    if kind == "reset":
        return Reset()
    raise CorruptChunkError(f"{where}: unknown segment kind {kind!r}")


__all__ = ["Prefill", "Step", "Rows", "Repeat", "Crop", "Reset", "Segment", "int_field", "str_field",
           "segment_to_dict", "segment_from_dict"]
