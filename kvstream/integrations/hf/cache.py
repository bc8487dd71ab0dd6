"""The Hugging Face ``generate`` hook: a ``DynamicCache`` that streams its KV out as the model runs.

:class:`StreamingCache` subclasses transformers' ``DynamicCache`` and behaves exactly like it inside
``generate`` (greedy, sampling, batched with padding, beam search, sliding-window layers): every
``update`` first does what ``DynamicCache`` does, then hands the layer's *new* keys and values to a
:class:`~kvstream.streaming.streamer.KVStreamer`:

* a long forward (the prompt: more than ``layer_chunk_min_tokens`` new tokens) streams **one chunk per
  layer** as soon as that layer has produced it — DéjàVu's layer-by-layer prompt streaming;
* a short forward (a decode step) streams **one chunk for all layers** after the last layer, packed by
  one kernel launch — DéjàVu's token path.

Cache operations that rewrite history (beam-search ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``, ``crop``, ``reset``) are recorded in order, so the stored session replays to
exactly the cache ``generate`` ended with. :meth:`StreamingCache.wait` waits for every chunk and writes
the session manifest; :meth:`StreamingCache.load` rebuilds the cache from it in any process.

Keys on the transport for session ``S``::

    S/manifest                  uint8 JSON: layout, batch, ordered segments (written last, by wait())
    S/seg{n:06d}/layer{l:04d}   a long forward, one chunk per layer: [1, 2, B, H, T, D]
    S/seg{n:06d}/all            a short forward, every KV layer:     [L, 2, B, H, T, D]
    S/seg{n:06d}/index          int64 row indices of a reorder/select

``offload=True`` keeps on the GPU only the layer being computed and the next one (prefetched on a side
stream while the current one computes); every layer's history lives in pinned host memory, which only
the *new* tokens cross each step (device→host), plus one host→device prefetch per layer. HF's own
offloaded cache instead copies each whole layer both ways every step (``Cache.offload/prefetch`` in
transformers' ``cache_utils.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...errors import ConfigError, CorruptChunkError, LayoutError
from ...layout import KVLayout, Region, dtype_name
from ...cuda import Event, Stream, host_empty, memcpy_2d_async, side_stream
from ...streaming.streamer import KVStreamer, resolve_level
from ...transports.base import Transport

MANIFEST_FORMAT = 1


def _is_kv_layer(layer: Any) -> bool:
    return isinstance(layer, DynamicLayer)


def _supported(layer: Any) -> bool:
    # DynamicLayer and its sliding-window subclass hold KV; DummyLayer (shared-KV / MLP-only layers) holds none.
    return isinstance(layer, DynamicLayer) or type(layer).__name__ == "DummyLayer"


@dataclass
class _Forward:
    """The forward pass in progress: which layers were updated and with how many new tokens."""

    mode: str  # "layers" (one chunk per layer) or "all" (one chunk for all layers)
    tokens: int
    start: int
    last_layer: int = -1
    parts: list | None = None  # [(layer_idx, k_new, v_new)] kept until the chunk is packed


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``[B, H, T, D]`` as a ``[B * H, T * D]`` view with one row pitch, or ``None`` if no such view exists."""
    b, h, n, d = t.shape
    try:
        return t.view(b * h, n * d)
    except RuntimeError:
        return None


class _HostMirror:
    """One layer's KV history in pinned host memory, ``[B, H, capacity, D]`` for K and for V."""

    def __init__(self, like: torch.Tensor, capacity: int):
        b, h, _, d = like.shape
        self.shape = (b, h, d)
        self.dtype = like.dtype
        self.n = 0
        self.k = host_empty((b, h, capacity, d), like.dtype, pin=like.is_cuda)
        self.v = host_empty((b, h, capacity, d), like.dtype, pin=like.is_cuda)
        self.ready: Event | None = None  # the last append's completion

    @property
    def capacity(self) -> int:
        """Tokens the host buffers can hold before they grow."""
        return self.k.shape[2]

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        if self.ready is not None:
            self.ready.synchronize()
        cap = max(need, 2 * self.capacity)
        b, h, d = self.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = host_empty((b, h, cap, d), self.dtype, pin=old.is_pinned())
            new[:, :, :self.n].copy_(old[:, :, :self.n])
            setattr(self, name, new)

    def append(self, keys: torch.Tensor, values: torch.Tensor, n_new: int, stream: Stream | None) -> None:
        """Copy the newest ``n_new`` tokens of the device tensors ``keys``/``values`` ``[B, H, n + n_new, D]``."""
        self._grow(self.n + n_new)
        b, h, d = self.shape
        for src, dst in ((keys, self.k), (values, self.v)):
            s = src[:, :, self.n:self.n + n_new]
            t = dst[:, :, self.n:self.n + n_new]
            s2, t2 = _rows(s), _rows(t)
            if s2 is not None and t2 is not None:
                memcpy_2d_async(t2, s2, stream)
            else:  # rows not expressible as one pitched copy (an unusual stride): let torch copy
                t.copy_(s, non_blocking=True)
        if stream is not None and stream.is_cuda:
            self.ready = stream.record_event()
        self.n += n_new

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views ``[B, H, n, D]`` of the stored history, keys and values."""
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def to_device(self, device: torch.device, extra: int, stream: Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Device tensors ``[B, H, n + extra, D]`` whose first ``n`` tokens are this history (copied on ``stream``)."""
        b, h, d = self.shape
        out = []
        for src in (self.k, self.v):
            buf = torch.empty(b, h, self.n + extra, d, dtype=self.dtype, device=device)
            memcpy_2d_async(_rows(buf[:, :, :self.n]), _rows(src[:, :, :self.n]), stream)
            out.append(buf)
        return out[0], out[1]

    def apply(self, fn) -> None:
        """Replace both buffers by ``fn(view)`` (row ops such as index_select), keeping capacity semantics."""
        if self.ready is not None:
            self.ready.synchronize()
        k, v = fn(self.k[:, :, :self.n]), fn(self.v[:, :, :self.n])
        self.shape = (k.shape[0], k.shape[1], k.shape[3])
        self.n = 0
        cap = max(k.shape[2], 1)
        self.k = host_empty((*k.shape[:2], cap, k.shape[3]), k.dtype, pin=self.k.is_pinned())
        self.v = host_empty((*v.shape[:2], cap, v.shape[3]), v.dtype, pin=self.v.is_pinned())
        self.k[:, :, :k.shape[2]].copy_(k)
        self.v[:, :, :v.shape[2]].copy_(v)
        self.n = k.shape[2]


class StreamingCache(DynamicCache):
    """A transformers ``DynamicCache`` that streams each layer's new KV to a transport while ``generate`` runs.

    Parameters
    ----------
    config : transformers.PretrainedConfig, optional
        The model's config (layer types, sliding windows). Without it layers are created lazily, as in
        ``DynamicCache()``.
    transport : Transport, optional
        Where KV goes (:class:`~kvstream.HostTransport`, :class:`~kvstream.DiskTransport`, ...). ``None``:
        no streaming (useful with ``offload=True`` alone or for a prefix-filled cache).
    session : str
        Key prefix of this request's chunks (``"req-42"``).
    level : int or str, optional
        DéjàVuLib level 0-3 (default ``KVSTREAM_LEVEL`` or 3); see :mod:`kvstream.streaming.streamer`.
    offload : bool
        Keep only the layer in flight and the next one on the GPU; the rest in pinned host memory.
    layer_chunk_min_tokens : int
        Forwards with more new tokens than this stream one chunk per layer (prompt path); others one
        chunk for all layers (decode path).

    Raises
    ------
    ConfigError
        If the config has layers whose state is not KV (linear attention, hybrid Mamba), which this
        cache cannot stream.

    Examples
    --------
    >>> transport = kvstream.DiskTransport("/tmp/kv")                                    # doctest: +SKIP
    >>> cache = kvstream.StreamingCache(config=model.config, transport=transport, session="req-42")
    >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    >>> cache.wait()
    >>> cache2 = kvstream.StreamingCache.load(transport, session="req-42", config=model.config, device="cuda")
    >>> more = model.generate(out, past_key_values=cache2, max_new_tokens=64)
    """

    def __init__(self, config: Any = None, transport: Transport | None = None, session: str = "default", *,
                 level: int | str | None = None, offload: bool = False, layer_chunk_min_tokens: int = 16):
        super().__init__(config=config)
        bad = [type(l).__name__ for l in self.layers if not _supported(l)]
        if bad:
            raise ConfigError(f"StreamingCache streams attention KV only; this config has layers {sorted(set(bad))}")
        if not isinstance(session, str) or not session or session.startswith("/") or ".." in session.split("/"):
            raise ConfigError(f"Invalid session name {session!r}: a non-empty relative key prefix without '..' parts")
        self.config = config
        self.transport = transport
        self.session = session
        self.offload = bool(offload)
        self.layer_chunk_min_tokens = int(layer_chunk_min_tokens)
        self.streamer: KVStreamer | None = None
        self._level = resolve_level(level) if transport is not None else level
        self._fwd: _Forward | None = None
        self._prefix: tuple | None = None  # (match, layer-wise load, layers not yet taken) from from_prefix
        self._kv_ids: list[int] = []
        self._kv_ids_for = -1
        self._last_kv_layer: int | None = None
        self._segments: list[dict] = []
        self._seg = 0
        self._batch: int | None = None
        self._geometry: tuple | None = None  # (kv_heads, head_dim, dtype) of the first layer seen
        self.matched_tokens = 0
        # offload state
        self._mirrors: dict[int, _HostMirror] = {}
        self._prefetched: dict[int, tuple] = {}
        self._side: Stream | None = None
        self._prefetch_stream: Stream | None = None

    # ------------------------------------------------------------------------------------------------
    # the hook
    # ------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``DynamicCache.update``, then stream the new ``key_states``/``value_states`` ``[B, H, T_new, D]``."""
        if self._prefix is not None:
            self._take_prefix(layer_idx)
        if self.offload:
            if self.layer_class_to_replicate is not None:
                while len(self.layers) <= layer_idx:
                    self.layers.append(self.layer_class_to_replicate())
            keys, values = self._offload_update(key_states, value_states, layer_idx, *args, **kwargs)
        else:
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.transport is not None:
            if self._level == 0 and keys.device == key_states.device and keys.shape[-2] >= key_states.shape[-2]:
                # DéjàVuLib's naive baseline copies rows of the [B, H, S, D] cache; the new key_states are
                # often a transposed [B, S, H, D] view, where every token would be its own row
                n = key_states.shape[-2]
                key_states, value_states = keys[:, :, keys.shape[-2] - n:], values[:, :, values.shape[-2] - n:]
            self._stream_new(layer_idx, key_states, value_states)
        return keys, values

    def _ensure_streamer(self, device: torch.device) -> KVStreamer:
        if self.streamer is None:
            self.streamer = KVStreamer(self.transport, level=self._level, device=device)
        return self.streamer

    def _kv_layer_ids(self) -> list[int]:
        n = len(self.layers)
        if self._kv_ids_for != n:  # layers are created lazily without a config: recompute when they grow
            self._kv_ids = [i for i, l in enumerate(self.layers) if _is_kv_layer(l)]
            self._kv_ids_for = n
        return self._kv_ids

    def _stream_new(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[-2]
        fwd = self._fwd
        if fwd is not None and layer_idx > fwd.last_layer and n == fwd.tokens:
            # the hot path: one more layer of the forward in progress (32 times per decode step)
            fwd.last_layer = layer_idx
            if fwd.mode == "all":
                fwd.parts.append((layer_idx, None, k, v))
            else:
                self._stream_layer(fwd, layer_idx, k, v)
            if layer_idx == self._last_kv_layer:
                self._finish_forward()
            return
        if n == 0:
            return
        self._ensure_streamer(k.device)
        if self._batch is None:
            self._batch = k.shape[0]
            self._geometry = (k.shape[1], k.shape[3], k.dtype)
        self._finish_forward()
        start = self.layers[layer_idx].get_seq_length() - n
        mode = "layers" if n > self.layer_chunk_min_tokens else "all"
        fwd = self._fwd = _Forward(mode=mode, tokens=n, start=start, last_layer=layer_idx, parts=[])
        seg = {"kind": mode, "start": start, "tokens": n, "batch": k.shape[0]}
        if mode == "layers":
            seg["keys"] = {}
        else:
            seg["key"] = f"{self.session}/seg{self._seg:06d}/all"
        self._segments.append(seg)
        self._seg += 1
        if mode == "all":
            fwd.parts.append((layer_idx, None, k, v))
        else:
            self._stream_layer(fwd, layer_idx, k, v)
        kv_ids = self._kv_layer_ids()
        self._last_kv_layer = kv_ids[-1] if kv_ids and self.layer_class_to_replicate is None else None
        if layer_idx == self._last_kv_layer:
            self._finish_forward()

    def _stream_layer(self, fwd: _Forward, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A long forward: this layer's chunk goes out now (levels 2-3) or after the forward (levels 0-1)."""
        key = f"{self.session}/seg{self._seg - 1:06d}/layer{layer_idx:04d}"
        self._segments[-1]["keys"][str(layer_idx)] = key
        if self.streamer.level >= 2:
            self.streamer.scatter(key, [k], [v], Region(layers=(0, 1), tokens=(0, fwd.tokens)),
                                  meta={"session": self.session, "layer": layer_idx})
        else:
            fwd.parts.append((layer_idx, key, k, v))

    def _finish_forward(self) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None or not fwd.parts:
            return
        streamer = self.streamer
        if fwd.mode == "layers":
            for layer_idx, key, k, v in fwd.parts:
                streamer.scatter(key, [k], [v], Region(layers=(0, 1), tokens=(0, fwd.tokens)),
                                 meta={"session": self.session, "layer": layer_idx})
            return
        seg = self._segments[-1]
        seg["layers"] = [p[0] for p in fwd.parts]
        ks = [p[2] for p in fwd.parts]
        vs = [p[3] for p in fwd.parts]
        streamer.scatter_newest(seg["key"], ks, vs, num_tokens=fwd.tokens)  # layers are in the manifest

    # ------------------------------------------------------------------------------------------------
    # history-rewriting operations: applied, then recorded for replay
    # ------------------------------------------------------------------------------------------------
    def _record(self, op: dict, index: torch.Tensor | None = None) -> None:
        if self.transport is None:
            return
        self._finish_forward()
        if index is not None:
            key = f"{self.session}/seg{self._seg:06d}/index"
            idx = index.detach().to("cpu", torch.int64).contiguous()
            self._ensure_streamer(index.device if index.is_cuda else torch.device("cpu")).flush(key, idx).wait()
            op["key"] = key
            op["rows"] = int(idx.numel())
        self._segments.append(op)
        self._seg += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder batch rows (as ``DynamicCache``), and record it for replay."""
        if self._prefix is not None:
            self._take_prefix()
        self._finish_forward()
        self._apply_mirrors(lambda t: t.index_select(0, beam_idx.to("cpu")))
        super().reorder_cache(beam_idx)
        self._record({"kind": "reorder"}, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` batch rows (as ``DynamicCache``), and record it."""
        if self._prefix is not None:
            self._take_prefix()
        self._finish_forward()
        self._apply_mirrors(lambda t: t[indices.to("cpu")])
        super().batch_select_indices(indices)
        self._record({"kind": "select"}, torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (as ``DynamicCache``), and record it."""
        if self._prefix is not None:
            self._take_prefix()
        self._finish_forward()
        self._apply_mirrors(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)
        if self._batch is not None:
            self._batch *= repeats
        self._record({"kind": "repeat", "repeats": int(repeats)})

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens (as ``DynamicCache.crop``), and record it."""
        if self._prefix is not None:
            self._take_prefix()
        self._finish_forward()
        if self.offload and self._mirrors:
            raise ConfigError("StreamingCache(offload=True) does not support crop (assisted decoding)")
        super().crop(tokens_to_remove)
        self._record({"kind": "crop", "tokens": int(tokens_to_remove)})

    def reset(self) -> None:
        """Clear the cache (as ``DynamicCache.reset``), and record it."""
        if self._prefix is not None:
            self._take_prefix()
        self._finish_forward()
        self._mirrors.clear()
        self._prefetched.clear()
        super().reset()
        self._record({"kind": "reset"})

    # ------------------------------------------------------------------------------------------------
    # completion and reload
    # ------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Bytes and chunks streamed so far (``bytes_out``, ``chunks_out``, ...), and the segment count."""
        d = self.streamer.stats.as_dict() if self.streamer is not None else {"chunks_out": 0, "bytes_out": 0}
        d["segments"] = len(self._segments)
        return d

    def manifest(self) -> dict:
        """The session manifest: layout, batch and the ordered segments (what :meth:`load` replays)."""
        kv_heads, head_dim, dtype = self._geometry if self._geometry else (None, None, None)
        return {"format": MANIFEST_FORMAT, "session": self.session, "num_layers": len(self.layers),
                "kv_layers": self._kv_layer_ids(), "kv_heads": kv_heads, "head_dim": head_dim,
                "dtype": dtype_name(dtype) if dtype is not None else None, "batch": self._batch,
                "seq_length": self.get_seq_length(), "segments": self._segments}

    def wait(self) -> None:
        """Block until every chunk has landed, then write the session manifest (``S/manifest``).

        Raises the first transport error of any chunk (for example ``CapacityError``).
        """
        if self._prefix is not None:
            self._take_prefix()
        if self.transport is None:
            return
        self._finish_forward()
        if self.streamer is not None:
            self.streamer.wait()
        doc = json.dumps(self.manifest(), separators=(",", ":")).encode()
        blob = torch.frombuffer(bytearray(doc), dtype=torch.uint8)
        self.transport.flush(f"{self.session}/manifest", blob).wait()

    @classmethod
    def read_manifest(cls, transport: Transport, session: str) -> dict:
        """Fetch and parse ``session``'s manifest. Raises ``ChunkNotFound`` or ``CorruptChunkError``."""
        raw = transport.fetch_new(f"{session}/manifest", "cpu")
        try:
            doc = json.loads(bytes(raw.numpy()))
        except ValueError as e:
            raise CorruptChunkError(f"{session}/manifest is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise CorruptChunkError(f"{session}/manifest has an unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
        return doc

    @classmethod
    def load(cls, transport: Transport, session: str, *, config: Any = None, device: torch.device | str | None = None,
             level: int | str | None = None, offload: bool = False, stream: bool = True) -> "StreamingCache":
        """Rebuild a session's cache from its stored chunks (the same class, still streaming).

        Parameters
        ----------
        transport : Transport
            Where the session was streamed.
        session : str
            The session name used when streaming.
        config : transformers.PretrainedConfig, optional
            The model's config (must match the one that streamed).
        device : torch.device or str, optional
            Where the KV goes (``"cuda"``); default the CPU.
        stream : bool
            Keep streaming new tokens into the same session (``True``), or load only.

        Raises
        ------
        ChunkNotFound
            A manifest or chunk is missing.
        CorruptChunkError
            A chunk fails its checksum or the manifest is malformed.
        LayoutError
            The stored KV does not match ``config`` (layer count).
        """
        doc = cls.read_manifest(transport, session)
        device = torch.device(device or "cpu")
        cache = cls(config=config, transport=transport if stream else None, session=session, level=level, offload=offload)
        kv_ids = doc["kv_layers"]
        if config is not None and cache._kv_layer_ids() != kv_ids:
            raise LayoutError(f"{session}: stored KV has layers {kv_ids}, the config's cache has {cache._kv_layer_ids()}")
        while len(cache.layers) < doc["num_layers"]:
            cache.layers.append(DynamicLayer())
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in kv_ids}

        def materialize():
            """Concatenate each layer's fetched segments into one tensor per K and V."""
            for l in kv_ids:
                if len(parts[l]) > 1:
                    parts[l] = [(torch.cat([p[0] for p in parts[l]], dim=2), torch.cat([p[1] for p in parts[l]], dim=2))]

        def rows_op(fn):
            """Apply a batch-row operation (reorder, select, repeat, crop) to every layer's history."""
            materialize()
            for l in kv_ids:
                if parts[l]:
                    parts[l] = [(fn(parts[l][0][0]), fn(parts[l][0][1]))]

        for seg in doc["segments"]:
            kind = seg["kind"]
            if kind == "layers":
                for l_str, key in seg["keys"].items():
                    chunk = transport.fetch_new(key, device)
                    parts[int(l_str)].append((chunk[0, 0], chunk[0, 1]))
            elif kind == "all":
                chunk = transport.fetch_new(seg["key"], device)
                if chunk.shape[0] != len(seg["layers"]):
                    raise CorruptChunkError(f"{seg['key']}: {chunk.shape[0]} layers stored, manifest lists {len(seg['layers'])}")
                for i, l in enumerate(seg["layers"]):
                    parts[l].append((chunk[i, 0], chunk[i, 1]))
            elif kind in ("reorder", "select"):
                idx = transport.fetch_new(seg["key"], "cpu").to(device)
                rows_op(lambda t: t.index_select(0, idx))
            elif kind == "repeat":
                rows_op(lambda t: t.repeat_interleave(seg["repeats"], dim=0))
            elif kind == "crop":
                n = seg["tokens"]
                rows_op(lambda t: t[:, :, :n] if n >= 0 else t[:, :, :t.shape[2] + n])
            elif kind == "reset":
                parts = {l: [] for l in kv_ids}
            else:
                raise CorruptChunkError(f"{session}/manifest: unknown segment kind {kind!r}")
        materialize()
        for l in kv_ids:
            if parts[l]:
                k, v = parts[l][0]
                cache.layers[l].update(k.contiguous(), v.contiguous())  # the layer's own update: sliding windows trim
                if cache.offload:
                    cache._adopt_into_mirror(l)
        cache._segments = list(doc["segments"])
        cache._seg = len(cache._segments)
        cache._batch = doc.get("batch")
        if doc.get("kv_heads") is not None:
            from ...layout import dtype_from_name

            cache._geometry = (doc["kv_heads"], doc["head_dim"], dtype_from_name(doc["dtype"]))
        return cache

    @classmethod
    def from_prefix(cls, store: Any, input_ids: Any, *, config: Any = None, device: torch.device | str | None = None,
                    transport: Transport | None = None, session: str = "default", layerwise: bool | None = None,
                    **kwargs) -> "StreamingCache":
        """A cache pre-filled with the longest prefix of ``input_ids`` found in ``store``.

        ``cache.matched_tokens`` says how many tokens were found (at most ``T - 1``, so ``generate`` always
        has a token to feed); ``model.generate(input_ids, past_key_values=cache)`` then prefills only the
        rest. ``store`` is a :class:`~kvstream.RadixStore` or :class:`~kvstream.ChunkFileStore`;
        ``input_ids`` a ``[1, T]`` tensor or a list of ids.

        ``layerwise`` (default: on a CUDA device, without a transport, with no sliding-window layers):
        return before the prefix has landed. Each layer's host-to-device copy runs on a side stream in
        layer order, and the compute stream waits for layer ``l`` only when layer ``l`` runs, so loading
        overlaps the prefill of the suffix (as SGLang HiCache and LMCache's layer-wise mode do). The
        store's pins are released once every layer was taken. With a transport the prefix goes through
        ``update`` instead, so that it is streamed into the session like any other KV.
        """
        from ...stores.hashing import as_token_ids
        from ...stores.reuse import load_prefix_into

        cache = cls(config=config, transport=transport, session=session, **kwargs)
        if device is None:
            device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        sliding = any(getattr(l, "is_sliding", False) for l in cache.layers)
        if layerwise is None:
            layerwise = device.type == "cuda" and transport is None and not sliding and bool(cache.layers)
        if not layerwise:
            cache.matched_tokens = int(load_prefix_into(cache, store, input_ids, device=device))
            return cache
        if transport is not None or sliding or not cache.layers:
            raise ConfigError("from_prefix(layerwise=True) needs a config without sliding-window layers and no "
                              "transport (the prefix would not be streamed into the session)")
        ids = as_token_ids(input_ids, what="input_ids")
        if len(ids) < 2:
            return cache
        match = store.lookup(ids, max_tokens=len(ids) - 1)
        if match.matched_tokens == 0:
            match.release()
            return cache
        load = match.load_layers(device)
        if len(load.keys) != len(cache.layers):
            match.release()
            raise LayoutError(f"The store holds KV of {len(load.keys)} layers, the cache has {len(cache.layers)}")
        for i, layer in enumerate(cache.layers):
            # the layer holds the landing tensors now (so get_seq_length() is right); update(i) waits for them
            k, v = load.keys[i], load.values[i]
            layer.keys, layer.values = k, v
            layer.dtype, layer.device = k.dtype, k.device
            layer.is_initialized = True
        cache._prefix = (match, load, set(range(len(cache.layers))))
        cache.matched_tokens = int(load.matched_tokens)
        return cache

    def _take_prefix(self, layer_idx: int | None = None) -> None:
        """Make the compute stream wait for layer ``layer_idx``'s prefix copy (every layer's if ``None``)."""
        match, load, pending = self._prefix
        for l in ([layer_idx] if layer_idx is not None else sorted(pending)):
            if l in pending:
                load.take(l)
                pending.discard(l)
        if not pending:
            self._prefix = None
            match.release()  # the last copy has landed by now, or release waits for it

    def layout(self) -> KVLayout:
        """The :class:`~kvstream.layout.KVLayout` of what this cache holds (after the first update)."""
        if self._geometry is None:
            ids = self._kv_layer_ids()
            if not ids or not self.layers[ids[0]].is_initialized:
                raise LayoutError("StreamingCache.layout(): the cache is empty")
            k = self.layers[ids[0]].keys
            self._geometry = (k.shape[1], k.shape[3], k.dtype)
        kv_heads, head_dim, dtype = self._geometry
        return KVLayout(num_layers=len(self._kv_layer_ids()), kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)

    # ------------------------------------------------------------------------------------------------
    # offload
    # ------------------------------------------------------------------------------------------------
    def _offloadable(self, layer: Any) -> bool:
        return _is_kv_layer(layer) and not getattr(layer, "is_sliding", False)

    def _streams(self, device: torch.device) -> tuple[Stream | None, Stream | None]:
        if device.type != "cuda":
            return None, None
        if self._side is None:
            self._side = side_stream(device, "kvstream-offload")
            self._prefetch_stream = side_stream(device, "kvstream-prefetch")
        return self._side, self._prefetch_stream

    def _offload_update(self, k_new: torch.Tensor, v_new: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not self._offloadable(layer):
            return layer.update(k_new, v_new, *args, **kwargs)
        device = k_new.device
        side, _ = self._streams(device)
        n_new = k_new.shape[-2]
        mirror = self._mirrors.get(layer_idx)
        if mirror is not None and mirror.n > 0:
            pf = self._prefetched.pop(layer_idx, None)
            if pf is None:  # not prefetched: fetch now on the current stream
                if mirror.ready is not None:
                    mirror.ready.wait()
                kbuf, vbuf = mirror.to_device(device, n_new, None)
                extra = n_new
            else:
                kbuf, vbuf, extra, event = pf
                if event is not None:
                    event.wait()  # the compute stream waits for the prefetch, the host does not
            if extra == n_new:
                kbuf[:, :, mirror.n:].copy_(k_new)
                vbuf[:, :, mirror.n:].copy_(v_new)
                layer.keys, layer.values = kbuf, vbuf
                keys, values = kbuf, vbuf
            else:
                layer.keys, layer.values = kbuf[:, :, :mirror.n], vbuf[:, :, :mirror.n]
                keys, values = layer.update(k_new, v_new, *args, **kwargs)
        else:
            keys, values = layer.update(k_new, v_new, *args, **kwargs)
            mirror = self._mirrors[layer_idx] = _HostMirror(keys, capacity=max(2 * keys.shape[2], 64))
        # the newest tokens go to host memory on the side stream, after the compute that made them
        if side is not None:
            side.wait_stream()
            keys.record_stream(side.torch_stream)
            values.record_stream(side.torch_stream)
            with side:
                mirror.append(keys, values, n_new, side)
        else:
            mirror.append(keys, values, n_new, None)
        layer.keys, layer.values = mirror.views()
        self._prefetch_next(layer_idx, device)
        return keys, values

    def _prefetch_next(self, layer_idx: int, device: torch.device) -> None:
        ids = [i for i in self._kv_layer_ids() if self._offloadable(self.layers[i]) and i in self._mirrors]
        if not ids:
            return
        later = [i for i in ids if i > layer_idx]
        nxt = later[0] if later else ids[0]
        if nxt == layer_idx or nxt in self._prefetched:
            return
        mirror = self._mirrors[nxt]
        _, pstream = self._streams(device)
        if pstream is None:
            k, v = mirror.to_device(device, 1, None)
            self._prefetched[nxt] = (k, v, 1, None)
            return
        if mirror.ready is not None:
            pstream.wait_event(mirror.ready)
        with pstream:
            k, v = mirror.to_device(device, 1, pstream)
        compute = torch.cuda.current_stream(device)
        k.record_stream(compute)
        v.record_stream(compute)
        self._prefetched[nxt] = (k, v, 1, pstream.record_event())

    def _apply_mirrors(self, fn) -> None:
        if not self._mirrors:
            return
        self._prefetched.clear()
        for l, m in self._mirrors.items():
            m.apply(fn)
            self.layers[l].keys, self.layers[l].values = m.views()

    def _adopt_into_mirror(self, layer_idx: int) -> None:
        layer = self.layers[layer_idx]
        if not self._offloadable(layer):
            return
        k, v = layer.keys, layer.values
        m = _HostMirror(k, capacity=max(2 * k.shape[2], 64))
        side, _ = self._streams(k.device)
        m.append(k, v, k.shape[2], side)
        if m.ready is not None:
            m.ready.synchronize()
        self._mirrors[layer_idx] = m
        layer.keys, layer.values = m.views()


__all__ = ["StreamingCache", "MANIFEST_FORMAT"]
