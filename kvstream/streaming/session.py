"""A session: the ordered record of what one request's cache streamed, and its replay into per-layer tensors.

A streaming cache sends each forward's new KV as chunks and records, in order, what each chunk holds
and which operations rewrote the cache's history (beam reorders, row selection, repeats, crops, resets).
The record is the session's :class:`Manifest`, built by a :class:`SessionRecorder`;
:func:`kvstream.streaming.replay.replay` turns the manifest and the chunks back into the cache the
producer ended with.

Keys on the transport for session ``S`` (:class:`SessionKeys`)::

    S/manifest                  uint8 JSON: layout, batch, ordered segments (written last)
    S/seg{n:06d}/layer{l:04d}   a long forward, one chunk per layer: [1, 2, B, H, T, D]   (Prefill)
    S/seg{n:06d}/all            a short forward, every KV layer:     [L, 2, B, H, T, D]   (Step)
    S/seg{n:06d}/index          int64 row indices of a reorder/select                    (Rows)

Positions: segments address tokens in *position space*, ``[start, start + tokens)`` of every layer's
full history (a sliding-window layer keeps only its window of it; the replay rebuilds the whole history
and the layer trims itself). A crop records the position length it left, so replay follows whatever
convention the installed transformers used for ``crop``'s argument.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from ..errors import CorruptChunkError, LayoutError
from ..layout import dtype_from_name

#: Version of the manifest document.
MANIFEST_FORMAT = 1
#: Most segments a manifest may list (a decode step is one; a million steps is far past any session).
MAX_SEGMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------------

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


def _int(doc: dict, name: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    v = doc.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise CorruptChunkError(f"{where}: field {name!r} must be an int {bound}, got {v!r}")
    return v


def _str(doc: dict, name: str, where: str) -> str:
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
        return Prefill(_int(doc, "start", where), _int(doc, "tokens", where, 1), _int(doc, "batch", where, 1), parsed)
    if kind == "all":
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers) or not all(
                isinstance(l, int) and not isinstance(l, bool) and 0 <= l < num_layers for l in layers):
            raise CorruptChunkError(f"{where}: field 'layers' must list distinct layer ids in [0, {num_layers})")
        return Step(_int(doc, "start", where), _int(doc, "tokens", where, 1), _int(doc, "batch", where, 1),
                    _str(doc, "key", where), tuple(layers))
    if kind in ("reorder", "select"):
        return Rows(kind, _str(doc, "key", where), _int(doc, "rows", where))
    if kind == "repeat":
        return Repeat(_int(doc, "repeats", where, 1))
    if kind == "crop":
        return Crop(_int(doc, "length", where), int(doc.get("tokens", 0)) if isinstance(doc.get("tokens", 0), int)
                    else 0)
    if kind == "reset":
        return Reset()
    raise CorruptChunkError(f"{where}: unknown segment kind {kind!r}")


# ----------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------

@dataclass
class Manifest:
    """What a session holds: the KV geometry, the batch, and the ordered segments.

    Attributes
    ----------
    session : str
        The session name (key prefix).
    num_layers : int
        Layers of the producing cache (KV or not).
    kv_layers : list of int
        Layers that hold KV, ascending.
    kv_heads, head_dim : int or None
        Geometry of every KV layer (``None`` while nothing was streamed).
    dtype : torch.dtype or None
        Element type of the KV.
    batch : int or None
        Batch rows when the first chunk was streamed.
    seq_length : int
        Position length of the cache when the manifest was written.
    segments : list of Segment
        In the order they happened.
    """

    session: str
    num_layers: int
    kv_layers: list[int]
    kv_heads: int | None = None
    head_dim: int | None = None
    dtype: torch.dtype | None = None
    batch: int | None = None
    seq_length: int = 0
    segments: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON document (what :meth:`to_bytes` encodes)."""
        from ..layout import dtype_name

        return {"format": MANIFEST_FORMAT, "session": self.session, "num_layers": self.num_layers,
                "kv_layers": list(self.kv_layers), "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "dtype": dtype_name(self.dtype) if self.dtype is not None else None, "batch": self.batch,
                "seq_length": self.seq_length, "segments": [segment_to_dict(s) for s in self.segments]}

    def to_bytes(self) -> torch.Tensor:
        """The manifest as a uint8 CPU tensor of compact JSON (what the transport stores)."""
        doc = json.dumps(self.to_dict(), separators=(",", ":")).encode()
        return torch.frombuffer(bytearray(doc), dtype=torch.uint8)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "manifest") -> "Manifest":
        """Parse and check a manifest document.

        Raises
        ------
        CorruptChunkError
            On any missing, mistyped or out-of-range field, an unknown format or segment kind.
        """
        if not isinstance(doc, dict):
            raise CorruptChunkError(f"{source}: a manifest must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != MANIFEST_FORMAT:
            raise CorruptChunkError(f"{source}: unknown manifest format {doc.get('format')!r} "
                                    f"(this kvstream reads {MANIFEST_FORMAT})")
        num_layers = _int(doc, "num_layers", source, 1, 1 << 16)
        kv = doc.get("kv_layers")
        if not isinstance(kv, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in kv) \
                or kv != sorted(set(kv)) or (kv and not 0 <= kv[0] <= kv[-1] < num_layers):
            raise CorruptChunkError(f"{source}: field 'kv_layers' must list ascending layer ids in [0, {num_layers})")
        segs = doc.get("segments")
        if not isinstance(segs, list) or len(segs) > MAX_SEGMENTS:
            raise CorruptChunkError(f"{source}: field 'segments' must be a list of at most {MAX_SEGMENTS} segments")
        m = cls(session=_str(doc, "session", source), num_layers=num_layers, kv_layers=list(kv),
                seq_length=_int(doc, "seq_length", source))
        if doc.get("kv_heads") is not None or segs:
            m.kv_heads = _int(doc, "kv_heads", source, 1)
            m.head_dim = _int(doc, "head_dim", source, 1)
            try:
                m.dtype = dtype_from_name(doc.get("dtype"))
            except LayoutError as e:
                raise CorruptChunkError(f"{source}: {e}") from None
            m.batch = _int(doc, "batch", source, 1)
        m.segments = [segment_from_dict(s, f"{source} segment {i}", num_layers) for i, s in enumerate(segs)]
        return m

    @classmethod
    def from_bytes(cls, raw: torch.Tensor, source: str = "manifest") -> "Manifest":
        """Inverse of :meth:`to_bytes`. Raises :class:`CorruptChunkError` on bad JSON or a bad document."""
        try:
            doc = json.loads(bytes(raw.numpy()))
        except (ValueError, RecursionError) as e:
            raise CorruptChunkError(f"{source} is not valid JSON: {e}") from None
        return cls.from_dict(doc, source)


class SessionKeys:
    """The transport keys of one session (see the module docstring)."""

    __slots__ = ("session",)

    def __init__(self, session: str):
        self.session = session

    @property
    def manifest(self) -> str:
        """``S/manifest``."""
        return f"{self.session}/manifest"

    def layer(self, seg: int, layer: int) -> str:
        """``S/seg{n:06d}/layer{l:04d}``: one layer's chunk of a long forward."""
        return f"{self.session}/seg{seg:06d}/layer{layer:04d}"

    def step(self, seg: int) -> str:
        """``S/seg{n:06d}/all``: a short forward's chunk of every KV layer."""
        return f"{self.session}/seg{seg:06d}/all"

    def index(self, seg: int) -> str:
        """``S/seg{n:06d}/index``: the row indices of a reorder or select."""
        return f"{self.session}/seg{seg:06d}/index"


class SessionRecorder:
    """Builds a session's segment list as a cache streams: reserves keys, records operations in order.

    Parameters
    ----------
    session : str
        The key prefix.

    Notes
    -----
    Cheap on the hot path: a decode step costs one :meth:`begin` and one :meth:`end_step` (a few
    microseconds of Python).
    """

    def __init__(self, session: str, segments: Sequence[Segment] = ()):
        self.keys = SessionKeys(session)
        self.segments: list[Segment] = list(segments)
        self._next = len(self.segments)  # segment number of the next key
        self._open: tuple[str, int, int, int, int] | None = None  # kind, seg, start, tokens, batch

    def begin(self, kind: str, start: int, tokens: int, batch: int) -> int:
        """Open a data segment (``"layers"``: one chunk per layer; ``"all"``: one chunk of every layer).

        Returns the segment number its keys use. A :class:`Prefill` is listed at once and filled by
        :meth:`prefill_key`; a :class:`Step` is listed by :meth:`end_step`.
        """
        seg = self._next
        self._next += 1
        if kind == "layers":
            self.segments.append(Prefill(start, tokens, batch, {}))
            self._open = None
        else:
            self._open = (kind, seg, start, tokens, batch)
        return seg

    def prefill_key(self, seg: int, layer: int) -> str:
        """The key of ``layer``'s chunk in the open :class:`Prefill` (recorded in it)."""
        key = self.keys.layer(seg, layer)
        self.segments[-1].keys[layer] = key
        return key

    def step_key(self) -> str:
        """The key of the open :class:`Step`'s chunk."""
        return self.keys.step(self._open[1])

    def end_step(self, layers: Sequence[int]) -> str:
        """List the open :class:`Step` with the layers its chunk holds; returns its key."""
        _, seg, start, tokens, batch = self._open
        self._open = None
        key = self.keys.step(seg)
        self.segments.append(Step(start, tokens, batch, key, tuple(layers)))
        return key

    def rows(self, kind: str, rows: int) -> str:
        """Record a reorder or select of ``rows`` rows; returns the key its index chunk goes under."""
        key = self.keys.index(self._next)
        self._next += 1
        self.segments.append(Rows(kind, key, int(rows)))
        return key

    def other(self, seg: Segment) -> None:
        """Record a :class:`Repeat`, :class:`Crop` or :class:`Reset`."""
        self._next += 1
        self.segments.append(seg)


__all__ = ["MANIFEST_FORMAT", "MAX_SEGMENTS", "Prefill", "Step", "Rows", "Repeat", "Crop", "Reset",
           "Segment", "segment_to_dict", "segment_from_dict", "Manifest", "SessionKeys", "SessionRecorder"]
