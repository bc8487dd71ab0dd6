"""A session rebuilt from the chunks that landed, for a stream whose producer died before writing its manifest.

A streaming cache writes its manifest last (``StreamingCache.wait``); a producer killed mid-decode leaves
its chunks but no manifest. Every chunk says what it holds: its key names its segment (``S/seg{n:06d}/
layer{l:04d}``, ``S/seg{n:06d}/all``, ``S/seg{n:06d}/index``: :class:`~kvstream.streaming.session.SessionKeys`)
and its header its shape (batch rows, tokens), dtype, and the run and model that wrote it.
:func:`recover_manifest` walks one run's segments in order from segment 0 and stops at the first one that
is missing or incomplete — a prefill whose layers did not all land, a gap left by an operation without
chunks (a crop, a repeat, a reset), a chunk of another run, a batch that changes without a row selection.
What it returns is the longest prefix of whole segments: the *acknowledged* prefix of the stream (a chunk
that landed is one the transport acknowledged), which :func:`~kvstream.streaming.replay.replay` turns
back into per-layer KV like any manifest (it checks every chunk's run, model and shape again).

Both the failover replicas (:mod:`kvstream.serving.failover`) and a ``generate`` interrupted by a SIGKILL
(``StreamingCache.load(..., recover=True)``) are resumed this way.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import ChunkNotFound
from .protocols import ChunkTransport
from .replay import plan
from .session import MODEL_META, RUN_META, Manifest, Prefill, Rows, Step


def _segment_keys(transport: ChunkTransport, session: str) -> dict[int, dict[str, str]]:
    """``{segment number: {"all" | "index" | "layer<l>": key}}`` of every chunk stored under ``session``."""
    pattern = re.compile(re.escape(session) + r"/seg(\d{6})/(all|index|layer(\d{4}))")
    out: dict[int, dict[str, str]] = {}
    for key in transport.keys(f"{session}/seg"):
        m = pattern.fullmatch(key)
        if m is not None:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = key
    return out


def recover_manifest(transport: ChunkTransport, session: str, *, num_layers: int, kv_layers: Sequence[int],
                     base: Manifest | None = None) -> Manifest:
    """The manifest of the longest prefix of whole segments of ``session`` stored on ``transport``.

    Parameters
    ----------
    transport : ChunkTransport
        Where the session was streamed (its ``keys`` and ``describe`` are read; no payload is).
    session : str
        The session name (key prefix).
    num_layers : int
        Layers of the producing cache (KV or not).
    kv_layers : sequence of int
        The layers that hold KV, ascending: every prefill must have a chunk for each, every decode-step
        chunk holds them all (``[len(kv_layers), 2, B, H, T, D]``).
    base : Manifest, optional
        A stored manifest of the session (checked by the caller) that a later run continued: its segments
        are kept and the walk starts after them, with the run that wrote the next segment.

    Returns
    -------
    Manifest
        ``base``'s segments (if any), then the whole segments of one run in order (the run that wrote the
        first segment after ``base``'s); ``seq_length`` their position length; ``runs`` who wrote what.
        No segments (and no geometry) when not even the first is whole.

    Raises
    ------
    PeerError, TransportError
        From the transport.
    """
    kv = list(kv_layers)
    if base is None:
        manifest = Manifest(session=session, num_layers=int(num_layers), kv_layers=kv)
        pos, batch = 0, None
    else:
        manifest = Manifest(session=session, num_layers=base.num_layers, kv_layers=list(base.kv_layers),
                            kv_heads=base.kv_heads, head_dim=base.head_dim, head_dim_v=base.head_dim_v,
                            dtype=base.dtype, batch=base.batch,
                            segments=list(base.segments), runs=list(base.runs), model=base.model)
        done = plan(base)
        pos, batch = done.length, done.batch
    first_new = n = len(manifest.segments)
    run = None
    by_seg = _segment_keys(transport, session)
    while n in by_seg:
        entries = by_seg[n]
        try:
            headers = {name: transport.describe(key) for name, key in entries.items()}
        except ChunkNotFound:  # deleted meanwhile: the prefix ends here
            break
        if run is None:
            run = (next(iter(headers.values())).meta or {}).get(RUN_META)
        headers = {name: h for name, h in headers.items() if (h.meta or {}).get(RUN_META) == run}
        seg = _segment(headers, entries, kv, pos)
        if seg is None:
            break
        if isinstance(seg, Rows):
            batch = seg.rows if pos else batch
        else:
            dtypes = {h.dtype for h in headers.values()}
            if (batch is not None and seg.batch != batch) or len(dtypes) != 1 or \
                    (manifest.dtype is not None and dtypes != {manifest.dtype}):
                break
            if manifest.kv_heads is None:
                first = next(iter(headers.values()))
                manifest.kv_heads, manifest.head_dim, manifest.dtype = first.shape[3], first.shape[5], first.dtype
                manifest.head_dim_v = manifest.head_dim
                manifest.batch, manifest.model = seg.batch, (first.meta or {}).get(MODEL_META)
            batch, pos = seg.batch, pos + seg.tokens
        manifest.segments.append(seg)
        n += 1
    manifest.seq_length = pos
    if n > first_new:
        manifest.run = run
        manifest.runs = manifest.runs + [(first_new, run)] if run is not None else manifest.runs
    else:
        manifest.run = base.run if base is not None else None
    return manifest


def _segment(headers: dict, keys: dict[str, str], kv: list[int], pos: int):
    """The segment that ``headers`` (one segment's chunks of the chosen run) make, or ``None`` if they make
    none whole."""
    if "all" in headers:
        shape = tuple(headers["all"].shape)
        if len(shape) != 6 or shape[0] != len(kv) or shape[1] != 2:
            return None
        return Step(pos, shape[4], shape[2], keys["all"], tuple(kv))
    if "index" in headers:
        shape = tuple(headers["index"].shape)
        if len(shape) != 1:
            return None
        return Rows("select", keys["index"], shape[0])
    layer_keys = {int(name[len("layer"):]): keys[name] for name in headers}
    if sorted(layer_keys) != kv:
        return None
    shapes = {tuple(headers[f"layer{l:04d}"].shape) for l in kv}
    if len(shapes) != 1:
        return None
    shape = shapes.pop()
    if len(shape) != 6 or shape[:2] != (1, 2):
        return None
    return Prefill(pos, shape[4], shape[2], layer_keys)


__all__ = ["recover_manifest"]
