"""Planned prefix reuse inside ``generate``: load the stored prefix, recompute it, or both at once.

:meth:`StreamingCache.from_prefix <kvstream.integrations.hf.cache.StreamingCache.from_prefix>` runs
:func:`fill_from_prefix`: it looks the prompt up, prices the match (the tier's measured
:class:`~kvstream.stores.cost.TierCost` against the model's measured :class:`~kvstream.stores.cost.PrefillTime`,
:func:`~kvstream.stores.cost.plan_reuse`) and then

* ``"recompute"``: releases the match; ``generate`` prefills the whole prompt (loading was predicted slower);
* ``"load"``: loads the stored prefix (layer by layer on a GPU); ``generate`` prefills the rest;
* ``"split"`` (with ``model=``; the idea of "Cake: compute or load KV cache? why not both",
  arXiv 2410.03065): the KV of tokens ``[x, m)`` does not depend on recomputing ``[0, x)``, so the tier
  starts reading ``[x, m)`` (:meth:`~kvstream.stores.match.PrefixMatch.prefetch`) while the model
  computes ``[0, x)``, with ``x`` chosen so both finish together; then ``generate`` prefills the rest.
  Each layer's KV is the recomputed front followed by the loaded part, joined on the compute stream
  just before that layer first runs.

Before the lookup, each tier's best case (:func:`~kvstream.stores.cost.reuse_bound`) decides whether it is
touched at all; a lookup that runs defers its pins to the load, and its host time is part of the plan.
The plan is kept on the cache (``cache.reuse_plan``, with its measured ``actual_s``). The model's prefill
time is measured on first use (:func:`prefill_time`: a few ``generate`` calls of growing prompts, fitted)
and cached per model and device under :func:`~kvstream.stores.cost.cache_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
import weakref
from typing import Any

import torch

from ...cuda import Event
from ...errors import ConfigError, LayoutError
from ...stores.base import PrefixStore
from ...layout import KVLayout, config_dtype
from ...stores.cost import (PrefillTime, ReusePlan, cache_dir, plan_reuse, predict, read_json, reuse_bound,
                            update_json)
from ...stores.hashing import as_token_ids, token_row
from ...streaming.layerwise import LayerwiseLoad
from .keywords import cache_kwargs
from .prefix import bind_store, check_loaded
from .resume import install

#: Reuse policies of ``from_prefix(reuse=...)``.
REUSE_POLICIES = ("auto", "load")


class Stopwatch:
    """Seconds between two points of the compute stream (CUDA events; the host clock on the CPU)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._start = Event(device, timing=True).record() if self._cuda else None
        self._t0 = time.perf_counter()
        self._end: Any = None

    def stop(self) -> None:
        """Mark the end (the first call counts)."""
        if self._end is None:
            self._end = Event(self._start.device, timing=True).record() if self._cuda else time.perf_counter()

    def elapsed_s(self) -> float | None:
        """Seconds from start to :meth:`stop` (``None`` before it; waits for the GPU to get there)."""
        if self._end is None:
            return None
        if not self._cuda:
            return self._end - self._t0
        self._end.synchronize()
        return self._start.elapsed_ms(self._end) / 1e3


class _FirstForward:
    """Stands in the cache's pending load: calls ``on_done`` when the first forward reaches its last layer."""

    load = None  # nothing is in flight (the cache's ``pending_load``)

    def __init__(self, last_layer: int, on_done):
        self.last_layer, self.on_done = last_layer, on_done

    def take(self, layer_idx: int | None = None) -> bool:
        """Called by the cache per layer: ``True`` (after ``on_done()``) at the last layer or with ``None``."""
        if layer_idx is not None and layer_idx != self.last_layer:
            return False
        self.on_done()
        return True


class _Joined:
    """Layer ``l``'s event of a split: waiting for it waits for the loaded part, then copies it (on the waiting
    stream) behind the recomputed front in the layer's buffers ``kv`` ``[2, 1, H, m, D]``."""

    def __init__(self, load: LayerwiseLoad, l: int, kv: torch.Tensor, front_tokens: int):
        self.load, self.l, self.kv, self.x = load, l, kv, front_tokens
        self.joined = False

    def wait(self, stream=None) -> None:
        """Take the loaded K/V ``[1, H, m - front_tokens, D]`` and copy it behind the front, ordered on ``stream``.

        Once only; later calls do nothing. ``stream`` (default: the current one) is the compute stream that
        will read the buffers. Raises ``ConfigError`` if the load's layer was already taken elsewhere.
        """
        if not self.joined:
            k, v = self.load.take(self.l, stream)
            with torch.cuda.stream(stream) if stream is not None and self.kv.is_cuda else contextlib.nullcontext():
                self.kv[0, :, :, self.x:].copy_(k)
                self.kv[1, :, :, self.x:].copy_(v)
            self.joined = True

    def synchronize(self) -> None:
        """Block the host until the loaded part of this layer has landed (not the join copy)."""
        self.load.events[self.l].synchronize()

    def query(self) -> bool:
        """Whether the loaded part of this layer has landed, without blocking."""
        return self.load.events[self.l].query()


def prefill_time(model: Any, device: torch.device, *, lengths: list[int] | None = None,
                 reps: int = 2) -> PrefillTime:
    """The model's prefill time on ``device``: cached per model and device, else measured now and cached.

    Measured with ``generate(max_new_tokens=1)`` (the time to the first token) from an empty cache at
    each of ``lengths`` (default: four lengths up to the model's ``max_position_embeddings``, at most
    8192), the best of ``reps`` after a warm-up, fitted by :meth:`~kvstream.stores.cost.PrefillTime.fit`.
    """
    key = _fingerprint(model, device)
    path = cache_dir() / "prefill.json"
    cached = read_json(path).get(key)
    if isinstance(cached, dict):
        try:
            return PrefillTime.from_dict(cached)
        except (KeyError, TypeError, ValueError):
            pass
    fit = measure_prefill(model, device, lengths=lengths, reps=reps)
    update_json(path, key, {**fit.to_dict(), "at": time.time()})
    return fit


def measure_prefill(model: Any, device: torch.device, *, lengths: list[int] | None = None,
                    reps: int = 2) -> PrefillTime:
    """Measure and fit the prefill time now (see :func:`prefill_time`); nothing is cached."""
    from transformers import DynamicCache

    config = model.config
    cap = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
    top = min(cap, 8192)
    lengths = sorted({max(8, n) for n in (lengths or [top // 16, top // 4, top // 2, top])})
    vocab = int(getattr(config, "vocab_size", 256))
    ids = torch.randint(0, min(vocab, 256), (1, max(lengths)), device=device)

    def _once(n: int) -> float:
        x = ids[:, :n]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, **cache_kwargs(DynamicCache(config=config)), max_new_tokens=1, do_sample=False,
                           attention_mask=torch.ones_like(x), pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    _once(lengths[0])  # warm-up
    return PrefillTime.fit([(n, 0, min(_once(n) for _ in range(max(1, reps)))) for n in lengths])


def _fingerprint(model: Any, device: torch.device) -> str:
    """What the prefill time depends on: the model class, its config, dtype and the device."""
    dtype = next(model.parameters()).dtype
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc = f"{type(model).__name__}|{model.config.to_json_string(use_diff=False)}|{dtype}|{name}|{torch.__version__}"
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def _front_kv(model: Any, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a forward of ``ids`` ``[1, x]`` from an empty cache (no logits)."""
    from transformers import DynamicCache

    front = DynamicCache(config=model.config)
    with torch.no_grad():
        getattr(model, "base_model", model)(input_ids=ids, **cache_kwargs(front), use_cache=True)
    return [(layer.keys, layer.values) for layer in front.layers]


def _plan(n: int, match, *, device: torch.device, layers: int, layerwise: bool, can_split: bool,
          prefill: PrefillTime | None, reuse: str, front_tokens: int | None, spent_s: float = 0.0) -> ReusePlan:
    m, g = match.matched_tokens, match.granularity
    tier = getattr(match.store, "name", "store")
    if m == 0:
        recompute = None if prefill is None else prefill(n)
        return ReusePlan("none", n, 0, recomputed_tokens=n, tier=tier, reason="nothing stored", recompute_s=recompute,
                         predicted_s=None if recompute is None else spent_s + recompute, lookup_s=spent_s)
    if front_tokens is not None:
        x = min(int(front_tokens) // g * g, m)
        if x and not can_split:
            raise ConfigError("from_prefix(front_tokens=...) needs model= and no sliding-window layers")
        if x == m:
            return ReusePlan("recompute", n, m, recomputed_tokens=n, tier=tier, reason=f"front_tokens={front_tokens}")
        predicted = None
        if prefill is not None and match.bytes_per_token is not None and match.store is not None:
            predicted = predict(n, m, x, match.bytes_per_token, match.store.read_cost(device), prefill,
                                layers=layers, layerwise=layerwise, spent_s=spent_s)
        return ReusePlan("split" if x else "load", n, m, front_tokens=x, loaded_tokens=m - x,
                         recomputed_tokens=n - m + x, predicted_s=predicted, tier=tier,
                         reason=f"front_tokens={front_tokens}")
    if reuse == "load" or prefill is None or match.bytes_per_token is None or match.store is None:
        why = "reuse='load'" if reuse == "load" else "no prefill time (pass model= or prefill=)"
        return ReusePlan("load" if reuse == "load" else "load (unplanned)", n, m, loaded_tokens=m,
                         recomputed_tokens=n - m, tier=tier, reason=why)
    return plan_reuse(n, m, match.bytes_per_token, match.store.read_cost(device), prefill, layers=layers,
                      granularity=g, split=can_split, layerwise=layerwise, tier_name=tier, spent_s=spent_s)


class _Gate:
    """The decision before the lookup (:func:`~kvstream.stores.cost.reuse_bound`), per tier of ``store``: a tier
    whose best case (every token but the last stored, at its calibrated figures, split included, its lookup's
    observed host time added) cannot beat recomputing by the plan's margin is not touched at all."""

    def __init__(self, store: PrefixStore, n: int, bytes_per_token: float, prefill: PrefillTime, *,
                 device: torch.device, layers: int, can_split: bool, layerwise: bool):
        self.n, self.bpt, self.prefill, self.device = n, bytes_per_token, prefill, device
        self.kw = dict(layers=layers, split=can_split, layerwise=layerwise)
        self.recompute = prefill(n)
        self.bounds: dict[int, float] = {}
        for tier in getattr(store, "tiers", None) or [store]:
            lookup = getattr(tier, "lookup_cost", None)
            bound = reuse_bound(n, bytes_per_token, tier.read_cost(device), prefill,
                                lookup_s=lookup.estimate(n) if lookup is not None else 0.0, **self.kw)
            if bound is not None:
                self.bounds[id(tier)] = bound

    def reason(self) -> str:
        """Why no tier was looked up (the plan's ``reason`` when the gate refused them all)."""
        return (f"not looked up: even every token but the last stored could not beat recomputing "
                f"({self.recompute * 1e3:.1f} ms) by the margin, at the tier's measured figures")

    def consider(self, tier: PrefixStore, held: Any) -> bool:
        """Whether to touch ``tier`` with the match ``held`` in hand (``None``): only if its best case beats it."""
        bound = self.bounds.get(id(tier))
        if bound is None:
            return False
        if held is None or held.matched_tokens == 0 or held.store is None or held.bytes_per_token is None:
            return True
        kept = predict(self.n, held.matched_tokens, 0, held.bytes_per_token, held.store.read_cost(self.device),
                       self.prefill, layers=self.kw["layers"], layerwise=self.kw["layerwise"])
        return bound < min(kept, self.recompute)


def _bytes_per_token(store: PrefixStore, config: Any, model: Any) -> float:
    """Bytes of KV per token before any lookup, at most what a stored token holds: the store's own figure, else
    the config's geometry at the model's dtype (or the config's, or one byte: the bound stays a bound)."""
    known = getattr(store, "bytes_per_token", None)
    if callable(known) and known() is not None:
        return float(known())
    dtype = next(model.parameters()).dtype if model is not None else config_dtype(config)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.uint8
    hit = _CONFIG_BYTES.get(id(config))
    if hit is not None and hit[0]() is config and hit[1] == dtype:
        return hit[2]  # the same config object: its geometry is not read again (~0.1 ms of config reads)
    try:
        got = float(KVLayout.from_config(config, dtype).bytes_per_token())
    except Exception:  # noqa: BLE001 - no geometry: the smallest KV a token can have
        got = 1.0
    try:
        if len(_CONFIG_BYTES) > 64:
            _CONFIG_BYTES.clear()
        _CONFIG_BYTES[id(config)] = (weakref.ref(config), dtype, got)
    except TypeError:  # a config that takes no weak reference: read every time
        pass
    return got


#: ``id(config) -> (weakref to it, dtype, bytes per token)`` of :func:`_bytes_per_token`.
_CONFIG_BYTES: dict[int, tuple] = {}


def _lookup(store: PrefixStore, ids: list[int], cap: int, *, planned: bool, gate: "_Gate | None"):
    """The store's lookup; a planned one defers pins (and header reads) to the load and lets the gate skip tiers."""
    params = inspect.signature(type(store).lookup).parameters
    kw = {}
    if planned and "defer_pins" in params:
        kw["defer_pins"] = True
    if gate is not None and "consider" in params:
        kw["consider"] = gate.consider
    return store.lookup(ids, max_tokens=cap, **kw)


def fill_from_prefix(cache: Any, store: PrefixStore, input_ids: Any, *, device: torch.device, layerwise: bool,
                     model: Any = None, prefill: PrefillTime | None = None, reuse: str = "auto",
                     front_tokens: int | None = None, config: Any = None) -> ReusePlan:
    """Fill the empty ``cache`` by plan (see the module docstring); returns the plan (also ``cache.reuse_plan``).

    Raises
    ------
    ConfigError
        An unknown ``reuse``, or ``front_tokens`` without a model.
    LayoutError
        The store's KV has another number of layers than the cache, does not fit ``config``, or the store
        holds another model's KV.
    """
    if reuse not in REUSE_POLICIES:
        raise ConfigError(f"from_prefix reuse must be one of {REUSE_POLICIES}, got {reuse!r}")
    clock = Stopwatch(device)
    # the gate needs only the count: the ids are read to the host (and checked) once a tier is looked up
    ids = None if isinstance(input_ids, torch.Tensor) else as_token_ids(input_ids, what="input_ids")
    n = token_row(input_ids, what="input_ids").numel() if ids is None else len(ids)
    n_layers = len(cache.layers)
    sliding = any(getattr(l, "is_sliding", False) for l in cache.layers)
    if model is not None and prefill is None and reuse == "auto" and front_tokens is None:
        prefill = prefill_time(model, device)
    config = config if config is not None else getattr(cache, "config", None)
    bind_store(store, config)
    layers, can_split = n_layers or 32, model is not None and not sliding
    planned = reuse == "auto" and front_tokens is None and prefill is not None
    gate = None
    if planned and n >= 2:
        gate = _Gate(store, n, _bytes_per_token(store, config, model), prefill, device=device, layers=layers,
                     can_split=can_split, layerwise=layerwise)
        if not gate.bounds:  # no tier could win: not a pin file, not a stat, not a header read
            plan = ReusePlan("recompute", n, 0, recomputed_tokens=n, predicted_s=gate.recompute,
                             recompute_s=gate.recompute, tier=getattr(store, "name", "store"), reason=gate.reason())
            return _recompute(cache, plan, clock, n_layers)
    t0 = time.perf_counter()
    if ids is None:
        ids = as_token_ids(input_ids, what="input_ids")
    match = _lookup(store, ids, n - 1, planned=planned, gate=gate) if n >= 2 else None
    spent = time.perf_counter() - t0
    if match is not None and getattr(store, "lookup_cost", None) is not None:
        store.lookup_cost.observe(n, spent)
    try:
        plan = (ReusePlan("none", n, 0, recomputed_tokens=n, reason="a prompt of < 2 tokens") if match is None else
                _plan(n, match, device=device, layers=layers, layerwise=layerwise, can_split=can_split,
                      prefill=prefill, reuse=reuse, front_tokens=front_tokens, spent_s=spent))
        if plan.choice in ("none", "recompute"):
            if match is not None:
                match.release()
            return _recompute(cache, plan, clock, n_layers)
        plan._clock = clock
        cache.reuse_plan = plan
        x = plan.front_tokens
        match.prefetch(start=x)  # a file tier starts reading [x, m) now, beside the front's compute
        front = _front_kv(model, torch.tensor([ids[:x]], device=device)) if x else None
        if layerwise:
            load = match.load_layers(device, start=x)
            loaded = len(load) > 0
        else:
            keys, values = match.load(device, start=x)
            loaded = len(keys) > 0
        if loaded:
            _check_layers(len(load) if layerwise else len(keys), n_layers, cache)
            check_loaded(load.keys if layerwise else keys, config, store)
    except BaseException:
        if match is not None and not match.released:
            match.release()
        raise
    plan.loaded_tokens = match.matched_tokens - x
    plan.recomputed_tokens = n - plan.loaded_tokens
    cache.matched_tokens = match.matched_tokens
    if layerwise and loaded:
        if front is not None:
            load = _join(front, load, x)

        def _done() -> None:
            clock.stop()
            match.release()

        install(cache, load, list(range(len(load))), on_done=_done)
        return plan
    if loaded or front is not None:  # all at once (or the front alone: nothing was read intact)
        for l in range(len(front) if front is not None else len(keys)):
            parts = ([front[l]] if front is not None else []) + ([(keys[l], values[l])] if not layerwise and loaded else [])
            cache.update(torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2), l)
    match.release()
    cache._pending = _FirstForward(len(cache.layers) - 1, clock.stop) if cache.layers else None
    return plan


def _recompute(cache: Any, plan: ReusePlan, clock: Stopwatch, n_layers: int) -> ReusePlan:
    """Record a plan that loads nothing: the clock stops when the first forward reaches its last layer."""
    plan._clock = clock
    cache.reuse_plan = plan
    cache._pending = _FirstForward(n_layers - 1, clock.stop) if n_layers else None
    return plan


def _join(front: list, load: LayerwiseLoad, x: int) -> LayerwiseLoad:
    """The split's layer-wise load: per layer the recomputed front ``[0, x)`` copied now into a buffer of the
    whole prefix, the loaded part copied behind it when the layer is first used (:class:`_Joined`)."""
    kvs, events = [], []
    for l, (fk, fv) in enumerate(front):
        h, d = fk.shape[1], fk.shape[3]
        kv = torch.empty((2, 1, h, load.matched_tokens, d), dtype=fk.dtype, device=fk.device)
        kv[0, :, :, :x].copy_(fk)
        kv[1, :, :, :x].copy_(fv)
        kvs.append(kv)
        events.append(_Joined(load, l, kv, x))
    if load.stream is None:  # the loaded part has landed (a synchronous load): join every layer now
        for e in events:
            e.wait()
    # ``stream`` says whether the load is still in flight (kvstream.integrations.hf.resume.install)
    return LayerwiseLoad([kv[0] for kv in kvs], [kv[1] for kv in kvs], events, load.matched_tokens, stream=load.stream)


def _check_layers(stored: int, layers: int, cache: Any) -> None:
    if getattr(cache, "layer_class_to_replicate", None) is None and stored != layers:
        raise LayoutError(f"The store holds KV of {stored} layers, the cache has {layers}")


__all__ = ["fill_from_prefix", "prefill_time", "measure_prefill", "Stopwatch", "REUSE_POLICIES"]
