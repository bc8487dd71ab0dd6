"""Tiers of prefix stores, fastest first: host memory in front of files (SGLang HiCache's GPU -> host -> storage).

:class:`TieredStore` is a :class:`~kvstream.stores.base.PrefixStore` over a list of stores, for example
``TieredStore([RadixStore(...), ChunkFileStore(...)])``:

* **Lookups go down the tiers.** Every tier is looked up (and pinned) from the top, unless an unpinned
  ``query`` shows it cannot beat the match in hand; the longest match wins, the upper tier on a tie,
  and the others are released at once. The match is the winning tier's
  own :class:`~kvstream.stores.match.PrefixMatch` (its pins, its loads, ``match.store`` its tier, whose
  ``read_cost`` prices it), so every guarantee of that tier holds unchanged.
* **Hot prefixes move up.** A match that came from a lower tier is promoted after it is released, at
  the next boundary (the next update, :meth:`TieredStore.promote_queued`, :meth:`~TieredStore.wait`), so
  never before that request's first token: a background thread reads it from that tier into host memory
  and stores it in every tier above (``promote=False`` turns this off). An upper-tier hit does no
  promotion work and, with a cost plan's ``consider``, no lower-tier I/O.
* **Writes** go *write-through* (``write="through"``: every tier, at once) or *write-back*
  (``write="back"``: the top tier only; a tier's leaf is written to the tiers below it just before its
  eviction, HiCache's write-back policy). An upper tier that cannot take all of an update passes the
  rest straight down, so nothing written is lost.
* **Eviction never loses what the lower tier keeps.** In write-back, an upper tier evicts a prefix only
  after the tiers below took it (:attr:`RadixStore.on_evict <kvstream.stores.radix.RadixStore.on_evict>`);
  if they cannot (a full disk), it keeps it. A lower :class:`~kvstream.stores.chunk_file.ChunkFileStore`
  holds whole chunks only: a trailing partial chunk is recomputed, as with the file store alone.
  Eviction by another process sharing the upper tier (``shared_name``) demotes nothing.
"""

from __future__ import annotations

import inspect
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from .base import PrefixMatch, PrefixStore, check_max_tokens
from .cost import TierCost
from .hashing import TokenIds, as_token_ids

logger = logging.getLogger(__name__)

#: Write policies (SGLang HiCache's names).
WRITE_POLICIES = ("through", "back")


class TieredStore(PrefixStore):
    """Prefix stores in tiers, fastest first; see the module docstring.

    Parameters
    ----------
    tiers : sequence of PrefixStore
        At least one, fastest first; all hold the same model's KV. The tiered store owns them
        (:meth:`close` closes them).
    write : {"through", "back"}
        Write every tier at once, or the top one only and lower tiers on eviction (every tier but the last
        must then be able to report evictions: a :class:`~kvstream.stores.radix.RadixStore`).
    promote : bool
        Copy a prefix found only in a lower tier into the tiers above it, in the background, once its match
        is released.

    Raises
    ------
    ConfigError
        No tiers, a tier that is not an open PrefixStore or is given twice, an unknown write policy, or
        write-back over a tier that cannot report evictions.

    Examples
    --------
    >>> store = TieredStore([RadixStore(capacity_bytes=8 << 30), ChunkFileStore("/mnt/kv")], write="back")  # doctest: +SKIP
    >>> cache = StreamingCache.from_prefix(store, ids, config=model.config, device="cuda")   # doctest: +SKIP
    """

    name = "tiered"

    def __init__(self, tiers: Sequence[PrefixStore], *, write: str = "through", promote: bool = True):
        super().__init__()
        tiers = list(tiers)
        if not tiers:
            raise ConfigError("TieredStore needs at least one tier")
        for t in tiers:
            if not isinstance(t, PrefixStore) or t.closed:
                raise ConfigError(f"TieredStore tiers must be open PrefixStores, got {t!r}")
        if len({id(t) for t in tiers}) != len(tiers):
            raise ConfigError("TieredStore: a store is given as two tiers")
        if write not in WRITE_POLICIES:
            raise ConfigError(f"TieredStore write must be one of {WRITE_POLICIES}, got {write!r}")
        if write == "back":
            for i, t in enumerate(tiers[:-1]):
                if not hasattr(t, "on_evict"):
                    raise ConfigError(f"TieredStore(write='back'): tier {i} ({type(t).__name__}) cannot report "
                                      "evictions; write-back needs a RadixStore above the last tier")
                t.on_evict = self._demoter(i)
        self.tiers = tiers
        self.write = write
        self.promote = bool(promote)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvstream-tier-promote")
        self._pending: list[Future] = []
        self._queued: list[tuple[list[int], int]] = []  # promotions waiting for a boundary (not yet started)
        self._lock = threading.Lock()

    # -- lookups -----------------------------------------------------------------------------------------
    def lookup(self, token_ids: Any, *, max_tokens: int | None = None, defer_pins: bool = False,
               consider: Callable[[PrefixStore, PrefixMatch | None], bool] | None = None) -> PrefixMatch:
        """The longest match over the tiers, pinned in its tier; see the module docstring.

        Parameters
        ----------
        defer_pins : bool
            Passed to tiers that take it (:meth:`ChunkFileStore.lookup
            <kvstream.stores.chunk_file.ChunkFileStore.lookup>`): pins wait for the match's first use.
        consider : callable, optional
            ``consider(tier, match_in_hand) -> bool`` (``None`` before any match), asked before a tier is
            touched at all (no query, no lookup): ``False`` skips it. A cost plan passes one that refuses a tier which could not beat
            the match in hand even if it held the whole prompt (so an upper-tier hit costs no lower-tier
            I/O). Default: every tier that might hold a longer match is asked.
        """
        self._check_open()
        ids = as_token_ids(token_ids)
        cap = check_max_tokens(max_tokens, len(ids))
        best, best_tier = None, 0
        for i, tier in enumerate(self.tiers):
            if consider is not None and not consider(tier, best):
                continue
            held = 0 if best is None else best.matched_tokens
            if best is not None and min(tier.query(ids), cap) <= held:
                continue  # this tier cannot beat the match in hand: no pin, no load
            m = _lookup(tier, ids, cap, defer_pins)
            if best is None or m.matched_tokens > best.matched_tokens:
                if best is not None:
                    best.release()
                best, best_tier = m, i
            else:
                m.release()
            if best.matched_tokens >= cap:
                break
        if best is None:
            best = PrefixMatch(0, None, None, source="TieredStore")
        if best_tier > 0 and self.promote and best.matched_tokens > 0:
            prefix = TokenIds(ids[:best.matched_tokens])
            best.after_release(lambda: self._queue(prefix, best_tier))
        return best

    def query(self, token_ids: Any) -> int:
        """Tokens of the longest prefix any tier holds (no pin, nothing loaded)."""
        self._check_open()
        ids = as_token_ids(token_ids)
        return max(t.query(ids) for t in self.tiers)

    def read_cost(self, device: torch.device | str) -> TierCost:
        """The top tier's cost (:attr:`tier_cost` if set); a match prices its own tier (``match.store``)."""
        return self.tier_cost if self.tier_cost is not None else self.tiers[0].read_cost(device)

    def pinned(self) -> int:
        """Pins this process holds, over every tier."""
        return sum(t.pinned() for t in self.tiers)

    # -- writes ------------------------------------------------------------------------------------------
    def update_kv(self, token_ids: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                  start: int = 0) -> int:
        """Store the KV of ``token_ids[start:]`` by the write policy; returns the most tokens any tier now holds.

        A :class:`~kvstream.stores.chunk_file.ChunkFileStore` tier takes the chunks that start at or after
        ``start`` (its chunk boundaries); the chunk ``start`` falls inside must already be stored there.
        """
        self._check_open()
        self.promote_queued()
        ids = as_token_ids(token_ids)
        stored = [_write(self.tiers[0], ids, keys, values, start)]
        for tier in self.tiers[1:]:
            if self.write == "back" and stored[-1] >= len(ids) - start:
                break  # the upper tier took it all; lower tiers get it on eviction
            stored.append(_write(tier, ids, keys, values, start))
        return max(stored)

    def _demoter(self, i: int):
        def demote(ids: list[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
            """Write a sequence tier ``i`` is about to evict into the tiers below it (raises: keep it)."""
            for tier in self.tiers[i + 1:]:
                tier.update_kv(ids, keys, values)
        return demote

    def _promote(self, ids: list[int], tier: int) -> None:
        """Read ``ids`` (a prefix tier ``tier`` matched) into host memory and store it in every tier above."""
        upper = self.tiers[:tier]
        if all(t.query(ids) >= len(ids) for t in upper):
            return
        with self.tiers[tier].fetch_prefix(ids, device="cpu") as m:
            if m.matched_tokens == 0:
                return
            for t in upper:
                _write(t, TokenIds(ids[:m.matched_tokens]), m.keys, m.values, 0)

    def _queue(self, ids: list[int], tier: int) -> None:
        """A lower-tier match was released: promote its prefix at the next boundary (never before that
        request's first token)."""
        with self._lock:
            if not self._closed:
                self._queued.append((ids, tier))

    def promote_queued(self) -> None:
        """Start the promotions queued since the last boundary on the background thread; returns at once.

        Called at the boundaries (:meth:`update_kv`, :meth:`wait`, :meth:`close`); a server that does not
        store each turn's KV calls it between requests.
        """
        with self._lock:
            queued, self._queued = self._queued, []
        for ids, tier in queued:
            self._submit(self._promote, ids, tier)

    def _submit(self, fn, *args) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._worker.submit(self._logged, fn, *args))

    @staticmethod
    def _logged(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a failed promotion only means the prefix stays where it was
            logger.exception("TieredStore: promoting a prefix failed")

    def wait(self) -> None:
        """Start the queued promotions and block until every promotion so far is done."""
        self.promote_queued()
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.result()

    def close(self) -> None:
        """Finish the promotions in flight, unhook and close every tier. Idempotent."""
        self.promote_queued()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._worker.shutdown(wait=True)
        for t in self.tiers:
            if self.write == "back" and hasattr(t, "on_evict"):
                t.on_evict = None
            t.close()
        super().close()


def _lookup(tier: PrefixStore, ids: list[int], cap: int, defer_pins: bool) -> PrefixMatch:
    """``tier.lookup``, with deferred pins where the tier takes them."""
    if defer_pins and "defer_pins" in inspect.signature(type(tier).lookup).parameters:
        return tier.lookup(ids, max_tokens=cap, defer_pins=True)
    return tier.lookup(ids, max_tokens=cap)


def _write(tier: PrefixStore, ids: list[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
           start: int) -> int:
    """``tier.update_kv`` of ``ids[start:]``, from the tier's next chunk boundary for a chunked tier."""
    chunk = getattr(tier, "chunk_tokens", 1)
    aligned = -(-start // chunk) * chunk
    if aligned >= len(ids):
        return 0
    skip = aligned - start
    held = tier.update_kv(ids, [k[:, :, skip:] for k in keys], [v[:, :, skip:] for v in values], start=aligned)
    return held + skip if held else 0


__all__ = ["TieredStore", "WRITE_POLICIES"]
