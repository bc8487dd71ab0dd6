"""The shared-memory mode of :class:`~kvstream.stores.radix.RadixStore`: one store for the processes of a host.

A shared store is a directory in a tmpfs (``/dev/shm/kvstream-radix-<name>/``, i.e. POSIX shared memory):

* ``blob-<name>`` files hold the blobs (token-major KV), reserved with ``posix_fallocate`` (a full tmpfs
  is a :class:`~kvstream.errors.CapacityError`, not a ``SIGBUS``) and mapped with ``mmap``;
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

What is in the directory is not trusted further than it must be: the directory is created ``0700`` and
refused (:class:`~kvstream.errors.ConfigError`) when it is a symlink, another user's, or writable by
group or others; files are opened with ``O_NOFOLLOW``; only blob names the store writes
(:data:`BLOB_NAME`, 32 hex digits) are ever opened or unlinked, and a blob that is missing, not a regular
file or shorter than the index says is never mapped (:meth:`SharedTree.map_blob` raises
:class:`~kvstream.errors.CorruptChunkError`; the store's lookup stops its match before it). Other entries
(stray files, directories) are left alone. An index that does not decode into a consistent tree is a
``CorruptChunkError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import stat
import tempfile
import uuid
from typing import Iterator

import torch

from ...errors import CapacityError, ConfigError, CorruptChunkError, TransportError
from ...layout import KVLayout
from .tree import Tree

#: Version of ``index.json``; a store of another version is refused.
INDEX_FORMAT = 1
#: The blob names the store writes (:func:`new_blob_name`); no other name in an index is opened or unlinked.
BLOB_NAME = re.compile(r"[0-9a-f]{32}")
#: Longest ``shared_name``: the directory name ``kvstream-radix-<name>`` must fit NAME_MAX (255 bytes).
MAX_NAME_BYTES = 200
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def new_blob_name() -> str:
    """A fresh blob name: 32 lowercase hex digits (:data:`BLOB_NAME`)."""
    return uuid.uuid4().hex


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
        If the name is not a plain file name (empty, with ``/`` or NUL, starting with ``.``, or longer than
        :data:`MAX_NAME_BYTES` bytes).
    """
    if (not isinstance(shared_name, str) or not shared_name or "/" in shared_name or "\x00" in shared_name
            or shared_name.startswith(".") or len(shared_name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES):
        raise ConfigError(f"shared_name must be a plain file name (no '/' or NUL, not starting with '.', at most "
                          f"{MAX_NAME_BYTES} bytes), got {shared_name!r}")
    base = shm_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    return os.path.join(base, f"kvstream-radix-{shared_name}")


def secure_dir(directory: str) -> None:
    """Create the store's directory ``0700`` if missing; refuse one that another user could have planted.

    Raises
    ------
    ConfigError
        If ``directory`` (or its parent) cannot be created, is a symlink or not a directory, belongs to
        another user, or is writable by group or others. The message names the path and the fix.
    """
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        st = os.lstat(directory)
    except OSError as e:
        raise ConfigError(f"Shared RadixStore: cannot create its directory {directory}: {e}") from None
    fix = f"remove it (RadixStore.remove_shared, or rm -r {directory}) or choose another shared_name or shm_dir"
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise ConfigError(f"Shared RadixStore directory {directory} is {kind}: {fix}")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"Shared RadixStore directory {directory} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.geteuid()}): {fix}")
    if st.st_mode & 0o022:
        raise ConfigError(f"Shared RadixStore directory {directory} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): chmod 700 {directory}, or {fix}")


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
        A directory that :func:`secure_dir` refuses, a lock file that cannot be opened, or (from
        :meth:`locked`) an index of another format or capacity.
    CorruptChunkError
        (From :meth:`locked`.) An index that does not decode into a consistent tree.
    """

    def __init__(self, directory: str, name: str, capacity_bytes: int):
        self.directory = directory
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.owner = owner_id()
        self.tree = Tree()
        self._generation = -1
        secure_dir(directory)
        lock = os.path.join(directory, "lock")
        try:
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        except OSError as e:
            raise ConfigError(f"Shared RadixStore {name!r}: cannot open its lock file {lock}: {e}; remove the "
                              f"store (RadixStore.remove_shared({name!r}))") from None
        try:
            with self.locked(write=True):
                self._remove_orphans()
        except BaseException:
            os.close(self._lock_fd)
            raise

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
            doc = self._read_index()
            if doc is None:
                self.tree = Tree()
            else:
                if doc.get("format") != INDEX_FORMAT:
                    raise ConfigError(f"{self.directory}: index format {doc.get('format')}, this kvstream reads "
                                      f"{INDEX_FORMAT}")
                if doc.get("capacity_bytes") != self.capacity_bytes:
                    raise ConfigError(f"Shared RadixStore {self.name!r} has capacity_bytes="
                                      f"{doc.get('capacity_bytes')}, this process asked for {self.capacity_bytes}")
                self.tree = self._decode_index(doc)
            self._generation = generation
        self._reap_dead_owners()

    def _corrupt(self, what: str) -> CorruptChunkError:
        return CorruptChunkError(f"Shared RadixStore {self.name!r}: {self._index_path()} {what}; remove the store "
                                 f"(RadixStore.remove_shared({self.name!r})) and fill it again")

    def _read_index(self) -> dict | None:
        """The index document (``None`` if there is none yet), read without following a symlink."""
        try:
            fd = os.open(self._index_path(), os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._corrupt(f"cannot be opened ({e.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._corrupt("is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                doc = json.load(f)
        except (ValueError, RecursionError) as e:
            raise self._corrupt(f"is not valid JSON ({type(e).__name__}: {e})") from None
        finally:
            os.close(fd)
        if not isinstance(doc, dict):
            raise self._corrupt("is not a JSON object")
        return doc

    def _decode_index(self, doc: dict) -> Tree:
        """The tree of an index document, checked: every node slices a blob it fits in, every blob's bytes
        are its tokens' (blob *names* are checked where a file is touched: :meth:`blob_path`)."""
        try:
            tree = Tree.from_json(doc)
            tree.layout = None if doc["layout"] is None else KVLayout.from_dict(doc["layout"])
            tree.namespace = doc.get("namespace", None if doc["layout"] is None else "")
            for name, (tokens, nbytes, _) in tree.blobs.items():
                if not isinstance(name, str) or tokens <= 0 or nbytes != tokens * tree.layout.bytes_per_token():
                    raise ValueError(f"blob {name!r}: {tokens} tokens in {nbytes} bytes")
            for node in tree.nodes.values():
                if node is not tree.root and not (0 <= node.offset and node.offset + len(node.edge)
                                                  <= tree.blobs[node.blob][0]):
                    raise ValueError(f"node {node.id} slices [{node.offset}, +{len(node.edge)}) of blob {node.blob!r}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
            raise self._corrupt(f"does not decode into a consistent tree ({type(e).__name__}: {e})") from None
        return tree

    def _save_index(self) -> None:
        tree = self.tree.to_json()
        doc = {"format": INDEX_FORMAT, "capacity_bytes": self.capacity_bytes, "tick": tree["tick"],
               "next_id": tree["next_id"], "layout": None if self.tree.layout is None else self.tree.layout.to_dict(),
               "namespace": self.tree.namespace,
               "blobs": tree["blobs"], "nodes": tree["nodes"]}
        tmp = os.path.join(self.directory, f"index.{self.owner.replace(':', '-')}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600), "w") as f:
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
        """Blob files no index entry refers to: left by a process that died inside an update.

        Only files (or symlinks, which ``unlink`` removes, never their targets) named like the blobs the
        store writes; anything else in the directory is left alone.
        """
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name[5:]
                if (entry.name.startswith("blob-") and BLOB_NAME.fullmatch(name) and name not in self.tree.blobs
                        and not entry.is_dir(follow_symlinks=False)):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    # -- blob files --------------------------------------------------------------------------------------
    def blob_path(self, name: str) -> str:
        """The file of blob ``name``.

        Raises
        ------
        CorruptChunkError
            If ``name`` is not one the store writes (:data:`BLOB_NAME`): a planted index entry.
        """
        if not isinstance(name, str) or not BLOB_NAME.fullmatch(name):
            raise CorruptChunkError(f"Shared RadixStore {self.name!r}: the index names blob {name!r}, which is not a "
                                    f"name this store writes (32 hex digits); it is never opened")
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
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

    def map_blob(self, name: str, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
                 writable: bool) -> torch.Tensor:
        """Map blob ``name``'s file as a host tensor of ``shape`` and ``dtype`` (``nbytes`` long).

        Writable mappings are shared (the writer fills the blob); read-only ones are private. The file is
        opened with ``O_NOFOLLOW`` and must be a regular file of at least ``nbytes`` bytes (a shorter one
        would raise ``SIGBUS`` on access).

        Raises
        ------
        CorruptChunkError
            If the name is not one the store writes, or the file is missing, a symlink, not a regular file
            or too short.
        """
        path = self.blob_path(name)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _NOFOLLOW)
        except OSError as e:
            raise CorruptChunkError(f"Shared RadixStore {self.name!r}: cannot open blob {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < nbytes:
                raise CorruptChunkError(f"Shared RadixStore {self.name!r}: blob {path} is not a regular file of "
                                        f"{nbytes} bytes")
            if nbytes == 0:
                return torch.empty(shape, dtype=dtype)
            mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED if writable else mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return torch.frombuffer(mapped, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps the map

    def delete_blob(self, name: str) -> None:
        """Unlink blob ``name``'s file (processes that map it keep reading it); a name the store does not
        write is never unlinked, and a failed unlink leaves an orphan for the next attach to remove."""
        if isinstance(name, str) and BLOB_NAME.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(self.blob_path(name))


__all__ = ["SharedTree", "shared_dir", "secure_dir", "remove_dir", "owner_id", "owner_alive", "new_blob_name",
           "BLOB_NAME", "INDEX_FORMAT"]
