"""Vineyard's LLM KV-cache API (``vineyard.llm``) on kvstream's prefix stores; no ``vineyardd`` needed.

Code written for Vineyard's Python API runs with its imports changed to this module::

    from kvstream.compat.vineyard import KVCache, KVTensor, FileCacheConfig, VineyardCacheConfig

* :class:`VineyardCacheConfig` maps to :class:`~kvstream.stores.radix.RadixStore` (host memory, radix
  tree, LRU). Its socket, block size, sync interval and object names are accepted and recorded; there is
  no server. ``shared=True`` (a kvstream extra) shares the store between the processes of one host
  under ``llm_cache_object_name``, as Vineyard's named objects are shared.
* A list of configs (a kvstream extra), fastest first, makes the stores tiers of one
  :class:`~kvstream.stores.tiered.TieredStore` (host memory in front of files; ``tier_write=``).
* :class:`FileCacheConfig` maps to :class:`~kvstream.stores.chunk_file.ChunkFileStore` (``chunk_size``
  tokens per file, ``hash_chunk_size`` — ``split_number`` in older releases — hex digits per
  directory level, two levels, ``root``, ``gc_interval`` and ``ttl`` in seconds).
* :class:`KVTensor` is ``(ptr, nbytes)``: raw memory of one token's K or V of one layer (a raw pointer,
  as in Vineyard: what can be checked is, the rest is the caller's promise; see :class:`KVTensor`). It exposes the
  buffer protocol on every Python version (it is a ``ctypes`` array), so ``np.frombuffer(t)`` works on
  Python 3.11 too, where a Python class cannot define ``__buffer__``. For ``KVTensor(0, 0)`` entries,
  :meth:`KVCache.query` fills memory the tensor owns (Vineyard points them at its blobs; here the bytes
  are copied, so they stay valid however the store evicts); entries with a pointer receive a copy there.
* ``kv_cache_list[i][j] = (k, v)`` is token ``i``, layer ``j``, as in Vineyard. The KV is stored as
  ``uint8`` tensors of ``tensor_nbytes`` per token and layer: Vineyard does not know dtypes either.

Source of the API: v6d ``python/vineyard/llm/cache.py`` and the Vineyard LLM KV-cache document.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ConfigError, LayoutError
from ..stores.chunk_file import ChunkFileStore
from ..stores.radix import RadixStore
from ..stores.tiered import TieredStore

#: Lowest address a KVTensor may point at: Linux maps nothing below ``vm.mmap_min_addr`` (65536 by default),
#: so a smaller non-zero pointer is a bug (a length or an offset passed as the pointer), never memory.
MIN_ADDRESS = 1 << 16
#: One past the highest address of this process's pointer width.
ADDRESS_LIMIT = 1 << (8 * ctypes.sizeof(ctypes.c_void_p))


class KVTensor(ctypes.Array):
    """``nbytes`` bytes of raw memory at ``ptr``: one token's K or V of one layer (Vineyard's ``KVTensor``).

    ``KVTensor(ptr, nbytes)`` views memory the caller owns and must keep alive; ``KVTensor(0, 0)`` is an
    empty slot that :meth:`KVCache.query` fills with memory the tensor owns. Either way the tensor has the
    buffer protocol (``np.frombuffer(t, dtype=...)``, ``memoryview(t)``, ``torch.frombuffer(t, ...)``).

    A raw pointer is trusted as far as it must be (Vineyard's semantics). Checked: a null-page pointer
    (``0 < ptr <`` :data:`MIN_ADDRESS`), a range past the address space, values too large for a C pointer or
    size, and (by :class:`KVCache`, before any byte moves) ``nbytes`` against the cache's ``tensor_nbytes``.
    **Not checkable**: that ``ptr`` points at live memory of at least ``nbytes`` bytes. A dangling pointer
    (freed or unmapped memory) or a buffer shorter than ``nbytes`` makes :meth:`KVCache.update` copy
    whatever lies there into the cache and :meth:`KVCache.query` overwrite it, or crash the process
    (``SIGSEGV``). Keep the owner (the ndarray, the tensor) alive while the KVTensor is used.

    Parameters
    ----------
    ptr : int
        Address of the bytes (``ndarray.ctypes.data``, ``tensor.data_ptr()`` of a CPU tensor), or 0.
    nbytes : int
        Their size in bytes.

    Raises
    ------
    ConfigError
        A negative, non-integer or too large ``ptr`` or ``nbytes``, a pointer into the null page, or a
        range that wraps past the end of the address space.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(4, dtype=np.float32)
    >>> np.frombuffer(KVTensor(a.ctypes.data, a.nbytes), dtype=np.float32).tolist()
    [0.0, 1.0, 2.0, 3.0]
    """

    _type_ = ctypes.c_ubyte
    _length_ = 0

    def __new__(cls, ptr: int = 0, nbytes: int = 0):
        try:
            ptr, nbytes = int(ptr), int(nbytes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"KVTensor needs integer ptr and nbytes, got ptr={ptr!r}, nbytes={nbytes!r}") from e
        if nbytes < 0 or ptr < 0:
            raise ConfigError(f"KVTensor needs ptr >= 0 and nbytes >= 0, got ptr={ptr}, nbytes={nbytes}")
        if 0 < ptr < MIN_ADDRESS:
            raise ConfigError(f"KVTensor ptr={ptr:#x} points into the null page (below {MIN_ADDRESS:#x}), where no "
                              "memory is ever mapped: pass an address such as ndarray.ctypes.data, or 0 for an "
                              "empty slot")
        if ptr + nbytes > ADDRESS_LIMIT:
            raise ConfigError(f"KVTensor ptr={ptr:#x} with nbytes={nbytes} runs past the end of the address space")
        try:
            if ptr:
                obj = _sized(nbytes).from_address(ptr)  # a view of the caller's memory
                obj._filled = True
            else:
                obj = ctypes.Array.__new__(_sized(nbytes))  # zeroed memory the tensor owns
                obj._filled = False
        except OverflowError as e:
            raise ConfigError(f"KVTensor nbytes={nbytes} is too large for this platform: {e}") from None
        return obj

    def __init__(self, ptr: int = 0, nbytes: int = 0):  # the fields were set by __new__
        pass

    @property
    def ptr(self) -> int:
        """Address of the bytes; 0 for an empty slot not filled yet."""
        return ctypes.addressof(self) if self._filled else 0

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return ctypes.sizeof(self)

    def _fill(self, src: torch.Tensor) -> None:
        """Copy the contiguous CPU ``uint8`` tensor ``src`` in (allocating for an empty slot)."""
        n = src.numel()
        if not self._filled:
            if ctypes.sizeof(self) != n:
                if ctypes.sizeof(self) > n:
                    raise LayoutError(f"KVTensor slot of {ctypes.sizeof(self)} bytes cannot take a {n}-byte tensor")
                ctypes.resize(self, n)
                self.__class__ = _sized(n)
            self._filled = True
        elif ctypes.sizeof(self) != n:
            raise LayoutError(f"KVTensor at {self.ptr:#x} has {ctypes.sizeof(self)} bytes; the cache holds {n} per "
                              "token and layer")
        if n:
            ctypes.memmove(ctypes.addressof(self), src.data_ptr(), n)

    def _check(self, expected: int, where: str, *, filled: bool) -> None:
        """Raise ``LayoutError`` unless a pointer tensor is ``expected`` bytes long (and, with ``filled``, that
        the tensor has data: an empty slot cannot be stored)."""
        if filled and not self._filled:
            raise LayoutError(f"{where}: KVTensor(0, 0) holds no data to store")
        if self._filled and ctypes.sizeof(self) != expected:
            raise LayoutError(f"{where}: KVTensor at {self.ptr:#x} has {ctypes.sizeof(self)} bytes, the cache expects "
                              f"tensor_nbytes={expected}")

    def _bytes(self, expected: int) -> torch.Tensor:
        """The bytes as a ``uint8`` tensor (no copy); :meth:`_check` ran on them."""
        return torch.frombuffer(self, dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)

    def __repr__(self) -> str:
        return f"KVTensor(ptr={self.ptr:#x}, nbytes={self.nbytes})"


_SIZED: dict[int, type] = {}


def _sized(nbytes: int) -> type:
    """The KVTensor subclass of exactly ``nbytes`` bytes (a ctypes array length is part of its type)."""
    cls = _SIZED.get(nbytes)
    if cls is None:
        cls = type("KVTensor", (KVTensor,), {"_type_": ctypes.c_ubyte, "_length_": nbytes,
                                             "__doc__": KVTensor.__doc__})
        _SIZED[nbytes] = cls
    return cls


@dataclass
class VineyardCacheConfig:
    """Vineyard's shared-memory radix-tree cache config; here: a :class:`~kvstream.stores.radix.RadixStore`.

    Parameters
    ----------
    socket : str
        vineyardd's IPC socket: recorded only (no server is needed).
    block_size, sync_interval : int
        Tokens per tree block and seconds between syncs in Vineyard: recorded only.
    llm_cache_sync_lock, llm_cache_object_name, llm_ref_cnt_object_name : str
        Vineyard object names: recorded; ``llm_cache_object_name`` names the shared store when ``shared``.
    shared : bool
        kvstream extra: share the store between processes of this host (shared memory) under
        ``llm_cache_object_name``.
    """

    socket: str
    block_size: int = 5
    sync_interval: int = 3
    llm_cache_sync_lock: str = "llmCacheSyncLock"
    llm_cache_object_name: str = "llm_cache_object"
    llm_ref_cnt_object_name: str = "llm_refcnt_object"
    shared: bool = field(default=False, kw_only=True)


@dataclass
class FileCacheConfig:
    """Vineyard's file cache config; here: a :class:`~kvstream.stores.chunk_file.ChunkFileStore`.

    Parameters
    ----------
    chunk_size : int
        Tokens per file.
    hash_chunk_size : int
        Hex digits of the hash per directory level (two levels; default 2). ``split_number`` is the
        older name of the same setting.
    root : str
        Directory of the files.
    filesystem_type : str
        Recorded only (any POSIX filesystem works).
    gc_interval, ttl : int
        Seconds between background GC runs, and since a file's last access before GC deletes it
        (``gc_interval <= 0`` disables the background GC).
    enable_global_gc, global_gc_interval, global_ttl :
        Recorded only: every kvstream client's GC already covers the whole root.

    Raises
    ------
    ConfigError
        If both ``hash_chunk_size`` and ``split_number`` are given and differ.
    """

    chunk_size: int = 16
    hash_chunk_size: int | None = None
    root: str = "/tmp/vineyard/llm_cache"
    filesystem_type: str = "local"
    gc_interval: int = 30 * 60
    ttl: int = 30 * 60
    enable_global_gc: bool = False
    global_gc_interval: int = 3 * 60 * 60
    global_ttl: int = 3 * 60 * 60
    split_number: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        h, s = self.hash_chunk_size, self.split_number
        if h is not None and s is not None and h != s:
            raise ConfigError(f"FileCacheConfig: hash_chunk_size={h} and split_number={s} name the same setting; "
                              "give one")
        self.hash_chunk_size = self.split_number = h if h is not None else (s if s is not None else 2)


KVCacheList = Sequence[Sequence[tuple[KVTensor, KVTensor]]]


def _store(cache_config: Any, nbytes: int, cache_capacity: int, layer: int, rank: int | None,
           world_size: int | None) -> tuple[RadixStore | ChunkFileStore, int]:
    """The store of one Vineyard config and its chunk size (see :class:`KVCache`)."""
    if isinstance(cache_config, VineyardCacheConfig):
        capacity_bytes = cache_capacity * layer * 2 * nbytes
        return RadixStore(capacity_bytes, pin_memory=False,
                          shared_name=cache_config.llm_cache_object_name if cache_config.shared else None), \
            cache_config.block_size
    if isinstance(cache_config, FileCacheConfig):
        root = cache_config.root
        if rank is not None and world_size is not None:
            root = os.path.join(root, f"{world_size}-{rank}")
        interval = cache_config.gc_interval if cache_config.gc_interval and cache_config.gc_interval > 0 else None
        return ChunkFileStore(root, cache_config.chunk_size, namespace=f"vineyard:{layer}x{nbytes}",
                              dir_chars=cache_config.hash_chunk_size, ttl_s=cache_config.ttl,
                              gc_interval_s=interval), cache_config.chunk_size
    raise ConfigError(f"KVCache cache_config must be a VineyardCacheConfig or FileCacheConfig (or a list of them), "
                      f"got {type(cache_config).__name__}")


class KVCache:
    """Vineyard's ``KVCache`` on a kvstream prefix store.

    Parameters
    ----------
    cache_config : VineyardCacheConfig or FileCacheConfig
        Which store (see the module docstring).
    tensor_nbytes : int
        Bytes of one token's K (and of its V) at one layer. ``tensor_bytes`` is accepted as an alias.
    cache_capacity : int
        Tokens the memory store holds before LRU eviction (the file store is bounded by its disk).
    layer : int
        Layers per token.
    rank, world_size : int, optional
        With a file config, the files go under ``<root>/<world_size>-<rank>`` (as in Vineyard).
    tier_write : {"through", "back"}
        kvstream extra: with a list of configs (fastest first, e.g. ``[VineyardCacheConfig(...),
        FileCacheConfig(...)]``) the stores become tiers of one :class:`~kvstream.stores.tiered.TieredStore`,
        written through or back.

    Raises
    ------
    ConfigError
        A missing or unknown config, non-positive sizes, or conflicting ``tensor_nbytes``/``tensor_bytes``.

    Examples
    --------
    >>> import tempfile
    >>> cache = KVCache(FileCacheConfig(chunk_size=2, root=tempfile.mkdtemp()), tensor_nbytes=16, layer=2)
    >>> cache.chunk_size
    2
    """

    def __init__(self, cache_config: VineyardCacheConfig | FileCacheConfig | None = None, tensor_nbytes: int | None = None,
                 cache_capacity: int = 1024, layer: int = 1, rank: int | None = None, world_size: int | None = None,
                 *, tensor_bytes: int | None = None, tier_write: str = "through"):
        if tensor_nbytes is not None and tensor_bytes is not None and tensor_nbytes != tensor_bytes:
            raise ConfigError(f"KVCache: tensor_nbytes={tensor_nbytes} and tensor_bytes={tensor_bytes} differ")
        nbytes = tensor_nbytes if tensor_nbytes is not None else (tensor_bytes if tensor_bytes is not None else 1024)
        for name, v in (("tensor_nbytes", nbytes), ("cache_capacity", cache_capacity), ("layer", layer)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"KVCache {name} must be a positive int, got {v!r}")
        self.cache_config = cache_config
        self.tensor_nbytes = nbytes
        self.cache_capacity = cache_capacity
        self.layer = layer
        self.store: RadixStore | ChunkFileStore | TieredStore
        if isinstance(cache_config, (list, tuple)):  # kvstream extra: tiers, fastest first
            stores = []
            try:
                for c in cache_config:
                    stores.append(_store(c, nbytes, cache_capacity, layer, rank, world_size)[0])
                self.store = TieredStore(stores, write=tier_write)
            except BaseException:
                for st in stores:
                    st.close()
                raise
            self.chunk_size = max(getattr(st, "chunk_tokens", 1) for st in stores)
        else:
            self.store, self.chunk_size = _store(cache_config, nbytes, cache_capacity, layer, rank, world_size)

    def __repr__(self) -> str:
        return (f"KVCache(cache_config={self.cache_config!r}, tensor_nbytes={self.tensor_nbytes}, "
                f"cache_capacity={self.cache_capacity}, layer={self.layer})")

    # -- update ------------------------------------------------------------------------------------------
    def update(self, prefix: Sequence[int] | None, tokens: Sequence[int], kv_cache_list: KVCacheList) -> int:
        """Store the KV of ``tokens``, which follow ``prefix`` (whose KV the cache holds already).

        Parameters
        ----------
        prefix : list of int or None
            Tokens before ``tokens``; for a file config a multiple of ``chunk_size`` long.
        tokens : list of int
            Tokens whose KV is given.
        kv_cache_list : list of list of (KVTensor, KVTensor)
            ``kv_cache_list[i][j]``: K and V of token ``i`` at layer ``j``, ``tensor_nbytes`` each.

        Returns
        -------
        int
            Tokens of ``tokens`` the cache now holds (a file cache keeps whole chunks only; a memory
            cache stops at its capacity, or stores nothing if ``prefix`` is not stored).

        Raises
        ------
        ConfigError
            ``kv_cache_list`` does not have one entry per token, of ``layer`` pairs each.
        LayoutError
            A KVTensor of another size than ``tensor_nbytes``, or an empty one (checked before any copy).
        """
        prefix = list(prefix or [])
        tokens = list(tokens)
        self._check_list(tokens, kv_cache_list, "update")
        n, nb = len(tokens), self.tensor_nbytes
        if n == 0:
            return 0
        keys = [torch.empty((1, 1, n, nb), dtype=torch.uint8) for _ in range(self.layer)]
        values = [torch.empty((1, 1, n, nb), dtype=torch.uint8) for _ in range(self.layer)]
        for i, per_layer in enumerate(kv_cache_list):
            for j, (k, v) in enumerate(per_layer):
                keys[j][0, 0, i].copy_(k._bytes(nb))
                values[j][0, 0, i].copy_(v._bytes(nb))
        return self.store.update_kv(prefix + tokens, keys, values, start=len(prefix))

    def batched_update(self, prefixes: Sequence[Sequence[int] | None], tokens: Sequence[Sequence[int]],
                       kv_cache_lists: Sequence[KVCacheList]) -> list[int]:
        """:meth:`update` for several sequences; one count per sequence."""
        return [self.update(p, t, kv) for p, t, kv in zip(prefixes, tokens, kv_cache_lists, strict=True)]

    # -- query -------------------------------------------------------------------------------------------
    def query(self, *args: Any) -> int:
        """``query(tokens, kv_cache_list)`` or ``query(prefix, tokens, kv_cache_list)``: fill the KV of the
        longest stored prefix of ``prefix + tokens`` into ``kv_cache_list`` (entries of ``tokens`` only).

        Returns
        -------
        int
            Tokens of ``tokens`` matched and filled: ``kv_cache_list[:matched]`` hold their KV; the rest
            are untouched.

        Raises
        ------
        ConfigError
            On a wrong number of arguments or a malformed ``kv_cache_list``.
        LayoutError
            A KVTensor with a pointer but another size than ``tensor_nbytes`` (checked before any copy).
        """
        if len(args) == 2:
            prefix, (tokens, kv_cache_list) = [], args
        elif len(args) == 3:
            prefix, tokens, kv_cache_list = args
        else:
            raise ConfigError(f"KVCache.query takes (tokens, kv_cache_list) or (prefix, tokens, kv_cache_list); "
                              f"got {len(args)} arguments")
        prefix, tokens = list(prefix or []), list(tokens)
        self._check_list(tokens, kv_cache_list, "query")
        with self.store.fetch_prefix(prefix + tokens) as match:
            matched = min(max(0, match.matched_tokens - len(prefix)), len(tokens))
            for j in range(self.layer):
                k_rows = match.keys[j][0, 0] if matched else None
                v_rows = match.values[j][0, 0] if matched else None
                for i in range(matched):
                    k, v = kv_cache_list[i][j]
                    k._fill(k_rows[len(prefix) + i].contiguous())
                    v._fill(v_rows[len(prefix) + i].contiguous())
        return matched

    def batched_query(self, prefixes: Sequence[Sequence[int] | None], tokens: Sequence[Sequence[int]],
                      kv_cache_lists: Sequence[KVCacheList]) -> list[int]:
        """:meth:`query` for several sequences; one count per sequence."""
        return [self.query(p, t, kv) for p, t, kv in zip(prefixes, tokens, kv_cache_lists, strict=True)]

    def _check_list(self, tokens: list[int], kv_cache_list: KVCacheList, what: str) -> None:
        if len(kv_cache_list) != len(tokens):
            raise ConfigError(f"KVCache.{what}: kv_cache_list has {len(kv_cache_list)} entries for {len(tokens)} tokens")
        for i, per_layer in enumerate(kv_cache_list):
            if len(per_layer) != self.layer:
                raise ConfigError(f"KVCache.{what}: kv_cache_list[{i}] has {len(per_layer)} layers, expected {self.layer}")
            for j, pair in enumerate(per_layer):
                if len(pair) != 2 or not all(isinstance(t, KVTensor) for t in pair):
                    raise ConfigError(f"KVCache.{what}: kv_cache_list[{i}][{j}] must be a (KVTensor, KVTensor) pair")
                for kv, t in enumerate(pair):
                    t._check(self.tensor_nbytes, f"kv_cache_list[{i}][{j}][{kv}]", filled=what == "update")

    def close(self) -> None:
        """Close the underlying store (stops the file cache's GC thread). Idempotent."""
        self.store.close()

    def __del__(self):  # pragma: no cover - best effort, as Vineyard's KVCache
        store = getattr(self, "store", None)
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - a finalizer must not raise
                pass


__all__ = ["KVCache", "KVTensor", "FileCacheConfig", "VineyardCacheConfig", "MIN_ADDRESS"]
