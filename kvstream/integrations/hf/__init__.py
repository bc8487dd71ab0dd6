"""The Hugging Face ``generate`` hook: :class:`~kvstream.integrations.hf.cache.StreamingCache` streams a
``DynamicCache``'s KV as the model runs; :mod:`.offload` keeps most layers in pinned host memory;
:mod:`.prefix` fills a cache from a prefix store."""

from .cache import MANIFEST_FORMAT, StreamingCache

__all__ = ["StreamingCache", "MANIFEST_FORMAT"]
