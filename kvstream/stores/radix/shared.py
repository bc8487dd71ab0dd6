"""The shared-memory mode of :class:`~kvstream.stores.radix.RadixStore`: one store for the processes of a host.

A shared store is a directory in a tmpfs (``/dev/shm/kvstream-radix-<name>/``, i.e. POSIX shared memory):

* ``blob-<name>`` files hold the blobs (token-major KV), reserved with ``posix_fallocate`` (a full tmpfs
  is a :class:`~kvstream.errors.CapacityError`, not a ``SIGBUS``) and mapped with ``torch.from_file``;
* ``index.json`` holds the tree (:meth:`~kvstream.stores.radix.tree.Tree.to_json`) with the store's
  capacity and layout, replaced atomically (temp file + rename);
* ``lock`` is the file every operation ``flock``\\ s exclusively (Vineyard serializes its tree the same
  way, through ``llm_cache_sync_lock``); its first 8 bytes count the index's generations, so a process
  re-reads the index only when another one changed it.

Pins are counted per owner process (``pid:start-time``); the pins of a process that died are dropped
the next time any process takes the lock, so a crash cannot leak them. Blob files no index entry names
(left by a process that died inside an update) are removed when a process attaches. Evicted blob files
are unlinked; a process that still maps one keeps reading valid memory (Linux keeps unlinked pages until
the last unmap). Each operation reads and writes the index, so metadata costs grow with the tree
(Vineyard's etcd sync has the same cost on a larger scale).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch

from ...errors import CapacityError, ConfigError, TransportError
from ...layout import KVLayout
from .tree import Tree

#: Version of ``index.json``; a store of another version is refused.
INDEX_FORMAT = 1


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # field 22 (starttime), counted after the parenthesised command name, which may hold spaces
    return stat.rsplit(")", 1)[1].split()[19]


def owner_id() -> str:
    """This process as a pin owner: ``"<pid>:<start time>"`` (a reused pid has another start time)."""
    pid = os.getpid()
    return f"{pid}:{_start_time(pid) or 0}"


def owner_alive(owner: str) -> bool:
    """Whether the process named by :func:`owner_id`'s string still runs."""
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
    return actual is None or start == "0" or actual == start


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


def remove_dir(path: str) -> bool:
    """Delete a shared store's directory; ``True`` if it existed."""
    existed = os.path.isdir(path)
    shutil.rmtree(path, ignore_errors=True)
    return existed


class SharedTree:
    """One process's handle on a shared store's directory: the lock, the index and the blob files.

    Parameters
    ----------
    directory : str
        From :func:`shared_dir`; created if missing.
    name : str
        The store's ``shared_name`` (for messages).
    capacity_bytes : int
        What this process asks for; every process of one store must ask for the same.

    Raises
    ------
    ConfigError
        (From :meth:`locked`.) An index of another format, or of another capacity.
    """

    def __init__(self, directory: str, name: str, capacity_bytes: int):
        self.directory = directory
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.owner = owner_id()
        self.tree = Tree()
        self._generation = -1
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        with self.locked(write=True):
            self._remove_orphans()

    @contextlib.contextmanager
    def locked(self, write: bool) -> Iterator[Tree]:
        """Hold the store's ``flock`` with the index read in (dead owners' pins dropped); yields the tree.

        With ``write``, the index is written back when the block ends, also after an error (evictions
        done before it must reach the index). Not reentrant; the caller serializes its threads.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._load_index()
            try:
                yield self.tree
            finally:
                if write:
                    self._save_index()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Drop this process's pins and close the lock file; the store's files stay."""
        with self.locked(write=True) as tree:
            tree.drop_pins(self.owner)
        os.close(self._lock_fd)

    # -- the index ---------------------------------------------------------------------------------------
    def _index_path(self) -> str:
        return os.path.join(self.directory, "index.json")

    def _load_index(self) -> None:
        raw = os.pread(self._lock_fd, 8, 0)
        generation = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if generation != self._generation:
            if os.path.exists(self._index_path()):
                with open(self._index_path(), "rb") as f:
                    doc = json.load(f)
                if doc.get("format") != INDEX_FORMAT:
                    raise ConfigError(f"{self.directory}: index format {doc.get('format')}, this kvstream reads "
                                      f"{INDEX_FORMAT}")
                if int(doc["capacity_bytes"]) != self.capacity_bytes:
                    raise ConfigError(f"Shared RadixStore {self.name!r} has capacity_bytes="
                                      f"{doc['capacity_bytes']}, this process asked for {self.capacity_bytes}")
                self.tree = Tree.from_json(doc)
                self.tree.layout = None if doc["layout"] is None else KVLayout.from_dict(doc["layout"])
                self.tree.namespace = doc.get("namespace", None if doc["layout"] is None else "")
            else:
                self.tree = Tree()
            self._generation = generation
        self._reap_dead_owners()

    def _save_index(self) -> None:
        tree = self.tree.to_json()
        doc = {"format": INDEX_FORMAT, "capacity_bytes": self.capacity_bytes, "tick": tree["tick"],
               "next_id": tree["next_id"], "layout": None if self.tree.layout is None else self.tree.layout.to_dict(),
               "namespace": self.tree.namespace,
               "blobs": tree["blobs"], "nodes": tree["nodes"]}
        tmp = os.path.join(self.directory, f"index.{self.owner.replace(':', '-')}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, self._index_path())
        self._generation += 1
        os.pwrite(self._lock_fd, self._generation.to_bytes(8, "little"), 0)

    def _reap_dead_owners(self) -> None:
        alive: dict[str, bool] = {}
        for node in self.tree.nodes.values():
            for owner in list(node.pins):
                if owner == self.owner:
                    continue
                if owner not in alive:
                    alive[owner] = owner_alive(owner)
                if not alive[owner]:
                    del node.pins[owner]

    def _remove_orphans(self) -> None:
        """Blob files no index entry refers to: left by a process that died inside an update."""
        for entry in os.scandir(self.directory):
            if entry.name.startswith("blob-") and entry.name[5:] not in self.tree.blobs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # -- blob files --------------------------------------------------------------------------------------
    def blob_path(self, name: str) -> str:
        """The file of blob ``name``."""
        return os.path.join(self.directory, f"blob-{name}")

    def create_blob(self, name: str, nbytes: int) -> str:
        """Create blob ``name``'s file with ``nbytes`` reserved; returns its path.

        Raises
        ------
        CapacityError
            If the tmpfs has no room (nothing is left behind).
        TransportError
            On another error creating the file.
        """
        path = self.blob_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve tmpfs pages now: a full tmpfs is an error, not a SIGBUS
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CapacityError(f"Shared RadixStore {self.name!r}: no room for a {nbytes}-byte blob in "
                                    f"{self.directory} ({e.strerror})") from None
            raise TransportError(f"Shared RadixStore {self.name!r}: cannot create {path}: {e}") from None
        os.close(fd)
        return path

    @staticmethod
    def map_blob(path: str, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], writable: bool) -> torch.Tensor:
        """Map a blob file as a host tensor of ``shape`` and ``dtype`` (``nbytes`` long); shared when ``writable``."""
        raw = torch.from_file(path, shared=writable, size=nbytes, dtype=torch.uint8)
        return raw.view(dtype).view(shape)

    def delete_blob(self, name: str) -> None:
        """Unlink blob ``name``'s file (processes that map it keep reading it)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(name))


__all__ = ["SharedTree", "shared_dir", "remove_dir", "owner_id", "owner_alive", "INDEX_FORMAT"]
