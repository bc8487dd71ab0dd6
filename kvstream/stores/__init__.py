"""Prefix stores: keep the KV of token sequences and hand back the longest stored prefix (multi-turn reuse).

* :class:`~kvstream.stores.radix.RadixStore` — a radix tree over token ids whose nodes own KV in
  (pinned) host memory; LRU eviction past a byte capacity; optionally shared between the processes of
  one host through shared memory.
* :class:`~kvstream.stores.chunk_file.ChunkFileStore` — fixed token chunks as checksummed files named
  by chained prefix hashes, on local disk or a shared filesystem; TTL garbage collection.
* :class:`~kvstream.stores.tiered.TieredStore` — stores in tiers (host memory in front of files):
  lookups down the tiers, promotion up, write-through or write-back.

:mod:`kvstream.stores.cost` prices a load against recomputing (measured tier and prefill costs, the
compute/load split).

Both stores implement :class:`~kvstream.stores.base.PrefixStore`: ``query``, ``lookup`` (a pinned
:class:`~kvstream.stores.match.PrefixMatch`, loaded at once or layer by layer as a
:class:`~kvstream.stores.layerwise.LayerwiseLoad`), ``fetch_prefix``, ``update`` and ``update_kv``.
"""

from __future__ import annotations

from .base import PinError, PrefixMatch, PrefixStore, kv_from_cache
from .chunk_file import ChunkFileStore
from .hashing import as_token_ids, nested_path, prefix_hashes
from .cost import PrefillTime, ReusePlan, TierCost, plan_reuse
from .layerwise import LayerwiseLoad
from .radix import RadixStore
from .tiered import TieredStore

__all__ = ["PrefixStore", "PrefixMatch", "LayerwiseLoad", "PinError", "RadixStore", "ChunkFileStore", "TieredStore",
           "kv_from_cache", "prefix_hashes", "nested_path", "as_token_ids", "TierCost", "PrefillTime", "ReusePlan",
           "plan_reuse"]
