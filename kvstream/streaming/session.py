"""A session: the ordered record of what one request's cache streamed, and its replay into per-layer tensors.

A streaming cache sends each forward's new KV as chunks and records, in order, what each chunk holds
and which operations rewrote the cache's history (beam reorders, row selection, repeats, crops, resets).
The record is the session's :class:`Manifest`, built by a :class:`SessionRecorder`;
:func:`kvstream.streaming.replay.replay` turns the manifest and the chunks back into the cache the
producer ended with.

Keys on the transport for session ``S`` (:class:`SessionKeys`)::

    S/manifest                  uint8 JSON: layout, batch, runs, model, ordered segments (written last)
    S/seg{n:06d}/layer{l:04d}   a long forward, one chunk per layer: [1, 2, B, H, T, D]   (Prefill)
    S/seg{n:06d}/all            a short forward, every KV layer:     [L, 2, B, H, T, D]   (Step)
    S/seg{n:06d}/index          int64 row indices of a reorder/select                    (Rows)

(keys and values of different head dims, MLA: ``[1, B, H, T, Dk + Dv]`` and ``[L, B, H, T, Dk + Dv]``,
:func:`kvstream.layout.packed_kv_shape`; the manifest records ``head_dim_v`` then.)

Identity: every cache that streams is a fresh *run* with a random id (32 hex digits). Each chunk's
header meta records its run and the model's :func:`~kvstream.layout.kv_fingerprint` (``{"session",
"run", "model"}``); the manifest records which run wrote which segments (:attr:`Manifest.runs`) and the
fingerprint, and carries an xxh3 of its own canonical JSON. A replay reads every chunk's header before
it allocates anything and refuses a chunk of another run (a later run that reused the session name and
died before writing its manifest), of another model, or of another shape than the manifest claims
(:func:`kvstream.streaming.replay.replay`), and checks them again after reading (a chunk replaced
meanwhile fails). Transports that persist chunks also check that each was written under the key asked
for (:func:`kvstream.chunk.key_digest`). Two live caches should not stream one session name at once
(their chunks overwrite each other; loads then fail cleanly).

Positions: segments address tokens in *position space*, ``[start, start + tokens)`` of every layer's
full history (a sliding-window layer keeps only its window of it; the replay rebuilds the whole history
and the layer trims itself). A crop records the position length it left, so replay follows whatever
convention the installed transformers used for ``crop``'s argument.

The segments themselves live in :mod:`kvstream.streaming.segments` (re-exported here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..chunk import payload_checksum
from ..errors import CorruptChunkError, LayoutError
from ..layout import dtype_from_name
from .segments import (Crop, Prefill, Repeat, Reset, Rows, Segment, Step, int_field, segment_from_dict,
                       segment_to_dict, str_field)

#: Version of the manifest document (2: runs, model fingerprint, document checksum).
MANIFEST_FORMAT = 2
#: Most segments a manifest may list (a decode step is one; a million steps is far past any session).
MAX_SEGMENTS = 1 << 20
#: Most bytes of a manifest document (a million decode steps of a 32-layer model take about 200 MiB).
MAX_MANIFEST_BYTES = 256 << 20
#: Most runs one session may have been streamed by (each load that keeps streaming adds one).
MAX_RUNS = 1 << 12
#: Meta fields every session chunk carries (see the module docstring).
RUN_META, MODEL_META = "run", "model"
#: Bounds of the geometry a manifest may declare (far past any model: Llama-3-405B has 8 KV heads of 128).
MAX_KV_HEADS, MAX_HEAD_DIM, MAX_BATCH = 1 << 12, 1 << 14, 1 << 20
_HEX32 = re.compile(r"[0-9a-f]{32}")


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
        Geometry of every KV layer (``None`` while nothing was streamed); ``head_dim`` is the keys'.
    head_dim_v : int or None
        The values' head dim (``head_dim`` unless they differ: MLA). A manifest without one (every
        manifest of one head dim, and those written before it existed) has ``head_dim``'s.
    dtype : torch.dtype or None
        Element type of the KV.
    batch : int or None
        Batch rows when the first chunk was streamed.
    seq_length : int
        Position length of the cache when the manifest was written.
    segments : list of Segment
        In the order they happened.
    run : str or None
        The run (32 hex digits) that wrote the manifest.
    runs : list of (int, str)
        ``(first segment, run id)`` of every run that recorded segments, in order: segments from that
        index on (to the next entry's) were streamed by that run (the first run streamed the session,
        each load that kept streaming added one).
    model : str or None
        :func:`~kvstream.layout.kv_fingerprint` of the producing model's config and KV dtype (``None``
        when it streamed without a config).
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
    run: str | None = None
    runs: list = field(default_factory=list)
    model: str | None = None
    head_dim_v: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim_v is None:
            self.head_dim_v = self.head_dim

    def to_dict(self) -> dict:
        """The JSON document (what :meth:`to_bytes` encodes), with its ``checksum``."""
        from ..layout import dtype_name

        doc = {"format": MANIFEST_FORMAT, "session": self.session, "num_layers": self.num_layers,
               "kv_layers": list(self.kv_layers), "kv_heads": self.kv_heads, "head_dim": self.head_dim,
               "dtype": dtype_name(self.dtype) if self.dtype is not None else None, "batch": self.batch,
               "seq_length": self.seq_length, "run": self.run, "runs": [[int(i), r] for i, r in self.runs],
               "model": self.model,
               "segments": [segment_to_dict(s) for s in self.segments]}
        if self.head_dim_v != self.head_dim:  # only then: a manifest of one head dim is as it was
            doc["head_dim_v"] = self.head_dim_v
        doc["checksum"] = _doc_checksum(doc)
        return doc

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
            On any missing, mistyped or out-of-range field, an unknown format or segment kind, or a
            document whose checksum does not match (checked after the fields).
        """
        if not isinstance(doc, dict):
            raise CorruptChunkError(f"{source}: a manifest must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != MANIFEST_FORMAT:
            raise CorruptChunkError(f"{source}: unknown manifest format {doc.get('format')!r} "
                                    f"(this kvstream reads {MANIFEST_FORMAT})")
        num_layers = int_field(doc, "num_layers", source, 1, 1 << 16)
        kv = doc.get("kv_layers")
        if not isinstance(kv, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in kv) \
                or kv != sorted(set(kv)) or (kv and not 0 <= kv[0] <= kv[-1] < num_layers):
            raise CorruptChunkError(f"{source}: field 'kv_layers' must list ascending layer ids in [0, {num_layers})")
        segs = doc.get("segments")
        if not isinstance(segs, list) or len(segs) > MAX_SEGMENTS:
            raise CorruptChunkError(f"{source}: field 'segments' must be a list of at most {MAX_SEGMENTS} segments")
        runs = doc.get("runs", [])
        if not isinstance(runs, list) or len(runs) > MAX_RUNS or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and not isinstance(r[0], bool) and r[0] >= 0
                and isinstance(r[1], str) and _HEX32.fullmatch(r[1]) for r in runs) \
                or [r[0] for r in runs] != sorted({r[0] for r in runs}):
            raise CorruptChunkError(f"{source}: field 'runs' must list at most {MAX_RUNS} [first segment, run id] "
                                    "pairs in ascending order of their first segments")
        m = cls(session=str_field(doc, "session", source), num_layers=num_layers, kv_layers=list(kv),
                seq_length=int_field(doc, "seq_length", source), runs=[(i, r) for i, r in runs],
                run=_hex_or_none(doc, "run", source), model=_hex_or_none(doc, "model", source))
        if doc.get("kv_heads") is not None or segs:
            m.kv_heads = int_field(doc, "kv_heads", source, 1, MAX_KV_HEADS)
            m.head_dim = int_field(doc, "head_dim", source, 1, MAX_HEAD_DIM)
            m.head_dim_v = int_field(doc, "head_dim_v", source, 1, MAX_HEAD_DIM) if "head_dim_v" in doc else m.head_dim
            try:
                m.dtype = dtype_from_name(doc.get("dtype"))
            except LayoutError as e:
                raise CorruptChunkError(f"{source}: {e}") from None
            m.batch = int_field(doc, "batch", source, 1, MAX_BATCH)
        m.segments = [segment_from_dict(s, f"{source} segment {i}", num_layers) for i, s in enumerate(segs)]
        if doc.get("checksum") != _doc_checksum(doc):
            raise CorruptChunkError(f"{source}: document checksum {doc.get('checksum')!r} does not match its "
                                    "content (edited or damaged)")
        return m

    @classmethod
    def from_bytes(cls, raw: torch.Tensor, source: str = "manifest") -> "Manifest":
        """Inverse of :meth:`to_bytes`. Raises :class:`CorruptChunkError` on a document over
        :data:`MAX_MANIFEST_BYTES`, bad JSON (nesting too deep included) or a bad document."""
        if raw.numel() * raw.element_size() > MAX_MANIFEST_BYTES:
            raise CorruptChunkError(f"{source} is {raw.numel() * raw.element_size()} bytes, over {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(bytes(raw.numpy()))
        except (ValueError, RecursionError) as e:
            raise CorruptChunkError(f"{source} is not valid JSON: {type(e).__name__}: {e}") from None
        return cls.from_dict(doc, source)

    def keys(self) -> list[str]:
        """Every chunk key the segments name, in order (a key once)."""
        out: dict[str, None] = {}
        for seg in self.segments:
            if isinstance(seg, Prefill):
                out.update(dict.fromkeys(seg.keys[l] for l in sorted(seg.keys)))
            elif isinstance(seg, (Step, Rows)):
                out[seg.key] = None
        return list(out)

    def run_of(self, index: int) -> str | None:
        """The run that streamed segment ``index`` (``None`` for a manifest without runs)."""
        run = None
        for first, r in self.runs:
            if first > index:
                break
            run = r
        return run


def _doc_checksum(doc: dict) -> str:
    """xxh3 of a manifest document's canonical JSON (sorted keys, compact), its ``checksum`` field left out."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return payload_checksum(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _hex_or_none(doc: dict, name: str, where: str) -> str | None:
    v = doc.get(name)
    if v is not None and not (isinstance(v, str) and _HEX32.fullmatch(v)):
        raise CorruptChunkError(f"{where}: field {name!r} must be null or 32 hex digits, got {v!r}")
    return v


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
    segments : sequence of Segment
        Segments recorded before (a loaded session that keeps streaming).

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


__all__ = ["MANIFEST_FORMAT", "MAX_SEGMENTS", "MAX_MANIFEST_BYTES", "MAX_RUNS", "RUN_META", "MODEL_META", "Prefill", "Step", "Rows", "Repeat", "Crop", "Reset",
           "Segment", "segment_to_dict", "segment_from_dict", "Manifest", "SessionKeys", "SessionRecorder"]
