"""The radix-tree prefix store: token ids in a radix tree whose nodes own KV in host memory.

Design (after SGLang's ``RadixCache`` and Vineyard's radix tree + blobs):

* Each edge of the tree is a run of token ids; a node owns the KV of its edge's tokens as a slice
  ``[offset, offset + len(edge))`` of a **blob**: one host tensor written by one
  :meth:`RadixStore.update_kv`, token-major (``[tokens, layers, 2, 1, kv_heads, 1, head_dim]``: a
  packed chunk per token), so that any run of tokens is one contiguous copy to the GPU; the device
  puts the loaded tokens back in packed order with one gather. Splitting a node (an insert that
  diverges inside an edge) copies nothing: both halves keep slicing the same blob, which lives while
  any node refers to it. Blobs are page-locked (kvstream's pinned allocator) when a GPU exists, so a
  match loads onto the GPU with asynchronous copies.
* Lookup walks the tree for the longest prefix, touches every node on the path (LRU clock) and
  **pins** the deepest node. Only leaves are ever evicted, so pinning the deepest node protects the
  whole path: a pinned match survives any eviction between lookup and load.
* Layer-wise loading (:meth:`~kvstream.stores.base.PrefixMatch.load_layers`): in a token-major blob one
  layer's K and V of one token are one row of ``2 * kv_heads * head_dim`` elements, rows a token stride
  (``layers * 2 * kv_heads * head_dim``) apart. So per layer and per matched node, one pitched copy
  (``cudaMemcpy2DAsync``: rows = the node's tokens) brings that layer's rows into a device staging
  ``[tokens, 2, kv_heads, head_dim]``, and one permute-copy on the same side stream puts them in the
  final ``[2, 1, kv_heads, tokens, head_dim]``; then the layer's event. Layer 0 goes first, so prefill
  waits for one layer's copy instead of all of them (LMCache's layer-wise mode, SGLang's HiCache).
* Past ``capacity_bytes`` (the sum of live blobs' bytes), unpinned leaves go in least-recently-used
  order; a parent whose last child went becomes a leaf and may go next (pruning empty branches). An
  update that cannot fit after evicting everything unpinned stores the part that fits.

Sharing between processes of one host (``shared_name=...``): blobs are files in a tmpfs directory
(``/dev/shm/kvstream-radix-<name>/``, i.e. POSIX shared memory), mapped with ``torch.from_file``; the
tree is a JSON index beside them. Every operation holds an exclusive ``flock`` on the directory's lock
file (Vineyard serializes its tree the same way, through ``llm_cache_sync_lock``), re-reads the index when
its generation number changed and writes it back (temp + rename) when it changed it. Pins are counted
per owner process (``pid:start-time``); pins of a process that died are dropped the next time any
process takes the lock, so a crash cannot leak them. Evicted blob files are unlinked; a process that
still maps one keeps reading valid memory (Linux keeps unlinked pages until the last unmap). Metadata
costs grow with the tree: each operation reads/writes the index (Vineyard's etcd sync has the same
cost on a larger scale). In-process (the default) nothing is serialized.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Iterator, Sequence

import torch

from ..errors import CapacityError, ConfigError, KVStreamError, LayoutError, TransportError
from ..layout import KVLayout
from ..cuda import Event, host_empty, memcpy_2d_async
from .base import (LayerwiseLoad, PinError, PrefixMatch, PrefixStore, check_kv, check_max_tokens, chunk_major,
                   default_pin, from_chunk_major)
from .hashing import as_token_ids

_INDEX_FORMAT = 1
_LOCAL_OWNER = "local"
_INSERT_OWNER = "__insert__"


class _Node:
    __slots__ = ("id", "parent", "edge", "children", "blob", "offset", "last_access", "pins")

    def __init__(self, id_: int, parent: "_Node | None", edge: tuple[int, ...], blob: str | None, offset: int,
                 last_access: int):
        self.id = id_
        self.parent = parent
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.blob = blob
        self.offset = offset
        self.last_access = last_access
        self.pins: dict[str, int] = {}

    def pin_count(self) -> int:
        """Pins held on this node by every process."""
        return sum(self.pins.values())


class _Tree:
    """Nodes, blobs and the LRU clock: plain Python, JSON-serialisable for the shared mode."""

    def __init__(self) -> None:
        self.root = _Node(0, None, (), None, 0, 0)
        self.nodes: dict[int, _Node] = {0: self.root}
        self.blobs: dict[str, list[int]] = {}  # name -> [tokens, nbytes, refs]
        self.used_bytes = 0
        self.tick = 0
        self.next_id = 1
        self.layout: KVLayout | None = None

    # -- matching --------------------------------------------------------------------------------------
    def walk(self, ids: Sequence[int]) -> tuple[list[tuple[_Node, int]], int]:
        """Longest prefix of ``ids`` in the tree: the ``(node, tokens used of its edge)`` path and its length."""
        path: list[tuple[_Node, int]] = []
        node, i, n = self.root, 0, len(ids)
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                break
            edge = child.edge
            k = 1
            limit = min(len(edge), n - i)
            while k < limit and edge[k] == ids[i + k]:
                k += 1
            path.append((child, k))
            i += k
            if k < len(edge):
                break
            node = child
        return path, i

    def touch(self, path: list[tuple[_Node, int]]) -> None:
        """Mark the node used now (LRU order)."""
        self.tick += 1
        for node, _ in path:
            node.last_access = self.tick

    # -- structure -------------------------------------------------------------------------------------
    def split(self, node: _Node, k: int) -> _Node:
        """Split ``node``'s edge after ``k`` tokens; returns the new upper node (no data is copied)."""
        upper = _Node(self.next_id, node.parent, node.edge[:k], node.blob, node.offset, node.last_access)
        self.next_id += 1
        self.nodes[upper.id] = upper
        node.parent.children[upper.edge[0]] = upper
        node.edge = node.edge[k:]
        node.offset += k
        node.parent = upper
        upper.children[node.edge[0]] = node
        self.blobs[upper.blob][2] += 1
        return upper

    def add_child(self, parent: _Node, edge: tuple[int, ...], blob: str, offset: int) -> _Node:
        """Attach ``child`` under its first token."""
        self.tick += 1
        node = _Node(self.next_id, parent, edge, blob, offset, self.tick)
        self.next_id += 1
        self.nodes[node.id] = node
        parent.children[edge[0]] = node
        self.blobs[blob][2] += 1
        return node

    def add_blob(self, name: str, tokens: int, nbytes: int) -> None:
        """Record a host blob this node's tokens live in."""
        self.blobs[name] = [tokens, nbytes, 0]
        self.used_bytes += nbytes

    def drop_blob(self, name: str) -> None:
        """Forget a host blob of this node."""
        self.used_bytes -= self.blobs.pop(name)[1]

    def evict(self, need_bytes: int, capacity_bytes: int) -> list[str]:
        """Remove unpinned leaves, least recently used first, until ``need_bytes`` more fit.

        Returns the names of blobs that lost their last node (the caller frees their memory).
        """
        freed: list[str] = []
        while self.used_bytes + need_bytes > capacity_bytes:
            leaves = sorted((n for n in self.nodes.values() if n is not self.root and not n.children and not n.pins),
                            key=lambda n: (n.last_access, n.id))
            if not leaves:
                break
            progressed = False
            for leaf in leaves:
                if self.used_bytes + need_bytes <= capacity_bytes:
                    break
                del leaf.parent.children[leaf.edge[0]]
                del self.nodes[leaf.id]
                blob = self.blobs[leaf.blob]
                blob[2] -= 1
                if blob[2] == 0:
                    self.drop_blob(leaf.blob)
                    freed.append(leaf.blob)
                progressed = True
            if not progressed:
                break
        return freed

    # -- pins --------------------------------------------------------------------------------------------
    @staticmethod
    def pin(node: _Node, owner: str) -> None:
        """Add one pin for this process."""
        node.pins[owner] = node.pins.get(owner, 0) + 1

    def unpin(self, node_id: int, owner: str) -> None:
        """Remove one pin of this process; raises PinError below zero."""
        node = self.nodes.get(node_id)
        if node is None:
            raise PinError(f"RadixStore: pinned node {node_id} is gone (was the store unlinked or this process's "
                           "pins dropped as dead?)")
        count = node.pins.get(owner, 0)
        if count <= 0:
            raise PinError(f"RadixStore: unpin of node {node_id} by {owner!r} would drive its pin count below zero")
        if count == 1:
            del node.pins[owner]
        else:
            node.pins[owner] = count - 1

    # -- persistence (shared mode) ----------------------------------------------------------------------
    def to_json(self, capacity_bytes: int) -> dict:
        """The node as a JSON-able dict (shared-memory index)."""
        nodes = [[n.id, n.parent.id, list(n.edge), n.blob, n.offset, n.last_access, n.pins]
                 for n in self.nodes.values() if n is not self.root]
        return {"format": _INDEX_FORMAT, "capacity_bytes": capacity_bytes, "tick": self.tick,
                "next_id": self.next_id, "layout": None if self.layout is None else self.layout.to_dict(),
                "blobs": {k: v[:2] for k, v in self.blobs.items()}, "nodes": nodes}

    @classmethod
    def from_json(cls, doc: dict) -> "_Tree":
        """Rebuild a node from :meth:`to_json`'s dict."""
        tree = cls()
        tree.tick, tree.next_id = int(doc["tick"]), int(doc["next_id"])
        tree.layout = None if doc["layout"] is None else KVLayout.from_dict(doc["layout"])
        for name, (tokens, nbytes) in doc["blobs"].items():
            tree.add_blob(name, int(tokens), int(nbytes))
        rows = sorted(doc["nodes"], key=lambda r: r[0])
        for id_, _, edge, blob, offset, last, pins in rows:
            tree.nodes[id_] = _Node(id_, None, tuple(edge), blob, offset, last)
            tree.nodes[id_].pins = {str(k): int(v) for k, v in pins.items()}
        for id_, parent_id, *_ in rows:
            node, parent = tree.nodes[id_], tree.nodes[parent_id]
            node.parent = parent
            parent.children[node.edge[0]] = node
            tree.blobs[node.blob][2] += 1
        return tree


# ----------------------------------------------------------------------------------------------------
# Processes: who owns a pin, and is it still alive
# ----------------------------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # field 22 (starttime), counted after the parenthesised command name, which may hold spaces
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_id() -> str:
    pid = os.getpid()
    return f"{pid}:{_start_time(pid) or 0}"


def _owner_alive(owner: str) -> bool:
    try:
        pid_s, start = owner.split(":", 1)
        pid = int(pid_s)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    actual = _start_time(pid)
    return actual is None or start == "0" or actual == start  # a reused pid has another start time


class RadixStore(PrefixStore):
    """Prefix store over a radix tree of token ids, with KV in (pinned) host memory and LRU eviction.

    Parameters
    ----------
    capacity_bytes : int
        Most bytes of KV held (sum of live blobs; the pinned allocator may round each block up to its
        size class). Least recently used unpinned leaves are evicted past it.
    shared_name : str, optional
        Share the store between the processes of one host under this name (see the module docstring).
        Every process passes the same ``capacity_bytes``. In-process when ``None`` (default).
    shm_dir : str, optional
        Where shared stores live (default ``/dev/shm``, the POSIX shared-memory tmpfs).
    pin_memory : bool, optional
        Page-lock in-process blobs (default: when a CUDA device is present).

    Raises
    ------
    ConfigError
        For a non-positive capacity, or a shared store that exists with another capacity.

    Examples
    --------
    >>> store = RadixStore(capacity_bytes=1 << 30)
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=16)   # doctest: +SKIP
    >>> store.update(out, cache)                                              # doctest: +SKIP
    >>> store.query(out)                                                      # doctest: +SKIP
    """

    name = "radix"

    def __init__(self, capacity_bytes: int, *, shared_name: str | None = None, shm_dir: str | None = None,
                 pin_memory: bool | None = None):
        super().__init__()
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"RadixStore capacity_bytes must be a positive int, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.shared_name = shared_name
        self._pin = default_pin() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._tree = _Tree()
        self._data: dict[str, torch.Tensor] = {}  # blob name -> packed tensor (in-process) or its mapping
        self._held = 0  # pins this process holds
        if shared_name is None:
            self._dir = None
            self._owner = _LOCAL_OWNER
        else:
            self._dir = self.shared_dir(shared_name, shm_dir)
            self._owner = _owner_id()
            self._generation = -1
            os.makedirs(self._dir, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self._dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            with self._locked(write=True):
                self._remove_orphans()

    # -- locking and the shared index -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, write: bool) -> Iterator[_Tree]:
        with self._lock:
            self._check_open()
            if self._dir is None:
                yield self._tree
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._load_index()
                try:
                    yield self._tree
                finally:  # also after an error: evictions done before it must reach the index
                    if write:
                        self._save_index()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _index_path(self) -> str:
        return os.path.join(self._dir, "index.json")

    def _load_index(self) -> None:
        raw = os.pread(self._lock_fd, 8, 0)
        generation = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if generation != self._generation:
            if os.path.exists(self._index_path()):
                with open(self._index_path(), "rb") as f:
                    doc = json.load(f)
                if doc.get("format") != _INDEX_FORMAT:
                    raise ConfigError(f"{self._dir}: index format {doc.get('format')}, this kvstream reads {_INDEX_FORMAT}")
                if int(doc["capacity_bytes"]) != self.capacity_bytes:
                    raise ConfigError(f"Shared RadixStore {self.shared_name!r} has capacity_bytes="
                                      f"{doc['capacity_bytes']}, this process asked for {self.capacity_bytes}")
                self._tree = _Tree.from_json(doc)
            else:
                self._tree = _Tree()
            self._generation = generation
            for name in list(self._data):  # forget mappings of blobs other processes evicted
                if name not in self._tree.blobs:
                    del self._data[name]
        self._reap_dead_owners()

    def _save_index(self) -> None:
        doc = self._tree.to_json(self.capacity_bytes)
        tmp = os.path.join(self._dir, f"index.{self._owner.replace(':', '-')}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, self._index_path())
        self._generation += 1
        os.pwrite(self._lock_fd, self._generation.to_bytes(8, "little"), 0)

    def _reap_dead_owners(self) -> None:
        alive: dict[str, bool] = {}
        for node in self._tree.nodes.values():
            for owner in list(node.pins):
                if owner == self._owner:
                    continue
                if owner not in alive:
                    alive[owner] = _owner_alive(owner)
                if not alive[owner]:
                    del node.pins[owner]

    def _remove_orphans(self) -> None:
        """Blob files no index entry refers to: left by a process that died inside an update."""
        for entry in os.scandir(self._dir):
            if entry.name.startswith("blob-") and entry.name[5:] not in self._tree.blobs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # -- blob memory -------------------------------------------------------------------------------------
    def _blob_path(self, name: str) -> str:
        return os.path.join(self._dir, f"blob-{name}")

    @staticmethod
    def _blob_shape(layout: KVLayout, n_tokens: int) -> tuple[int, ...]:
        return (int(n_tokens), layout.num_layers, 2, 1, layout.kv_heads, 1, layout.head_dim)

    def _new_blob(self, layout: KVLayout, n_tokens: int) -> tuple[str, torch.Tensor]:
        name = uuid.uuid4().hex
        shape = self._blob_shape(layout, n_tokens)
        if self._dir is None:
            return name, host_empty(shape, layout.dtype, pin=self._pin)
        nbytes = layout.bytes_per_token() * n_tokens
        path = self._blob_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve tmpfs pages now: a full tmpfs is an error, not a SIGBUS
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CapacityError(f"Shared RadixStore {self.shared_name!r}: no room for a {nbytes}-byte blob in "
                                    f"{self._dir} ({e.strerror})") from None
            raise TransportError(f"Shared RadixStore {self.shared_name!r}: cannot create {path}: {e}") from None
        os.close(fd)
        return name, self._map(path, nbytes, layout, n_tokens, writable=True)

    @classmethod
    def _map(cls, path: str, nbytes: int, layout: KVLayout, n_tokens: int, writable: bool) -> torch.Tensor:
        raw = torch.from_file(path, shared=writable, size=nbytes, dtype=torch.uint8)
        return raw.view(layout.dtype).view(cls._blob_shape(layout, n_tokens))

    def _blob_tensor(self, name: str, tree: _Tree) -> torch.Tensor:
        t = self._data.get(name)
        if t is None:  # shared mode: another process wrote it
            tokens, nbytes, _ = tree.blobs[name]
            t = self._map(self._blob_path(name), nbytes, tree.layout, tokens, writable=False)
            self._data[name] = t
        return t

    def _free(self, names: list[str]) -> None:
        for name in names:
            self._data.pop(name, None)
            if self._dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._blob_path(name))

    # -- the store interface -----------------------------------------------------------------------------
    def query(self, token_ids: Any) -> int:
        """Tokens of the longest stored prefix of ``token_ids``; touches nothing, pins nothing."""
        ids = as_token_ids(token_ids)
        with self._locked(write=False) as tree:
            return tree.walk(ids)[1]

    def lookup(self, token_ids: Any, *, max_tokens: int | None = None) -> PrefixMatch:
        """Find, touch (LRU) and pin the longest stored prefix; see :meth:`PrefixStore.lookup`."""
        ids = as_token_ids(token_ids)
        cap = check_max_tokens(max_tokens, len(ids))
        with self._locked(write=True) as tree:
            path, matched = tree.walk(ids[:cap])
            if matched == 0:
                return PrefixMatch(0, None, None, source="RadixStore")
            tree.touch(path)
            deepest = path[-1][0]
            tree.pin(deepest, self._owner)
            self._held += 1
            slices = [(self._blob_tensor(node.blob, tree), node.offset, used) for node, used in path]
            layout = tree.layout
        node_id = deepest.id

        def loader(device: torch.device, n_tokens: int):
            """Copy the matched tokens onto a device; see PrefixMatch.load."""
            return self._load_slices(slices, layout, n_tokens, device)

        def layer_loader(device: torch.device, n_tokens: int, stream):
            """Start the layer-by-layer copy of the match; see PrefixMatch.load_layers."""
            return self._load_layers(slices, layout, n_tokens, device, stream)

        def releaser() -> None:
            """Unpin the match's deepest node."""
            with self._lock:
                if self._closed:  # close() already dropped this process's pins
                    self._held -= 1
                    return
                with self._locked(write=True) as t:
                    t.unpin(node_id, self._owner)
                    self._held -= 1

        return PrefixMatch(matched, loader, releaser, source="RadixStore", layer_loader=layer_loader)

    @classmethod
    def _load_slices(cls, slices, layout: KVLayout, n_tokens: int, device: torch.device):
        """Copy the tokens of ``slices`` (token-major, contiguous runs) to ``device``, then gather to packed order."""
        staging = torch.empty(cls._blob_shape(layout, n_tokens), dtype=layout.dtype, device=device)
        non_blocking = device.type == "cuda"
        pos = 0
        for blob, offset, used in slices:
            take = min(used, n_tokens - pos)
            if take <= 0:
                break
            staging[pos:pos + take].copy_(blob[offset:offset + take], non_blocking=non_blocking)
            pos += take
        event = None
        if non_blocking:  # release() waits for it before the host blobs may be evicted
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return from_chunk_major(staging, n_tokens), event

    @staticmethod
    def _load_layers(slices, layout: KVLayout, n_tokens: int, device: torch.device,
                     stream: "torch.cuda.Stream | None") -> tuple[LayerwiseLoad, torch.Tensor]:
        """Enqueue the layer-wise load of ``slices`` on ``stream`` (see the module docstring); ``(load, staging)``.

        Everything is allocated on the current stream (the compute stream), then ``stream`` waits for that
        stream, so that memory the allocator handed back is no longer used by compute when a copy lands.
        Per layer: one ``memcpy_2d_async`` per run of tokens into the one staging buffer, one
        permute-copy, one event; consecutive nodes that slice one blob contiguously (the halves of a split)
        form one run. The staging is reused by every layer, which one in-order stream makes safe and costs
        nothing (the layers' copies run one after the other on the copy engine anyway). On the CPU
        (``stream`` ``None``) the same steps run synchronously.
        """
        layers, heads, head_dim = layout.num_layers, layout.kv_heads, layout.head_dim
        row = 2 * heads * head_dim  # one token's K and V of one layer, contiguous in a blob
        staging = torch.empty((n_tokens, 2, heads, head_dim), dtype=layout.dtype, device=device)
        staging_rows = staging.view(n_tokens, row)
        kvs = [torch.empty((2, 1, heads, n_tokens, head_dim), dtype=layout.dtype, device=device)
               for _ in range(layers)]
        events = [Event(device) for _ in range(layers)]
        runs: list[list] = []  # [blob, first token, tokens]: consecutive nodes cut from one blob merge into one run
        pos = 0
        for blob, offset, used in slices:
            take = min(used, n_tokens - pos)
            if take <= 0:
                break
            if runs and runs[-1][0] is blob and runs[-1][1] + runs[-1][2] == offset:
                runs[-1][2] += take  # a split node's halves: one copy, not two
            else:
                runs.append([blob, offset, take])
            pos += take
        pieces = []  # (blob rows [take, layers, row] on the host, staging rows [take, row])
        pos = 0
        for blob, offset, take in runs:
            pieces.append((blob[offset:offset + take].view(take, layers, row), staging_rows[pos:pos + take]))
            pos += take
        if pos != n_tokens:
            raise KVStreamError(f"RadixStore: the matched nodes hold {pos} tokens, the match {n_tokens}")
        unpermute = staging.permute(1, 2, 0, 3)  # [2, heads, tokens, head_dim]
        ctx = contextlib.nullcontext()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
            ctx = torch.cuda.stream(stream)
        try:
            with ctx:
                for layer in range(layers):
                    for src, dst in pieces:
                        memcpy_2d_async(dst, src[:, layer], stream)
                    kvs[layer].view(2, heads, n_tokens, head_dim).copy_(unpermute)
                    events[layer].record(stream)
        except BaseException:
            if stream is not None:  # copies in flight read pinned blobs: let them finish before unwinding
                stream.synchronize()
            raise
        load = LayerwiseLoad([kv[0] for kv in kvs], [kv[1] for kv in kvs], events, n_tokens, stream=stream)
        return load, staging

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
        with self._locked(write=True) as tree:
            if tree.layout is None:
                tree.layout = layout
            elif tree.layout != layout:
                raise LayoutError(f"RadixStore holds KV of layout {tree.layout}, got {layout}")
            path, matched = tree.walk(ids)
            if matched < start:
                return 0
            if matched == n:
                tree.touch(path)
                return n - start
            tree.touch(path)
            parent = tree.root
            if path:
                node, used = path[-1]
                parent = tree.split(node, used) if used < len(node.edge) else node
            per_token = layout.bytes_per_token()
            want = n - matched
            tree.pin(parent, _INSERT_OWNER)
            try:
                self._free(tree.evict(want * per_token, self.capacity_bytes))
            finally:
                tree.unpin(parent.id, _INSERT_OWNER)
            fit = min(want, max(0, self.capacity_bytes - tree.used_bytes) // per_token)
            if fit == 0:
                return matched - start
            name, blob = self._new_blob(layout, fit)
            try:
                lo = matched - start
                blob.copy_(chunk_major(keys, values, lo, lo + fit, 1), non_blocking=keys[0].is_cuda)
                if keys[0].is_cuda:
                    torch.cuda.current_stream(keys[0].device).synchronize()
            except BaseException:
                self._free([name])
                raise
            self._data[name] = blob
            tree.add_blob(name, fit, blob.numel() * blob.element_size())
            tree.add_child(parent, tuple(ids[matched:matched + fit]), name, 0)
            return matched + fit - start

    def pinned(self) -> int:
        """Pins this process holds (matches not yet released)."""
        return self._held

    def stats(self) -> dict:
        """Counts for tests and tables: nodes, blobs, tokens, used/capacity bytes, pinned nodes, pins (all owners)."""
        with self._locked(write=False) as tree:
            nodes = [n for n in tree.nodes.values() if n is not tree.root]
            return {"nodes": len(nodes), "blobs": len(tree.blobs), "tokens": sum(len(n.edge) for n in nodes),
                    "used_bytes": tree.used_bytes, "capacity_bytes": self.capacity_bytes,
                    "pinned_nodes": sum(1 for n in nodes if n.pins), "pins": sum(n.pin_count() for n in nodes)}

    def edges(self) -> list[tuple[int, ...]]:
        """Every stored root-to-leaf token sequence (for tests and debugging), sorted."""
        with self._locked(write=False) as tree:
            out = []

            def visit(node: _Node, prefix: tuple[int, ...]) -> None:
                """Collect the subtree's edges depth first."""
                seq = prefix + node.edge
                if not node.children and node is not tree.root:
                    out.append(seq)
                for child in node.children.values():
                    visit(child, seq)

            visit(tree.root, ())
            return sorted(out)

    def close(self) -> None:
        """Drop this process's view: its pins in a shared store are released, the files stay (see :meth:`unlink`).

        Idempotent.
        """
        if self._closed:
            return
        if self._dir is not None:
            with self._locked(write=True) as tree:
                for node in tree.nodes.values():
                    node.pins.pop(self._owner, None)
            os.close(self._lock_fd)
        self._data.clear()
        self._tree = _Tree()
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
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def shared_dir(shared_name: str, shm_dir: str | None = None) -> str:
        """The directory of the shared store ``shared_name``: ``<shm_dir or /dev/shm>/kvstream-radix-<name>``.

        Raises
        ------
        ConfigError
            If the name is not a plain file name.
        """
        if not shared_name or "/" in shared_name or shared_name.startswith("."):
            raise ConfigError(f"shared_name must be a plain name, got {shared_name!r}")
        base = shm_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        return os.path.join(base, f"kvstream-radix-{shared_name}")

    @classmethod
    def remove_shared(cls, shared_name: str, shm_dir: str | None = None) -> bool:
        """Delete the shared store ``shared_name`` without attaching to it; ``True`` if it existed."""
        path = cls.shared_dir(shared_name, shm_dir)
        existed = os.path.isdir(path)
        shutil.rmtree(path, ignore_errors=True)
        return existed


__all__ = ["RadixStore"]
