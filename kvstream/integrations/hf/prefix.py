"""Prefix reuse inside Hugging Face ``generate``: fill an empty cache with the longest stored prefix.

``generate`` continues from a pre-filled cache: it feeds only the tokens after ``cache.get_seq_length()``
(transformers 5.x ``DynamicCache``). So reuse is: look the prompt up in a prefix store, put the matched
KV into a fresh cache, and let ``generate`` prefill the rest. The match is capped at ``T - 1`` tokens
because ``generate`` needs at least one new token to feed. Sliding-window layers receive the whole
prefix through their own ``update`` and keep their window by themselves.

Usage (:meth:`StreamingCache.from_prefix <kvstream.integrations.hf.cache.StreamingCache.from_prefix>`
wraps the same steps, and can load layer by layer)::

    cache = DynamicCache(config=model.config)
    matched = load_prefix_into(cache, store, input_ids, device=model.device)
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    store.update(out, cache)        # keep this turn for the next one
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError, LayoutError
from ...stores.base import PrefixMatch, PrefixStore
from ...stores.hashing import as_token_ids
from ...stores.identity import check_config_kv
from ...streaming.layerwise import LayerwiseLoad


def bind_store(store: PrefixStore, config: Any) -> None:
    """Tie ``store`` to the model of ``config`` (its default namespace), or check it is tied to it;
    stores without model scoping are left alone (:mod:`kvstream.stores.identity`)."""
    bind = getattr(store, "bind_model", None)
    if config is not None and bind is not None:
        bind(config)


def check_loaded(keys: list, config: Any, store: PrefixStore) -> None:
    """Check a loaded match ``keys`` (per layer ``[1, H, m, D]``) against ``config``. Raises LayoutError."""
    if config is not None and keys:
        check_config_kv(config, kv_heads=int(keys[0].shape[1]), head_dim=int(keys[0].shape[3]), dtype=keys[0].dtype,
                        layers=len(keys), where=f"the KV {type(store).__name__} holds for this prefix")


def load_prefix_into(cache: Any, store: PrefixStore, input_ids: Any, *,
                     device: torch.device | str | None = None, config: Any = None) -> int:
    """Fill the empty ``cache`` with the KV of the longest prefix of ``input_ids`` that ``store`` holds.

    Parameters
    ----------
    cache : transformers.DynamicCache (or a subclass)
        Empty; layers may be created lazily (``cache.update(k, v, layer_idx)`` is used).
    store : PrefixStore
        :class:`~kvstream.RadixStore`, :class:`~kvstream.ChunkFileStore`, ...
    input_ids : torch.Tensor or sequence of int
        ``[1, T]`` prompt ids (one sequence).
    device : torch.device or str, optional
        Where the model runs (the cache's tensors go there); default: the device of ``input_ids`` if it
        is a tensor, else the CPU.
    config : transformers.PretrainedConfig, optional
        The model's config (default: ``cache.config`` where the cache has one). The store is tied to its
        fingerprint (another model's KV never matches) and the loaded KV is checked against it.

    Returns
    -------
    int
        Tokens loaded (``0 <= matched <= T - 1``); ``generate`` then prefills ``T - matched`` tokens.

    Raises
    ------
    ConfigError
        If the cache is not empty.
    LayoutError
        If the stored KV has another number of layers than the cache, or another geometry or dtype than
        ``config``, or the store holds another model's KV.

    Examples
    --------
    >>> cache = DynamicCache(config=model.config)                                   # doctest: +SKIP
    >>> load_prefix_into(cache, store, input_ids, device="cuda")                    # doctest: +SKIP
    """
    if cache.get_seq_length() != 0:
        raise ConfigError(f"load_prefix_into needs an empty cache; this one holds {cache.get_seq_length()} tokens")
    ids = as_token_ids(input_ids, what="input_ids")
    if device is None:
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
    if len(ids) < 2:
        return 0
    config = config if config is not None else getattr(cache, "config", None)
    bind_store(store, config)
    with store.fetch_prefix(ids, device=device, max_tokens=len(ids) - 1) as match:
        if match.matched_tokens == 0:
            return 0
        check_loaded(match.keys, config, store)
        layers = getattr(cache, "layers", None) or []
        if getattr(cache, "layer_class_to_replicate", None) is None and len(layers) != len(match.keys):
            raise LayoutError(f"The store holds KV of {len(match.keys)} layers, the cache has {len(layers)}")
        for i, (k, v) in enumerate(zip(match.keys, match.values)):
            cache.update(k, v, i)
        return match.matched_tokens


def lookup_layers(store: PrefixStore, input_ids: Any, device: torch.device, num_layers: int,
                  config: Any = None) -> tuple[LayerwiseLoad, PrefixMatch] | None:
    """Look ``input_ids`` up and start loading the match layer by layer onto ``device``.

    Returns ``(load, match)`` — the caller releases ``match`` once every layer was taken — or ``None`` when
    nothing matched (at most ``T - 1`` tokens are matched, so ``generate`` has a token to feed).

    Raises
    ------
    LayoutError
        If the store's KV has another number of layers than ``num_layers``, or does not fit ``config``
        (see :func:`load_prefix_into`).
    """
    ids = as_token_ids(input_ids, what="input_ids")
    if len(ids) < 2:
        return None
    bind_store(store, config)
    match = store.lookup(ids, max_tokens=len(ids) - 1)
    if match.matched_tokens == 0:
        match.release()
        return None
    try:
        load = match.load_layers(device)
        if len(load.keys) != num_layers:
            raise LayoutError(f"The store holds KV of {len(load.keys)} layers, the cache has {num_layers}")
        check_loaded(load.keys, config, store)
    except BaseException:
        match.release()
        raise
    return load, match


def check_layerwise(layerwise: bool | None, device: torch.device, transport: Any, layers: list) -> bool:
    """Whether :meth:`~kvstream.integrations.hf.cache.StreamingCache.from_prefix` loads layer by layer.

    Default: on a CUDA device, without a transport, with no sliding-window layers.

    Raises
    ------
    ConfigError
        If ``layerwise=True`` is asked with a transport or sliding-window layers.
    """
    sliding = any(getattr(l, "is_sliding", False) for l in layers)
    if layerwise is None:
        return device.type == "cuda" and transport is None and not sliding and bool(layers)
    if layerwise and (transport is not None or sliding or not layers):
        raise ConfigError("from_prefix(layerwise=True) needs a config without sliding-window layers and no "
                          "transport (the prefix would not be streamed into the session)")
    return bool(layerwise)


__all__ = ["load_prefix_into", "lookup_layers", "check_layerwise", "bind_store", "check_loaded"]
