"""The Hugging Face ``generate`` hook: :class:`~kvstream.integrations.hf.cache.StreamingCache` streams a
``DynamicCache``'s KV as the model runs, :class:`~kvstream.integrations.hf.static.StreamingStaticCache` a
``StaticCache``'s (compiled too); :mod:`.offload` keeps most layers in pinned host memory;
:mod:`.prefix` fills a cache from a prefix store."""

from .cache import MANIFEST_FORMAT, StreamingCache
from .keywords import cache_keyword, cache_kwargs
from .static import StreamingStaticCache

__all__ = ["StreamingCache", "StreamingStaticCache", "MANIFEST_FORMAT", "cache_keyword", "cache_kwargs"]
