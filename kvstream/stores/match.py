"""The pinned match a prefix store hands out: :class:`PrefixMatch`, and :class:`PinError`.

A match pins what it found until :meth:`PrefixMatch.release`; it loads once, all at once
(:meth:`~PrefixMatch.load`) or layer by layer (:meth:`~PrefixMatch.load_layers`), the whole prefix or
only its tokens from ``start`` on (the load half of a compute/load split), and a store whose bytes must
be read first can start reading early (:meth:`~PrefixMatch.prefetch`). See :mod:`kvstream.stores.base`
for the contract every store keeps.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch

from ..cuda import Event, Stream
from ..errors import ConfigError, KVStreamError
from .layerwise import LayerLoader, LayerwiseLoad, load_stream


class PinError(KVStreamError, RuntimeError):
    """A pin (reference count) was released twice, or a release would drive a count below zero."""


#: ``loader(device, matched_tokens[, start=s]) -> (packed [L, 2, 1, H, m - s, D], event or None)``: the KV of
#: tokens ``[s, m)``, ``m <= matched_tokens`` (a shortened read). ``start`` is passed only when not 0, so a
#: loader without it loads whole matches.
Loader = Callable[..., "tuple[torch.Tensor, Any]"]
#: ``prefetcher(start)``: begin reading tokens ``[start, matched)`` into host memory; returns at once.
Prefetcher = Callable[[int], None]


class PrefixMatch:
    """The longest stored prefix of a sequence, pinned in its store until :meth:`release`.

    Returned by :meth:`PrefixStore.lookup` and :meth:`PrefixStore.fetch_prefix`; use it as a context
    manager so the pins are always released.

    Attributes
    ----------
    matched_tokens : int
        Tokens of the prefix whose KV the store holds (after :meth:`load`: whose KV was read intact).
    start : int
        First token loaded (``load(start=...)``; 0: the whole prefix).
    keys, values : list of torch.Tensor or None
        After :meth:`load`: one ``[1, kv_heads, matched_tokens - start, head_dim]`` tensor per layer, views
        of :attr:`packed` (``None`` before).
    packed : torch.Tensor or None
        After :meth:`load`: ``[layers, 2, 1, kv_heads, matched_tokens - start, head_dim]`` on the load
        device. (:meth:`load_layers` returns its tensors in a :class:`LayerwiseLoad` and leaves these ``None``.)
    store : PrefixStore or None
        The store (tier) whose data the match pins; its ``read_cost(device)`` prices a load
        (:mod:`kvstream.stores.cost`).
    granularity : int
        A partial load's ``start`` must be a multiple of it (a file store's chunk size; 1 otherwise).
    bytes_per_token : int or None
        Bytes of the stored KV per token over all layers, when the store knows them.

    Examples
    --------
    >>> with store.fetch_prefix(input_ids, device="cuda", max_tokens=T - 1) as match:   # doctest: +SKIP
    ...     for i in range(len(match.keys)):
    ...         cache.update(match.keys[i], match.values[i], i)
    """

    def __init__(self, matched_tokens: int, loader: Loader | None, releaser: Callable[[], None] | None,
                 *, source: str = "store", layer_loader: LayerLoader | None = None,
                 prefetcher: Prefetcher | None = None, store: Any = None, granularity: int = 1,
                 bytes_per_token: int | None = None, pinner: Callable[["PrefixMatch"], None] | None = None):
        self.matched_tokens = int(matched_tokens)
        self._pinner = pinner
        self.start = 0
        self.store = store
        self.granularity = max(1, int(granularity))
        self.bytes_per_token = bytes_per_token
        self._prefetcher = prefetcher
        self._prefetched: int | None = None
        self._after: list[Callable[[], None]] = []
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

    @property
    def pinned(self) -> bool:
        """Whether the match holds its pins (a lookup with ``defer_pins=True`` takes them on first use)."""
        return self._pinner is None and not self._released

    def pin(self) -> None:
        """Take the pins a lookup with ``defer_pins=True`` left for later; a no-op when held.

        :meth:`prefetch`, :meth:`load` and :meth:`load_layers` call it first. A deferred match's data
        may go (a GC, an eviction) between the lookup and its pin; its load is then shortened as for any
        missing chunk: wrong KV is never returned.

        Raises
        ------
        PinError
            If the match was already released.
        """
        if self._released:
            raise PinError(f"{self._source}: pin() after release(); look the prefix up again")
        pinner, self._pinner = self._pinner, None
        if pinner is not None:
            pinner(self)

    def _check_start(self, start: int) -> int:
        start = int(start)
        if not 0 <= start <= self.matched_tokens or start % self.granularity:
            raise ConfigError(f"{self._source}: start={start} must be a multiple of {self.granularity} in "
                              f"[0, {self.matched_tokens}]")
        if self._prefetched is not None and self._prefetched != start:
            raise ConfigError(f"{self._source}: prefetched from token {self._prefetched}, loading from {start}")
        return start

    def prefetch(self, start: int = 0) -> None:
        """Begin reading tokens ``[start, matched_tokens)`` into host memory; returns at once.

        For a tier whose bytes must first be read (a file store: parallel reads of every chunk file on the
        transport's threads), so that the reads overlap whatever the caller does next (the compute half of
        a compute/load split). A store that already holds its KV in host memory does nothing. The next
        :meth:`load` or :meth:`load_layers` (with the same ``start``) uses what was read.

        Raises
        ------
        PinError
            If the match was already released.
        ConfigError
            If ``start`` is not a multiple of :attr:`granularity` in ``[0, matched_tokens]``, or differs from
            an earlier prefetch's.
        """
        if self._released:
            raise PinError(f"{self._source}: prefetch() after release(); look the prefix up again")
        start = self._check_start(start)
        self.pin()
        if self._prefetched is None:
            self._prefetched = start
            if self._prefetcher is not None and start < self.matched_tokens:
                self._prefetcher(start)

    def _call(self, fn: Callable, *args: Any, start: int) -> Any:
        return fn(*args, start=start) if start else fn(*args)

    def load(self, device: torch.device | str | None = None, *,
             start: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Read the matched KV of tokens ``[start, matched_tokens)`` onto ``device`` (default: CPU) and return
        ``(keys, values)``.

        A chunk found missing or corrupt shortens :attr:`matched_tokens` to the intact prefix before it
        (never below ``start``). Copies to a CUDA device are enqueued on the current stream; :meth:`release`
        waits for them before unpinning the host memory they read.

        Raises
        ------
        PinError
            If the match was already released (its data may be gone).
        ConfigError
            If it was already loaded, or for a bad ``start`` (see :meth:`prefetch`).
        """
        if self._released:
            raise PinError(f"{self._source}: load() after release(); look the prefix up again")
        if self._layerwise:
            raise ConfigError(f"{self._source}: this match was loaded layer-wise; a match is loaded once")
        start = self._check_start(start)
        self.pin()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.start = start
        if self.matched_tokens == start or self._loader is None:
            self.matched_tokens = start if self._loader is not None else 0
            self.keys, self.values, self.packed = [], [], None
            return self.keys, self.values
        packed, event = self._call(self._loader, device, self.matched_tokens, start=start)
        self._event = event
        self.packed = packed
        self.matched_tokens = start + int(packed.shape[4])
        if self.matched_tokens == start:
            self.keys, self.values = [], []
        else:
            self.keys = [packed[i, 0] for i in range(packed.shape[0])]
            self.values = [packed[i, 1] for i in range(packed.shape[0])]
        return self.keys, self.values

    def load_layers(self, device: torch.device | str | None = None, *,
                    stream: "Stream | torch.cuda.Stream | None" = None, start: int = 0) -> LayerwiseLoad:
        """Start loading the matched KV onto ``device`` layer by layer; returns before the copies finish.

        ``start`` loads tokens ``[start, matched_tokens)`` only (the load's ``start``), as :meth:`load`.
        A store whose bytes must be read first (:class:`~kvstream.stores.chunk_file.ChunkFileStore`) reads
        and verifies them all before this returns (after :meth:`prefetch`, only what is left), so that a
        corrupt chunk shortens the match before the model sees any layer; the copies onto the device then
        run layer by layer as here.

        On a CUDA device, the copies go to ``stream`` after the work already enqueued on the current
        stream, layer 0 first, each layer followed by its event (:func:`~.layerwise.enqueue_layers`);
        prefill of layer ``l`` needs only ``events[l]``. A store that cannot load layer by layer (chunk
        files written without per-layer checksums) loads synchronously on the current stream through
        :meth:`load` and returns one event, recorded after it, for every layer. On the CPU everything is
        synchronous and the events are inert.

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
        start = self._check_start(start)
        self.pin()
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        side = load_stream(device, stream)
        if self._layer_loader is None or self.matched_tokens == start:
            keys, values = self.load(device, start=start)
            self.keys = self.values = self.packed = None  # the caller owns them; don't hold the memory
            self._layerwise = True
            done = Event(device).record()  # after load()'s copies on the current stream (inert on the CPU)
            return LayerwiseLoad(keys, values, [done] * len(keys), self.matched_tokens, start=start)
        self._layerwise = True
        self.start = start
        result, hold = self._call(self._layer_loader, device, self.matched_tokens, side, start=start)
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
            unpinned = self._pinner is not None  # deferred pins never taken: nothing to give back
            self._pinner = None
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        self._hold = None  # a layer-wise load's tensors and staging: no copy writes or reads them any more
        if self._releaser is not None and not unpinned:
            self._releaser()
        for fn in self._after:
            fn()

    def after_release(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once the match is released (after its pins: a tiered store promotes the prefix then)."""
        self._after.append(fn)

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



__all__ = ["PinError", "PrefixMatch", "Loader", "Prefetcher"]
