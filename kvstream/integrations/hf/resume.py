"""The way back into a running model: a stored session replayed into a fresh cache, and any layer-wise load
(a session, a prefix) installed so that each layer's first ``update`` waits for that layer only."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicLayer

from ...errors import ChunkNotFound, ConfigError, CorruptChunkError, KVStreamError, LayoutError
from ...layout import kv_fingerprint
from ...stores.identity import check_config_kv
from ...streaming.layerwise import LayerwiseLoad
from ...streaming.recover import recover_manifest
from ...streaming.replay import check_chunks, replay
from ...streaming.session import MAX_MANIFEST_BYTES, Manifest, SessionKeys, SessionRecorder
from ...streaming.streamer import KVStreamer
from ...transports.base import Transport


class PendingLoad:
    """A layer-wise load installed in the cache's layers: each layer is taken when the model first updates it
    (the compute stream waits for that layer's event, then the layer holds the landed tensors); ``on_done``
    runs once every layer was taken.

    Until a layer is taken it holds *meta* tensors of the right shape and dtype: ``get_seq_length()`` and
    the mask sizes are right, and any read of the data fails loudly instead of seeing bytes still in flight.
    """

    def __init__(self, cache: Any, load: LayerwiseLoad, layer_ids: list[int], on_done: Callable[[], None] | None):
        self.cache = cache
        self.load = load
        self.slot = {l: i for i, l in enumerate(layer_ids)}
        self.left = set(layer_ids)
        self.on_done = on_done

    def take(self, layer_idx: int | None = None) -> bool:
        """Take ``layer_idx`` (every layer if ``None``); ``True`` once nothing is left."""
        for l in ([layer_idx] if layer_idx is not None else sorted(self.left)):
            if l in self.left:
                self.left.discard(l)
                k, v = self.load.take(self.slot[l])
                layer = self.cache.layers[l]
                if not getattr(layer, "is_sliding", False):  # a sliding layer took its history at install
                    layer.keys, layer.values = k, v
        if self.left:
            return False
        if self.on_done is not None:
            self.on_done()
        return True

    def __del__(self):
        # A cache dropped before its first forward: its load's buffers return to the compute stream's
        # allocator, so the side stream must be done writing them first.
        if getattr(self, "left", None):
            try:
                self.load.synchronize()
            except Exception:  # noqa: BLE001 - a finalizer must not raise (interpreter shutdown)
                pass


def install(cache: Any, load: LayerwiseLoad, layer_ids: list[int], on_done: Callable[[], None] | None) -> None:
    """Put a layer-wise load into the layers ``layer_ids``: each full-attention layer holds meta placeholders of
    the landing tensors' shape now (so ``get_seq_length()`` is right) and takes the tensors when ``update`` (or
    ``wait_loaded``) makes the compute stream wait for its event; a sliding-window layer waits at once and
    takes the history through its own ``update`` (which keeps its window). A load that already landed (no
    side stream: on the CPU, or a synchronous load) is installed as is."""
    landed = load.stream is None
    for i, l in enumerate(layer_ids):
        layer = cache.layers[l]
        k, v = load.keys[i], load.values[i]
        if getattr(layer, "is_sliding", False):
            load.wait(i)
            layer.update(k, v)
        elif landed:
            layer.keys, layer.values = k, v
            layer.dtype, layer.device = k.dtype, k.device
            layer.is_initialized = True
        else:
            layer.keys = torch.empty(k.shape, dtype=k.dtype, device="meta")
            layer.values = torch.empty(v.shape, dtype=v.dtype, device="meta")
            layer.dtype, layer.device = k.dtype, k.device
            layer.is_initialized = True
    if landed:
        if on_done is not None:
            on_done()
        return
    cache._pending = PendingLoad(cache, load, layer_ids, on_done)


def read_manifest(transport: Transport, session: str) -> Manifest:
    """Fetch, parse and check ``session``'s manifest (its size checked before it is fetched).

    Raises
    ------
    ChunkNotFound
        No manifest.
    CorruptChunkError
        A manifest over :data:`~kvstream.streaming.session.MAX_MANIFEST_BYTES`, malformed, or failing its checksum.
    """
    key = SessionKeys(session).manifest
    nbytes = transport.describe(key).nbytes
    if nbytes > MAX_MANIFEST_BYTES:
        raise CorruptChunkError(f"{key} is {nbytes} bytes, over {MAX_MANIFEST_BYTES}")
    return Manifest.from_bytes(transport.fetch_new(key, "cpu"), source=key)


def replaced_keys(transport: Transport, session: str) -> list[str]:
    """The chunk keys of ``session``'s stored manifest, which a fresh run is about to replace (none if
    there is none, it cannot be read, or the transport cannot tell: a point-to-point sender)."""
    try:
        if not transport.contains(SessionKeys(session).manifest):
            return []
        return read_manifest(transport, session).keys()
    except KVStreamError:
        return []


def check_session_model(manifest: Manifest, config: Any) -> None:
    """Check a stored session against the config it is loaded with: KV heads, the keys' and values' head dims,
    dtype (where the config declares one) and the model fingerprint it was streamed with. Raises LayoutError."""
    if config is None or manifest.kv_heads is None:
        return
    where = f"session {manifest.session!r}"
    check_config_kv(config, kv_heads=manifest.kv_heads, head_dim=manifest.head_dim, dtype=manifest.dtype, where=where,
                    head_dim_v=manifest.head_dim_v)
    if manifest.model is not None and manifest.model != kv_fingerprint(config, manifest.dtype):
        raise LayoutError(f"{where} was streamed by another model (fingerprint {manifest.model}, this config's "
                          f"is {kv_fingerprint(config, manifest.dtype)}): its KV is not valid for this one")


def continue_record(cache: Any, manifest: Manifest) -> None:
    """Make ``cache`` (a fresh run of ``manifest``'s session) continue the session's record: its segments,
    the runs that wrote them (this run starts after them), the model fingerprint, batch and geometry."""
    cache._recorder = SessionRecorder(manifest.session, manifest.segments)
    n = len(manifest.segments)  # runs that recorded no segment drop out of the list
    cache._runs = [(first, run) for first, run in manifest.runs if first < n] + [(n, cache.run_id)]
    if manifest.model is not None:
        cache._model = manifest.model
        cache._chunk_meta = {**cache._chunk_meta, "model": manifest.model}
    cache._batch = manifest.batch
    if manifest.kv_heads is not None:
        cache._geometry = (manifest.kv_heads, manifest.head_dim, manifest.head_dim_v, manifest.dtype)


def acked_manifest(transport: Transport, session: str, *, num_layers: int, kv_layers: list[int]) -> Manifest:
    """The manifest of what ``session`` holds on ``transport`` now: the stored manifest (when its chunks are all
    its runs'), followed by the whole segments streamed after it; or, without a usable manifest (the
    producer was killed before :meth:`~kvstream.integrations.hf.cache.StreamingCache.wait`), the whole
    segments from the start (:func:`~kvstream.streaming.recover.recover_manifest`)."""
    base = None
    try:
        base = read_manifest(transport, session)
        check_chunks(base, transport)
    except (ChunkNotFound, CorruptChunkError):
        base = None
    return recover_manifest(transport, session, num_layers=num_layers, kv_layers=kv_layers, base=base)


def load_session(cls: type, transport: Transport, session: str, *, config: Any, device: torch.device | str | None,
                 level: int | str | None, offload: bool, stream: bool, layerwise: bool | None,
                 gpu_budget_bytes: int | None = None, recover: bool = False, **options: Any) -> Any:
    """:meth:`StreamingCache.load <kvstream.integrations.hf.cache.StreamingCache.load>`: read the manifest (or,
    with ``recover``, :func:`acked_manifest`), build a ``cls`` cache (``options``: more constructor arguments),
    replay the chunks into it, continue the session's record."""
    device = torch.device(device or "cpu")
    cache = cls(config=config, transport=transport if stream else None, session=session, level=level,
                offload=offload, gpu_budget_bytes=gpu_budget_bytes, **options)
    if recover:
        if config is None:
            raise ConfigError("StreamingCache.load(recover=True) needs config= (the layers whose chunks to look for)")
        manifest = acked_manifest(transport, session, num_layers=len(cache.layers), kv_layers=cache._kv_layer_ids())
    else:
        manifest = cls.read_manifest(transport, session)
    check_session_model(manifest, config)
    kv_ids = manifest.kv_layers
    if config is not None and cache._kv_layer_ids() != kv_ids:
        raise LayoutError(f"{session}: stored KV has layers {kv_ids}, the config's cache has {cache._kv_layer_ids()}")
    while len(cache.layers) < manifest.num_layers:
        cache.layers.append(DynamicLayer())
    streamer = cache._ensure_streamer(device) if stream else KVStreamer(transport, level=level, device=device)
    load = replay(manifest, streamer, device=device, layerwise=False if offload else layerwise)
    if load.keys:
        install(cache, load, kv_ids, on_done=None)
    continue_record(cache, manifest)
    if cache._offloader is not None:
        cache._settle()
        for l in kv_ids:
            cache._offloader.adopt(l)
    return cache


__all__ = ["PendingLoad", "install", "read_manifest", "replaced_keys", "check_session_model", "continue_record",
           "acked_manifest", "load_session"]
