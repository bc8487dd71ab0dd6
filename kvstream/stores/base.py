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
"""

from __future__ import annotations

import threading
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, KVStreamError, LayoutError, TransportError
from ..layout import KVLayout, Region, check_hf_layers
from ..cuda import Event, Stream
from .hashing import as_token_ids
from .layerwise import LayerLoader, LayerwiseLoad, load_stream


class PinError(KVStreamError, RuntimeError):
    """A pin (reference count) was released twice, or a release would drive a count below zero."""


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
        On a mismatch between layers, a batch other than 1, or fewer than ``n_tokens`` tokens.
    """
    if len(keys) == 0:
        raise LayoutError("No layers given: keys is empty")
    region = check_hf_layers(keys, values, Region(layers=(0, len(keys)), tokens=(0, n_tokens)))
    if len(region.batch) != 1:
        raise LayoutError(f"Prefix stores hold one sequence: keys have batch {len(region.batch)}, expected 1")
    return KVLayout(num_layers=len(keys), kv_heads=len(region.heads), head_dim=int(keys[0].shape[3]),
                    dtype=keys[0].dtype)


#: ``loader(device, matched_tokens) -> (packed [L, 2, 1, H, m, D], event or None)``; ``m <= matched_tokens``.
Loader = Callable[[torch.device, int], "tuple[torch.Tensor, Any]"]


class PrefixMatch:
    """The longest stored prefix of a sequence, pinned in its store until :meth:`release`.

    Returned by :meth:`PrefixStore.lookup` and :meth:`PrefixStore.fetch_prefix`; use it as a context
    manager so the pins are always released.

    Attributes
    ----------
    matched_tokens : int
        Tokens of the prefix whose KV the store holds (after :meth:`load`: whose KV was read intact).
    keys, values : list of torch.Tensor or None
        After :meth:`load`: one ``[1, kv_heads, matched_tokens, head_dim]`` tensor per layer, views of
        :attr:`packed` (``None`` before).
    packed : torch.Tensor or None
        After :meth:`load`: ``[layers, 2, 1, kv_heads, matched_tokens, head_dim]`` on the load device.
        (:meth:`load_layers` returns its tensors in a :class:`LayerwiseLoad` and leaves these ``None``.)

    Examples
    --------
    >>> with store.fetch_prefix(input_ids, device="cuda", max_tokens=T - 1) as match:   # doctest: +SKIP
    ...     for i in range(len(match.keys)):
    ...         cache.update(match.keys[i], match.values[i], i)
    """

    def __init__(self, matched_tokens: int, loader: Loader | None, releaser: Callable[[], None] | None,
                 *, source: str = "store", layer_loader: LayerLoader | None = None):
        self.matched_tokens = int(matched_tokens)
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.packed: torch.Tensor | None = None
        self._loader = loader
        self._layer_loader = layer_loader
        self._releaser = releaser
        self._event = None
        self._layerwise = False
        self._hold: Any = None
        self._released = False
        self._source = source
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        """Whether the pins were released."""
        return self._released

    def load(self, device: torch.device | str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Read the matched KV onto ``device`` (default: CPU) and return ``(keys, values)``.

        A chunk found missing or corrupt shortens :attr:`matched_tokens` to the intact prefix before it.
        Copies to a CUDA device are enqueued on the current stream; :meth:`release` waits for them
        before unpinning the host memory they read.

        Raises
        ------
        PinError
            If the match was already released (its data may be gone).
        """
        if self._released:
            raise PinError(f"{self._source}: load() after release(); look the prefix up again")
        if self._layerwise:
            raise ConfigError(f"{self._source}: this match was loaded layer-wise; a match is loaded once")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.matched_tokens == 0 or self._loader is None:
            self.matched_tokens = 0
            self.keys, self.values, self.packed = [], [], None
            return self.keys, self.values
        packed, event = self._loader(device, self.matched_tokens)
        self._event = event
        self.packed = packed
        self.matched_tokens = int(packed.shape[4])
        if self.matched_tokens == 0:
            self.keys, self.values = [], []
        else:
            self.keys = [packed[i, 0] for i in range(packed.shape[0])]
            self.values = [packed[i, 1] for i in range(packed.shape[0])]
        return self.keys, self.values

    def load_layers(self, device: torch.device | str | None = None, *,
                    stream: "Stream | torch.cuda.Stream | None" = None) -> LayerwiseLoad:
        """Start loading the matched KV onto ``device`` layer by layer; returns before the copies finish.

        On a CUDA device, the copies go to ``stream`` after the work already enqueued on the current
        stream, layer 0 first, each layer followed by its event (:func:`~.layerwise.enqueue_layers`);
        prefill of layer ``l`` needs only ``events[l]``. A store that cannot load layer by layer
        (:class:`~kvstream.stores.chunk_file.ChunkFileStore` reads whole chunk files) loads synchronously
        on the current stream through :meth:`load` and returns one event, recorded after it, for every
        layer. On the CPU everything is synchronous and the events are inert.

        Keep the match until the load is consumed: :meth:`release` blocks the host until the last
        layer has landed, then unpins the host memory the copies read. Until then the match also holds
        the returned load (so no layer's memory is reused while it is written); take each layer with
        :meth:`LayerwiseLoad.take` to let layers go one by one.

        Parameters
        ----------
        device : torch.device or str, optional
            Where the KV goes (default: CPU).
        stream : kvstream.cuda.Stream or torch.cuda.Stream, optional
            The side stream of ``device`` for the copies; default: the process-wide side stream
            ``side_stream(device, "kvstream-prefix")``. Ignored on the CPU.

        Returns
        -------
        LayerwiseLoad
            Per-layer ``keys``/``values`` ``[1, kv_heads, matched_tokens, head_dim]``, per-layer ``events``
            and ``matched_tokens`` (which also updates :attr:`matched_tokens`). Empty when nothing matched.

        Raises
        ------
        PinError
            If the match was already released.
        ConfigError
            If the match was already loaded, or ``stream`` belongs to another device.
        TypeError
            If ``stream`` is not a stream.

        Examples
        --------
        >>> with store.lookup(ids, max_tokens=T - 1) as match:                          # doctest: +SKIP
        ...     load = match.load_layers("cuda", stream=side_stream("cuda", "kvstream-prefix"))
        ...     for l in range(len(load)):
        ...         k, v = load.take(l)
        ...         cache.update(k, v, l)
        """
        if self._released:
            raise PinError(f"{self._source}: load_layers() after release(); look the prefix up again")
        if self._layerwise or self.packed is not None or self.keys is not None:
            raise ConfigError(f"{self._source}: this match was already loaded; a match is loaded once")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        side = load_stream(device, stream)
        if self._layer_loader is None or self.matched_tokens == 0:
            keys, values = self.load(device)
            self.keys = self.values = self.packed = None  # the caller owns them; don't hold the memory
            self._layerwise = True
            done = Event(device).record()  # after load()'s copies on the current stream (inert on the CPU)
            return LayerwiseLoad(keys, values, [done] * len(keys), self.matched_tokens)
        self._layerwise = True
        result, hold = self._layer_loader(device, self.matched_tokens, side)
        if result.events:
            self._event = result.events[-1]  # one stream, layers in order: the last one implies all
        self._hold = (result, hold)
        self.matched_tokens = result.matched_tokens
        return result

    def release(self) -> None:
        """Unpin what the match holds (after any in-flight copy from it has finished).

        After :meth:`load_layers` this blocks the host until the last layer's copy has landed; call it
        once the load was consumed (for ``generate``: after the first forward has enqueued every layer).

        Raises
        ------
        PinError
            On a second call: pins are counted and never go negative.
        """
        with self._lock:
            if self._released:
                raise PinError(f"{self._source}: match of {self.matched_tokens} tokens released twice")
            self._released = True
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        self._hold = None  # a layer-wise load's tensors and staging: no copy writes or reads them any more
        if self._releaser is not None:
            self._releaser()

    def __enter__(self) -> "PrefixMatch":
        return self

    def __exit__(self, *exc) -> None:
        if not self._released:
            self.release()

    def __del__(self):  # pragma: no cover - exercised through gc in tests, timing varies
        if not getattr(self, "_released", True):
            warnings.warn(f"{self._source}: a PrefixMatch was garbage-collected without release(); releasing its pins",
                          ResourceWarning, stacklevel=2)
            try:
                self.release()
            except Exception:  # noqa: BLE001 - a finalizer must not raise
                pass

    def __repr__(self) -> str:
        state = ("released" if self._released else "loaded" if self.packed is not None or self._layerwise
                 else "pinned")
        return f"PrefixMatch(matched_tokens={self.matched_tokens}, {state})"


class PrefixStore(ABC):
    """Base class of the prefix stores: see the module docstring for the contract.

    Subclasses implement :meth:`lookup`, :meth:`query`, :meth:`update_kv` and :meth:`pinned`; the rest
    is built on them.
    """

    #: Short name for tables and messages.
    name: str = "store"

    def __init__(self) -> None:
        self._closed = False

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
        return self.update_kv(ids[:n], keys, values)

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


__all__ = ["PinError", "PrefixMatch", "PrefixStore", "kv_from_cache", "check_kv", "check_max_tokens"]
