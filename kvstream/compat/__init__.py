"""Compatibility layers: other systems' APIs on kvstream's stores.

* :mod:`kvstream.compat.vineyard` — Vineyard's LLM KV-cache API (``KVCache``, ``KVTensor``,
  ``FileCacheConfig``, ``VineyardCacheConfig``) on the radix and chunk-file prefix stores.
"""
