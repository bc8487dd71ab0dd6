"""The radix-tree prefix store: token ids in a radix tree whose nodes own KV in host memory.

Design (after SGLang's ``RadixCache`` and Vineyard's radix tree + blobs):

* The tree (:mod:`.tree`) maps runs of token ids to slices of **blobs**: one host tensor written by one
  :meth:`RadixStore.update_kv`, token-major (``[tokens, layers, 2, 1, kv_heads, 1, head_dim]``: a
  packed chunk per token), so that any run of tokens is one contiguous copy to the GPU. The kernels
  move KV in and out of that order (:func:`kvstream.kernels.pack_tokens` and ``unpack_tokens`` read
  and write a blob through per-layer strided views, :func:`token_major_views`). Blobs are page-locked
  (kvstream's pinned allocator) when a GPU exists, so a match loads onto the GPU with asynchronous copies.
* Lookup walks the tree for the longest prefix, touches every node on the path (LRU clock) and
  **pins** the deepest node: a pinned match survives any eviction between lookup and load.
* Layer-wise loading (:meth:`~kvstream.stores.match.PrefixMatch.load_layers`, the loop of
  :func:`~kvstream.stores.layerwise.enqueue_layers`): in a token-major blob one layer's K and V of one
  token are one row of ``2 * kv_heads * head_dim`` elements, rows a token stride
  (``layers * 2 * kv_heads * head_dim``) apart. So per layer and per run of matched tokens, one pitched
  copy (``cudaMemcpy2DAsync``) brings that layer's rows into a device staging
  ``[tokens, 2, kv_heads, head_dim]``, and one ``pack_tokens`` on the same side stream puts them in the
  final ``[2, 1, kv_heads, tokens, head_dim]``; then the layer's event.
* Past ``capacity_bytes`` (the sum of live blobs' bytes), unpinned leaves go in least-recently-used
  order. An update that cannot fit after evicting everything unpinned stores the part that fits.
  ``on_evict`` (set by a write-back :class:`~kvstream.stores.tiered.TieredStore`) receives each leaf's
  whole sequence and KV before it goes; a leaf it fails to take stays.

With ``shared_name=...`` the processes of one host share the store through shared memory (:mod:`.shared`);
in-process (the default) nothing is serialized.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, Sequence

import torch

from ...errors import ConfigError, CorruptChunkError, LayoutError
from ...layout import KVLayout
from ...cuda import host_empty
from ..base import PrefixMatch, PrefixStore, check_kv, check_max_tokens
from ..hashing import as_token_ids
from ..identity import ModelScope
from .blobs import blob_shape, load_layers, load_slices, token_major_views, window, write_blob
from .shared import SharedTree, new_blob_name, remove_dir, shared_dir
from .tree import INSERT_OWNER, Tree

logger = logging.getLogger(__name__)

#: Pin owner of an in-process store (a shared store names processes: :func:`.shared.owner_id`).
LOCAL_OWNER = "local"


class RadixStore(ModelScope, PrefixStore):
    """Prefix store over a radix tree of token ids, with KV in (pinned) host memory and LRU eviction.

    Parameters
    ----------
    capacity_bytes : int
        Most bytes of KV held (sum of live blobs; the pinned allocator may round each block up to its
        size class). Least recently used unpinned leaves are evicted past it.
    shared_name : str, optional
        Share the store between the processes of one host under this name (:mod:`kvstream.stores.radix.shared`).
        Every process passes the same ``capacity_bytes``. In-process when ``None`` (default).
    shm_dir : str, optional
        Where shared stores live (default ``/dev/shm``, the POSIX shared-memory tmpfs).
    pin_memory : bool, optional
        Page-lock in-process blobs (default: when a CUDA device is present).
    namespace, config, dtype : optional
        Which model's KV the store holds (:mod:`kvstream.stores.identity`): an explicit namespace, or the
        fingerprint of ``config`` (default: of the first model the store is used with). The tree holds
        one namespace: lookups of another match nothing, updates of another raise ``LayoutError``.

    Raises
    ------
    ConfigError
        For a non-positive capacity, or a shared store that exists with another capacity.

    Examples
    --------
    >>> store = RadixStore(capacity_bytes=1 << 30)
    >>> out = model.generate(ids, cache=cache, max_new_tokens=16)   # doctest: +SKIP
    >>> store.update(out, cache)                                              # doctest: +SKIP
    >>> store.query(out)                                                      # doctest: +SKIP
    """

    name = "radix"

    def __init__(self, capacity_bytes: int, *, shared_name: str | None = None, shm_dir: str | None = None,
                 pin_memory: bool | None = None, namespace: str | None = None, config: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self._init_model(namespace, config, dtype)
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"RadixStore capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.shared_name = shared_name
        self._pin = pin_memory
        self._lock = threading.RLock()
        self._data: dict[str, torch.Tensor] = {}  # blob name -> packed tensor (in-process) or its mapping
        self._held = 0  # pins this process holds
        self._shared: SharedTree | None = None
        self._dir: str | None = None
        self._owner = LOCAL_OWNER
        if shared_name is not None:
            self._dir = shared_dir(shared_name, shm_dir)
            self._shared = SharedTree(self._dir, shared_name, capacity_bytes)
            self._owner = self._shared.owner
        self._tree = Tree() if self._shared is None else self._shared.tree
        #: ``on_evict(token_ids, keys, values)``, called with a leaf's root-to-leaf sequence and its KV
        #: (per-layer ``[1, kv_heads, T, head_dim]`` host views) before eviction drops it; if it raises,
        #: the leaf is kept. ``None``: evict silently.
        self.on_evict = None

    @contextlib.contextmanager
    def _locked(self, write: bool) -> Iterator[Tree]:
        """The tree, held by this thread (and, shared, by this process: see :meth:`SharedTree.locked`)."""
        with self._lock:
            self._check_open()
            if self._shared is None:
                yield self._tree
                return
            with self._shared.locked(write) as tree:
                if tree is not self._tree:  # another process changed the index: forget blobs it evicted
                    self._tree = tree
                    for name in [n for n in self._data if n not in tree.blobs]:
                        del self._data[name]
                yield tree

    # -- blob memory -------------------------------------------------------------------------------------
    def _new_blob(self, layout: KVLayout, n_tokens: int) -> tuple[str, torch.Tensor]:
        name = new_blob_name()
        shape = blob_shape(layout, n_tokens)
        if self._shared is None:
            return name, host_empty(shape, layout.dtype, pin=self._pin)
        nbytes = layout.bytes_per_token() * n_tokens
        self._shared.create_blob(name, nbytes)
        return name, self._shared.map_blob(name, nbytes, layout.dtype, shape, writable=True)

    def _blob_tensor(self, name: str, tree: Tree) -> torch.Tensor:
        """Blob ``name``'s tensor; shared mode maps another process's blob (``CorruptChunkError`` if it
        cannot be: :meth:`SharedTree.map_blob`)."""
        t = self._data.get(name)
        if t is None:  # shared mode: another process wrote it
            tokens, nbytes, _ = tree.blobs[name]
            t = self._shared.map_blob(name, nbytes, tree.layout.dtype, blob_shape(tree.layout, tokens), writable=False)
            self._data[name] = t
        return t

    def _intact(self, path: list, tree: Tree) -> tuple[list, list]:
        """The leading part of a walk's ``path`` whose blobs map, and its ``(blob, offset, used)`` slices: a
        match stops before a blob that cannot be mapped (a shared store's damaged or planted file)."""
        slices = []
        for i, (node, used) in enumerate(path):
            try:
                slices.append((self._blob_tensor(node.blob, tree), node.offset, used))
            except CorruptChunkError as e:
                logger.warning("RadixStore: the match stops before a blob that cannot be read: %s", e)
                return path[:i], slices
        return path, slices

    def _free(self, names: list[str]) -> None:
        for name in names:
            self._data.pop(name, None)
            if self._shared is not None:
                self._shared.delete_blob(name)

    # -- the store interface -----------------------------------------------------------------------------
    def _other_model(self, tree: Tree) -> bool:
        """Whether the tree holds KV of another namespace than this store's (another model)."""
        return tree.layout is not None and (tree.namespace or "") != self.namespace

    def _on_bind(self, namespace: str) -> None:
        """KV stored before any model was known (namespace ``""``) is taken as this model's, as a store without
        namespaces took it; KV of another model's namespace is refused."""
        with self._locked(write=True) as tree:
            if tree.layout is not None and tree.namespace:
                if tree.namespace != namespace:
                    raise LayoutError(f"RadixStore holds KV of namespace {tree.namespace!r} (another model's); it "
                                      f"cannot take the model {namespace}: use one store per model")
            elif tree.layout is not None:
                tree.namespace = namespace

    def query(self, token_ids: Any) -> int:
        """Tokens of the longest stored prefix of ``token_ids``; touches nothing, pins nothing."""
        ids = as_token_ids(token_ids)
        with self._locked(write=False) as tree:
            return 0 if self._other_model(tree) else tree.walk(ids)[1]

    def lookup(self, token_ids: Any, *, max_tokens: int | None = None) -> PrefixMatch:
        """Find, touch (LRU) and pin the longest stored prefix; see :meth:`PrefixStore.lookup`."""
        ids = as_token_ids(token_ids)
        cap = check_max_tokens(max_tokens, len(ids))
        with self._locked(write=True) as tree:
            path, slices = ([], []) if self._other_model(tree) else self._intact(tree.walk(ids[:cap])[0], tree)
            matched = sum(used for _, used in path)
            if matched == 0:
                return PrefixMatch(0, None, None, source="RadixStore")
            tree.touch(path)
            deepest = path[-1][0]
            tree.pin(deepest, self._owner)
            self._held += 1
            layout = tree.layout
        node_id = deepest.id

        def loader(device: torch.device, n_tokens: int, start: int = 0):
            """Copy tokens ``[start, n_tokens)`` of the match onto a device; see PrefixMatch.load."""
            return load_slices(window(slices, start), layout, n_tokens - start, device)

        def layer_loader(device: torch.device, n_tokens: int, stream, start: int = 0):
            """Start the layer-by-layer copy of tokens ``[start, n_tokens)``; see PrefixMatch.load_layers."""
            return load_layers(window(slices, start), layout, n_tokens - start, device, stream, start)

        def releaser() -> None:
            """Unpin the match's deepest node."""
            with self._lock:
                if self._closed:  # close() already dropped this process's pins
                    self._held -= 1
                    return
                with self._locked(write=True) as t:
                    t.unpin(node_id, self._owner)
                    self._held -= 1

        return PrefixMatch(matched, loader, releaser, source="RadixStore", layer_loader=layer_loader, store=self,
                           bytes_per_token=layout.bytes_per_token())

    def update_kv(self, token_ids: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                  start: int = 0) -> int:
        """Insert the KV of ``token_ids[start:]``; see :meth:`PrefixStore.update_kv`.

        The store must already hold ``token_ids[:start]`` (otherwise nothing is stored: returns 0).
        Tokens already stored are not copied again. If evicting every unpinned leaf still leaves too
        little room, only the part that fits is stored; the return value says how much.
        """
        ids = as_token_ids(token_ids)
        n = len(ids)
        if not 0 <= start <= n:
            raise ConfigError(f"start must be in [0, {n}], got {start}")
        layout = check_kv(keys, values, n - start)
        self.check_layout(layout)
        with self._locked(write=True) as tree:
            if tree.layout is None:
                tree.layout, tree.namespace = layout, self.namespace
            elif self._other_model(tree):
                raise LayoutError(f"RadixStore holds KV of namespace {tree.namespace!r}, this store's is "
                                  f"{self.namespace!r} (another model): use one store per model")
            elif tree.layout != layout:
                raise LayoutError(f"RadixStore holds KV of layout {tree.layout}, got {layout}")
            path, matched = tree.walk(ids)
            if matched < start:
                return 0
            tree.touch(path)
            if matched == n:
                return n - start
            parent = tree.root
            if path:
                node, used = path[-1]
                parent = tree.split(node, used) if used < len(node.edge) else node
            per_token = layout.bytes_per_token()
            want = n - matched
            tree.pin(parent, INSERT_OWNER)
            try:
                self._free(tree.evict(want * per_token, self.capacity_bytes,
                                      keep=None if self.on_evict is None else lambda leaf: self._demote(leaf, tree)))
            finally:
                tree.unpin(parent.id, INSERT_OWNER)
            fit = min(want, max(0, self.capacity_bytes - tree.used_bytes) // per_token)
            if fit == 0:
                return matched - start
            name, blob = self._new_blob(layout, fit)
            try:
                write_blob(blob, keys, values, matched - start)
            except BaseException:
                self._free([name])
                raise
            self._data[name] = blob
            tree.add_blob(name, fit, blob.numel() * blob.element_size())
            tree.add_child(parent, tuple(ids[matched:matched + fit]), name, 0)
            return matched + fit - start

    def _demote(self, leaf, tree: Tree) -> bool:
        """Hand a leaf about to be evicted to :attr:`on_evict`; ``True`` (keep the leaf) if that fails."""
        path = tree.path_to(leaf)
        ids = [t for node in path for t in node.edge]
        rows = torch.cat([self._blob_tensor(n.blob, tree)[n.offset:n.offset + len(n.edge)] for n in path])
        keys, values = token_major_views(rows)
        try:
            self.on_evict(ids, keys, values)
        except Exception as e:  # noqa: BLE001 - keep the leaf; the update stores less, nothing is lost
            logger.warning("RadixStore: keeping a %d-token leaf its lower tier could not take: %s", len(ids), e)
            return True
        return False

    def bytes_per_token(self) -> int | None:
        """Bytes of KV per token of what the store holds (``None`` while empty)."""
        with self._locked(write=False) as tree:
            return None if tree.layout is None else tree.layout.bytes_per_token()

    def pinned(self) -> int:
        """Pins this process holds (matches not yet released)."""
        return self._held

    def stats(self) -> dict:
        """Counts for tests and tables: nodes, blobs, tokens, used/capacity bytes, pinned nodes, pins (all owners)."""
        with self._locked(write=False) as tree:
            return {**tree.stats(), "capacity_bytes": self.capacity_bytes}

    def edges(self) -> list[tuple[int, ...]]:
        """Every stored root-to-leaf token sequence (for tests and debugging), sorted."""
        with self._locked(write=False) as tree:
            return tree.sequences()

    def close(self) -> None:
        """Drop this process's view: its pins in a shared store are released, the files stay (see :meth:`unlink`).

        Idempotent.
        """
        if self._closed:
            return
        if self._shared is not None:
            with self._lock:
                self._shared.close()
        self._data.clear()
        self._tree = Tree()
        super().close()

    def unlink(self) -> None:
        """Delete a shared store's directory (blobs and index) for every process; like ``SharedMemory.unlink``.

        Raises
        ------
        ConfigError
            If the store is not shared.
        """
        if self._dir is None:
            raise ConfigError("unlink() is for shared stores (shared_name=...)")
        self.close()
        remove_dir(self._dir)

    @staticmethod
    def shared_dir(shared_name: str, shm_dir: str | None = None) -> str:
        """The directory of the shared store ``shared_name``: ``<shm_dir or /dev/shm>/kvstream-radix-<name>``.

        Raises
        ------
        ConfigError
            If the name is not a plain file name.
        """
        return shared_dir(shared_name, shm_dir)

    @classmethod
    def remove_shared(cls, shared_name: str, shm_dir: str | None = None) -> bool:
        """Delete the shared store ``shared_name`` without attaching to it; ``True`` if it existed."""
        return remove_dir(shared_dir(shared_name, shm_dir))


__all__ = ["RadixStore", "LOCAL_OWNER"]
