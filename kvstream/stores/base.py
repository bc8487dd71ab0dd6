"""The one small interface of a prefix store, the pinned match it hands out, and cache helpers.

A prefix store keeps the KV of token sequences it was given and, for a new sequence, finds the longest
stored prefix and hands its KV back, so prefill only computes the rest (Vineyard's llm-cache, LMCache,
SGLang's radix cache). Two implementations: :class:`~kvstream.stores.radix.RadixStore` (host memory,
radix tree) and :class:`~kvstream.stores.chunk_file.ChunkFileStore` (files named by chained hashes).

The contract every store keeps:

* ``lookup(token_ids)`` returns a :class:`PrefixMatch` that **pins** what it matched: eviction (radix
  store) and GC (file store) skip pinned data until ``match.release()`` (or the ``with`` block ends),
  so a match can never be evicted between lookup and load (the crash LMCache users hit). Pins are
  counted; a second ``release()`` raises :class:`PinError`, a count never goes negative, and a match that
  is garbage-collected unreleased releases its pins with a ``ResourceWarning`` (no leak).
* ``match.load(device)`` returns per-layer keys and values ``[1, kv_heads, matched, head_dim]``. A chunk
  found missing or corrupt at load time *shortens* the match (``matched_tokens`` drops to what was
  read intact); wrong KV is never returned.
* ``match.load_layers(device, stream=side)`` starts the same load layer by layer on a side stream and
  returns a :class:`~kvstream.streaming.layerwise.LayerwiseLoad` at once (:mod:`kvstream.stores.layerwise`);
  stores that cannot do better load synchronously and hand back completed events.
* ``update_kv(token_ids, keys, values, start=...)`` stores KV; ``update(token_ids, cache)`` takes it
  from a cache (:func:`kv_from_cache`) after ``generate``.
* ``read_cost(device)`` is the store's measured :class:`~kvstream.stores.cost.TierCost` (what a load
  costs, against recomputing: :func:`~kvstream.stores.cost.plan_reuse`); ``store.tier_cost`` overrides it.

:class:`PrefixMatch` and :class:`PinError` live in :mod:`kvstream.stores.match`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from ..errors import ConfigError, LayoutError, TransportError
from ..layout import KVLayout, Region, check_hf_layers
from .calibration import HostCost, device_copy_Bps
from .cost import COPY_CONTENTION, LOAD_SAFETY, TierCost
from .hashing import TokenIds, as_token_ids
from .match import Loader, PinError, Prefetcher, PrefixMatch


def kv_from_cache(cache: Any, max_tokens: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The per-layer keys and values of a cache, and how many tokens they hold.

    Reads any cache with the layer protocol of transformers' caches (``DynamicCache``, ``StaticCache``,
    kvstream's ``StreamingCache``; nothing here imports transformers): ``cache.layers[i].keys`` and
    ``.values`` are tensors, ``cache.layers[i].get_seq_length()`` (optional) counts the tokens seen.

    Parameters
    ----------
    cache : object
        After ``generate``: ``cache.layers[i].keys`` / ``.values`` are ``[1, kv_heads, seq, head_dim]``
        (``generate`` leaves the KV of every token but the last one it produced).
    max_tokens : int, optional
        Take at most this many tokens (the length of the ids the caller stores).

    Returns
    -------
    keys, values : list of torch.Tensor
        One tensor per layer, as held by the cache (no copy); the first ``n_tokens`` positions are valid
        (a ``StaticCache`` layer holds more slots than tokens).
    n_tokens : int
        ``min(tokens the cache has seen, max_tokens)``.

    Raises
    ------
    ConfigError
        If the cache has no layers, a layer holds no per-token KV (linear-attention or dummy layers), or
        is a sliding-window layer that already dropped tokens (its window is shorter than the sequence):
        a prefix store must hold every token's KV, and those tokens are gone.
    """
    if callable(getattr(cache, "wait_loaded", None)):  # a StreamingCache loaded layer by layer: land it first
        cache.wait_loaded()
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ConfigError(f"{type(cache).__name__} has no layers; expected a transformers DynamicCache after generate")
    keys, values = [], []
    n = None
    for i, layer in enumerate(layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4:
            raise ConfigError(f"Layer {i} ({type(layer).__name__}) holds no [batch, kv_heads, seq, head_dim] KV: the "
                              "cache is empty, or the layer is not an attention layer with a per-token cache")
        held = k.shape[-2]
        seen = int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else held
        if seen > held:
            window = getattr(layer, "sliding_window", None)
            raise ConfigError(f"Layer {i} ({type(layer).__name__}, sliding window {window}) holds the KV of {held} of "
                              f"the {seen} tokens it has seen: it dropped history. A prefix store needs every "
                              f"token's KV; use sequences shorter than the window or a model without sliding windows")
        # a static layer holds max_cache_len slots of which the first ``seen`` are filled
        n = seen if n is None else min(n, seen)
        keys.append(k)
        values.append(v)
    n = int(n or 0)
    if max_tokens is not None:
        n = min(n, int(max_tokens))
    return keys, values, n


def check_kv(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], n_tokens: int) -> KVLayout:
    """Validate per-layer KV holding ``n_tokens`` tokens of one sequence and return its layout.

    Raises
    ------
    LayoutError
        On a mismatch between layers, a batch other than 1, fewer than ``n_tokens`` tokens, or keys and
        values of different head dims (MLA), which the prefix stores' chunk and blob layouts do not hold.
    """
    if len(keys) == 0:
        raise LayoutError("No layers given: keys is empty")
    region = check_hf_layers(keys, values, Region(layers=(0, len(keys)), tokens=(0, n_tokens)))
    if len(region.batch) != 1:
        raise LayoutError(f"Prefix stores hold one sequence: keys have batch {len(region.batch)}, expected 1")
    if values[0].shape[3] != keys[0].shape[3]:
        raise LayoutError(f"Prefix stores hold keys and values of one head_dim; these have {keys[0].shape[3]} and "
                          f"{values[0].shape[3]} (multi-head latent attention): stream the session instead "
                          "(StreamingCache with a transport, then StreamingCache.load)")
    return KVLayout(num_layers=len(keys), kv_heads=len(region.heads), head_dim=int(keys[0].shape[3]),
                    dtype=keys[0].dtype)


class PrefixStore(ABC):
    """Base class of the prefix stores: see the module docstring for the contract.

    Subclasses implement :meth:`lookup`, :meth:`query`, :meth:`update_kv` and :meth:`pinned`; the rest
    is built on them.
    """

    #: Short name for tables and messages.
    name: str = "store"

    def __init__(self) -> None:
        self._closed = False
        #: A fixed :class:`~kvstream.stores.cost.TierCost` for :meth:`read_cost` (``None``: measure it).
        self.tier_cost: TierCost | None = None
        #: This store's host seconds per lookup, as observed (a plan decides from it before looking up).
        self.lookup_cost = HostCost()

    @abstractmethod
    def lookup(self, token_ids: Any, *, max_tokens: int | None = None) -> PrefixMatch:
        """Find and pin the longest stored prefix of ``token_ids`` (at most ``max_tokens`` tokens).

        Parameters
        ----------
        token_ids : tensor or sequence of int
            ``[T]`` or ``[1, T]`` ids of one sequence.
        max_tokens : int, optional
            Cap on the match (``T - 1`` when the caller must still feed one token to ``generate``).

        Returns
        -------
        PrefixMatch
            Pinned, not loaded yet: call :meth:`PrefixMatch.load`, then release it.
        """

    @abstractmethod
    def query(self, token_ids: Any) -> int:
        """Tokens of the longest stored prefix of ``token_ids`` (no pin, nothing loaded).

        The answer may be stale by the time the caller loads; use :meth:`lookup` to hold the match.
        """

    @abstractmethod
    def update_kv(self, token_ids: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                  start: int = 0) -> int:
        """Store the KV of ``token_ids[start:]``.

        Parameters
        ----------
        token_ids : tensor or sequence of int
            The whole sequence ``[T]`` (its first ``start`` tokens are the prefix the new KV follows).
        keys, values : sequence of torch.Tensor
            One tensor per layer, ``[1, kv_heads, S, head_dim]`` with ``S >= T - start``, any device,
            stride 1 on ``head_dim``; position ``j`` holds token ``start + j``.
        start : int
            Tokens of ``token_ids`` whose KV is not given.

        Returns
        -------
        int
            Tokens of ``token_ids[start:]`` the store now holds (stored now or before).

        Raises
        ------
        LayoutError
            Tensors of the wrong shape, or a layout other than the one the store holds.
        CapacityError
            The store cannot hold more (a full disk); nothing partial is visible.
        """

    @abstractmethod
    def pinned(self) -> int:
        """Pins this process currently holds in the store (0 when every match was released)."""

    def update(self, token_ids: Any, cache: Any) -> int:
        """Store the KV a transformers cache holds for ``token_ids``; returns the tokens now stored.

        Parameters
        ----------
        token_ids : tensor or sequence of int
            ``[1, T]`` ids, typically the output of ``generate`` (the cache holds all but the last one,
            so at most ``T - 1`` tokens are stored).
        cache : transformers.DynamicCache or a subclass
            See :func:`kv_from_cache`.

        Examples
        --------
        >>> out = model.generate(ids, cache=cache, max_new_tokens=32)    # doctest: +SKIP
        >>> store.update(out, cache)                                              # doctest: +SKIP
        """
        self._check_open()
        ids = as_token_ids(token_ids)
        keys, values, n = kv_from_cache(cache, len(ids))
        if n == 0:
            return 0
        return self.update_kv(TokenIds(ids[:n]), keys, values)

    def fetch_prefix(self, token_ids: Any, *, device: torch.device | str | None = None,
                     max_tokens: int | None = None) -> PrefixMatch:
        """:meth:`lookup` then :meth:`PrefixMatch.load` onto ``device``: a loaded, still pinned match.

        Use it as a context manager; the pins go when the block ends.
        """
        match = self.lookup(token_ids, max_tokens=max_tokens)
        try:
            match.load(device)
        except BaseException:
            match.release()
            raise
        return match

    def read_cost(self, device: torch.device | str) -> TierCost:
        """What loading from this store onto ``device`` costs: :attr:`tier_cost` if set, else measured.

        The base class holds its KV in host memory: no fetch, the host-to-device copy bandwidth
        (:func:`~kvstream.stores.cost.device_copy_Bps`, measured once per device and cached). Stores that
        must read their bytes first (files) add their measured fetch rate.
        """
        if self.tier_cost is not None:
            return self.tier_cost
        return TierCost(fetch_Bps=None, copy_Bps=device_copy_Bps(torch.device(device)), contention=COPY_CONTENTION,
                        safety=LOAD_SAFETY)

    def close(self) -> None:
        """Release resources. Idempotent; later calls raise ``TransportError``."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{type(self).__name__} is closed")

    def __enter__(self) -> "PrefixStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_max_tokens(max_tokens: int | None, n_ids: int) -> int:
    """The effective cap on a match of a sequence of ``n_ids`` tokens. Raises :class:`ConfigError` if negative."""
    if max_tokens is None:
        return n_ids
    if int(max_tokens) < 0:
        raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
    return min(n_ids, int(max_tokens))


__all__ = ["PinError", "PrefixMatch", "PrefixStore", "Loader", "Prefetcher", "kv_from_cache", "check_kv",
           "check_max_tokens"]
