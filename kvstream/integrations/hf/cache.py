"""The Hugging Face ``generate`` hook: a ``DynamicCache`` that streams its KV out as the model runs.

:class:`StreamingCache` subclasses transformers' ``DynamicCache`` and behaves exactly like it inside
``generate`` (greedy, sampling, batched with padding, beam search, sliding-window layers): every
``update`` first does what ``DynamicCache`` does, then hands the layer's *new* keys and values to a
:class:`~kvstream.streaming.streamer.KVStreamer`:

* a long forward (the prompt: more than ``layer_chunk_min_tokens`` new tokens) streams **one chunk per
  layer** as soon as that layer has produced it — DéjàVu's layer-by-layer prompt streaming;
* short forwards (decode steps) stream **one chunk for all layers** every ``steps_per_chunk`` steps: the
  steps' tokens, read from the cache's layers, packed by one ``torch.stack``
  (:meth:`~kvstream.streaming.streamer.KVStreamer.scatter_step`; one kernel launch for K and V of different
  head dims) — DéjàVu's token path, in bulk (:mod:`.tail`).

Operations that rewrite history (beam-search ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``, ``crop``, ``reset``) are recorded in order in the session's manifest
(:mod:`kvstream.streaming.session`), so the stored session replays to exactly the cache ``generate``
ended with: :meth:`StreamingCache.wait` writes the manifest, :meth:`StreamingCache.load` replays it
(:mod:`kvstream.streaming.replay`) in any process. :mod:`.offload` keeps the history in host memory;
:mod:`.prefix` fills the cache from a prefix store.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ...errors import ConfigError
from ...transports.base import Transport
from . import prefix as _prefix
from .base import MANIFEST_FORMAT, SUPPORTED_DYNAMIC, _SessionStreaming, _supported
from .offload import Offloader
from .resume import load_session
from .reuse import fill_from_prefix
from .tail import STEPS_PER_CHUNK, edge_update


class StreamingCache(_SessionStreaming, DynamicCache):
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
        DéjàVuLib level 0-3 (default ``KVSTREAM_LEVEL`` or 3); see :mod:`kvstream.streaming.levels`.
    offload : bool
        Keep only the layer in flight and the next one on the GPU; the rest in pinned host memory.
    gpu_budget_bytes : int, optional
        With ``offload=True``: bytes of KV that may stay on the GPU. As many layers as fit keep their KV
        resident (as ``DynamicCache`` does) and only the rest is offloaded, spread over the depth so that
        each offloaded layer's prefetch runs while the layers before it compute: the cost grows with the
        offloaded fraction (:class:`~kvstream.integrations.hf.offload.Offloader` says what is counted).
        ``None``: offload every full-attention layer.
    layer_chunk_min_tokens : int
        Forwards with more new tokens than this stream one chunk per layer (prompt path); others one
        chunk for all layers (decode path).
    steps_per_chunk : int
        Decode steps whose new tokens go out together, as one chunk of every layer (default 16): a step
        costs the host a counter, and the chunk's fixed cost is paid once per ``steps_per_chunk`` steps
        (:mod:`kvstream.integrations.hf.tail`). ``wait()``, history rewrites and longer forwards stream
        the pending steps first. ``1``: every step is durable as it ends.

    Raises
    ------
    ConfigError
        If the config has cache layers this cache cannot stream (linear attention, hybrid Mamba, the
        indexer cache of sparse attention: the message names their classes), the session name is not a
        relative key prefix, or ``gpu_budget_bytes`` is given without ``offload=True`` (or is not a
        non-negative int).

    Notes
    -----
    Every cache is a fresh *run* of its session (:attr:`run_id`, random): each chunk's header records
    the run and the model's fingerprint, and so does the manifest (which run wrote which segments).
    A cache that reuses the name of a session that exists starts such a fresh run and overwrites the
    old chunks; a :meth:`load` of the old manifest then refuses every chunk of the new run
    (``CorruptChunkError``) instead of replaying the old manifest over the new run's KV, even if the new
    run died before its :meth:`wait`. The first ``wait()`` of a fresh run deletes the chunks of the
    manifest it replaced that it did not overwrite. A load of a session that a live run is overwriting
    fails cleanly (the replay checks every chunk's run before and after reading it).

    Examples
    --------
    >>> transport = kvstream.DiskTransport("/tmp/kv")                                    # doctest: +SKIP
    >>> cache = kvstream.StreamingCache(config=model.config, transport=transport, session="req-42")
    >>> out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    >>> cache.wait()
    >>> cache2 = kvstream.StreamingCache.load(transport, session="req-42", config=model.config, device="cuda")
    >>> more = model.generate(out, cache=cache2, max_new_tokens=64)
    """

    def __init__(self, config: Any = None, transport: Transport | None = None, session: str = "default", *,
                 level: int | str | None = None, offload: bool = False, layer_chunk_min_tokens: int = 16,
                 gpu_budget_bytes: int | None = None, steps_per_chunk: int = STEPS_PER_CHUNK):
        super().__init__(config=config)
        bad = [type(l).__name__ for l in self.layers if not _supported(l)]
        if bad:
            raise ConfigError(f"StreamingCache streams attention KV only ({', '.join(SUPPORTED_DYNAMIC)} layers); "
                              f"this config has cache layers {sorted(set(bad))}")
        if gpu_budget_bytes is not None and not offload:
            raise ConfigError("gpu_budget_bytes needs offload=True (it says how much of the KV stays on the GPU)")
        self._init_streaming(config, transport, session, level, layer_chunk_min_tokens, steps_per_chunk)
        self.offload = bool(offload)
        self._pending = None  # a layer-wise load (a prefix, a session) not yet taken
        self._offloader = Offloader(self, gpu_budget_bytes) if self.offload else None
        self.matched_tokens = 0

    @property
    def offloaded_layers(self) -> list[int]:
        """The layers whose KV history lives in pinned host memory (``offload=True``), ascending; the other
        layers keep theirs on the GPU."""
        return self._offloader.offloaded_layers if self._offloader is not None else []

    # ------------------------------------------------------------------------------------------------
    # the hook
    # ------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``DynamicCache.update``, then stream the new ``key_states``/``value_states`` ``[B, H, T_new, D]``."""
        t = self._tail
        if t is not None:
            # the hot path of a decode step: DynamicCache's update and a counter; the step's tokens stay in the
            # cache and go out with the next steps' (:mod:`.tail`)
            if layer_idx != t.first:
                keys, values = DynamicCache.update(self, key_states, value_states, layer_idx, *args, **kwargs)
                t.seen += 1
                if layer_idx == t.last:
                    self._tail_step_ended(t)
                return keys, values
            if t.seen == 0 and key_states.shape[-2] == t.n and key_states.shape[0] == t.batch:
                keys, values = DynamicCache.update(self, key_states, value_states, layer_idx, *args, **kwargs)
                t.seen = 1
                if layer_idx == t.last:
                    self._tail_step_ended(t)
                return keys, values
            self._close_tail()  # a longer forward, another batch, or the last one stopped early
        if self._pending is not None and self._pending.take(layer_idx):
            self._pending = None
        if self._offloader is not None:
            if self.layer_class_to_replicate is not None:
                while len(self.layers) <= layer_idx:
                    self.layers.append(self.layer_class_to_replicate())
            keys, values = self._offloader.update(key_states, value_states, layer_idx, *args, **kwargs)
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

    #: The first and last KV layers' update while an eager tail is open (:class:`~.tail.EdgeHook`).
    _edge_update = edge_update

    def _irregular_last(self, t, layer_idx: int, key_states, value_states, out):
        """The last KV layer of a forward that did not begin at the first (already updated): the tail closes
        and streams it as it happened (the layers it grew, :meth:`_partial_step`)."""
        t.seen = 1
        self._close_tail()
        return out

    @classmethod
    def load(cls, transport: Transport, session: str, *, config: Any = None, device: torch.device | str | None = None,
             level: int | str | None = None, offload: bool = False, stream: bool = True,
             layerwise: bool | None = None, gpu_budget_bytes: int | None = None,
             recover: bool = False, steps_per_chunk: int = STEPS_PER_CHUNK) -> "StreamingCache":
        """Rebuild a session's cache from its stored chunks (the same class, still streaming).

        The chunks are replayed through a :class:`~kvstream.streaming.streamer.KVStreamer` (its ``gather``
        and the unpack kernels; ``cache.stats["bytes_in"]`` counts them). On a CUDA device the load returns
        before the copies finish: layer ``l`` is usable when its event fires, and the cache's ``update`` of
        layer ``l`` makes the compute stream wait for exactly that event (:func:`kvstream.streaming.replay.replay`).

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
        level, offload, gpu_budget_bytes, steps_per_chunk
            As for the constructor (``offload=True`` loads synchronously, then moves the KV of the layers the
            budget does not keep to host memory).
        stream : bool
            Keep streaming new tokens into the same session (``True``), or load only.
        layerwise : bool, optional
            Return before the KV has landed, layer by layer (default: on a CUDA device).
        recover : bool
            Load what the session holds now even if its producer died before :meth:`wait` wrote the
            manifest (a ``generate`` killed mid-decode): the stored manifest, if its chunks are intact, and
            then every whole segment streamed after it, in order, up to the first that did not land
            (:func:`~kvstream.integrations.hf.resume.acked_manifest`). Needs ``config``. The loaded
            ``get_seq_length()`` says how many positions came back; feed ``generate`` the prompt and the
            tokens generated so far, and it computes only the positions past them.

        Raises
        ------
        ChunkNotFound
            A manifest or chunk is missing.
        CorruptChunkError
            A chunk fails its checksum or the manifest is malformed.
        LayoutError
            The stored KV does not match ``config``: its KV layers, KV heads, ``head_dim``, dtype (where the
            config declares one), or the model fingerprint the session was streamed with.
        """
        return load_session(cls, transport, session, config=config, device=device, level=level, offload=offload,
                            stream=stream, layerwise=layerwise, gpu_budget_bytes=gpu_budget_bytes,
                            recover=recover, steps_per_chunk=steps_per_chunk)

    @classmethod
    def from_prefix(cls, store: Any, input_ids: Any, *, config: Any = None, device: torch.device | str | None = None,
                    transport: Transport | None = None, session: str = "default", layerwise: bool | None = None,
                    model: Any = None, prefill: Any = None, reuse: str = "auto", front_tokens: int | None = None,
                    **kwargs) -> "StreamingCache":
        """A cache pre-filled, by measured cost, from the longest prefix of ``input_ids`` found in ``store``.

        The stored prefix is used only when loading it is predicted faster than recomputing it
        (:mod:`kvstream.integrations.hf.reuse`): the store tier's measured read cost against the model's
        prefill time (measured on first use with ``model=``, or given as ``prefill=``). With ``model=`` the
        plan may also *split*: recompute the prefix's first tokens while the tier loads the rest, both at
        once. The decision is ``cache.reuse_plan`` (:class:`~kvstream.stores.cost.ReusePlan`: tokens loaded
        and recomputed, predicted and actual time). Without ``model=`` or ``prefill=`` whatever matched
        is loaded, as before.

        ``cache.matched_tokens`` says how many tokens the cache holds (at most ``T - 1``, so ``generate``
        always has a token to feed); ``model.generate(input_ids, cache=cache)`` then prefills
        only the rest. ``store`` is a :class:`~kvstream.RadixStore`, :class:`~kvstream.ChunkFileStore` or
        :class:`~kvstream.TieredStore`; ``input_ids`` a ``[1, T]`` tensor or a list of ids.

        ``layerwise`` (default: on a CUDA device, without a transport, with no sliding-window layers):
        return before the prefix has landed. Each layer's host-to-device copy runs on a side stream in
        layer order, and the compute stream waits for layer ``l`` only when layer ``l`` runs, so loading
        overlaps the prefill of the suffix (as SGLang HiCache and LMCache's layer-wise mode do). The
        store's pins are released once every layer was taken. With a transport the prefix goes through
        ``update`` instead, so that it is streamed into the session like any other KV.

        Parameters
        ----------
        model : transformers.PreTrainedModel, optional
            The model ``generate`` will run: its prefill time is measured once (cached per model and
            device) and the compute/load split becomes possible.
        prefill : kvstream.stores.cost.PrefillTime, optional
            The model's prefill time, given instead of measured (tests, a known device).
        reuse : {"auto", "load"}
            ``"auto"``: by cost; ``"load"``: load whatever matched (the plan is still recorded).
        front_tokens : int, optional
            Force a split: recompute this many tokens (rounded down to the tier's granularity), load the
            rest of the stored prefix (needs ``model=``).

        Raises
        ------
        ConfigError
            ``layerwise=True`` with a transport or sliding-window layers; ``front_tokens`` without a model;
            an unknown ``reuse``.
        LayoutError
            The store's KV has another number of layers, KV heads, ``head_dim`` or dtype than the cache and
            ``config``, or the store holds another model's KV (its namespace is the fingerprint of the first
            model it was used with: :mod:`kvstream.stores.identity`).
        """
        if config is None and model is not None:
            config = model.config
        cache = cls(config=config, transport=transport, session=session, **kwargs)
        if device is None:
            device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        layered = _prefix.check_layerwise(layerwise, device, transport, cache.layers)
        fill_from_prefix(cache, store, input_ids, device=device, layerwise=layered, model=model, prefill=prefill,
                         reuse=reuse, front_tokens=front_tokens, config=config)
        return cache

__all__ = ["StreamingCache", "MANIFEST_FORMAT"]
