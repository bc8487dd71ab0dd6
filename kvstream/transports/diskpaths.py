"""Where a :class:`~kvstream.transports.disk.DiskTransport` key lives, reached without following links.

A key ``a/b/c`` is the file ``<root>/a/b/c.kvc``. Every walk starts at a descriptor of the root opened
once and opens each directory below it with ``O_NOFOLLOW`` (``openat``), and files are created,
renamed, stat'ed and unlinked relative to their directory's descriptor: a symbolic link planted inside
the root (a directory part or the file itself) is refused with a :class:`~kvstream.errors.TransportError`,
so no flush can write, and no fetch read, outside the root, even when the link appears during the walk.

Temp files (``<root>/.tmp``) that a writer killed mid-flush left behind are removed by
:meth:`DiskRoot.sweep_temp` once their mtime is older than a bound. A file renamed into the temp
directory with its old mtime (a store's GC grave, ``*.grave``) is aged from the rename (its ctime), so a
grave that a GC may still put back is never swept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path
from typing import Iterator

from ..errors import ChunkNotFound, ConfigError, LayoutError, TransportError

#: File name suffix of a stored chunk.
SUFFIX = ".kvc"
#: Directory under the root that holds files being written (skipped by key listings).
TMP_DIR = ".tmp"
#: Temp files older than this (seconds) are leftovers of a writer that died (a write takes seconds).
TEMP_MAX_AGE_S = 3600.0
#: Suffix of files renamed into the temp directory to be deleted (aged from the rename).
GRAVE_SUFFIX = ".grave"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def key_parts(key: str) -> list[str]:
    """The path parts of ``key`` (a string :meth:`Transport._check_key` accepted); the last one is the file's
    name without :data:`SUFFIX`.

    Raises
    ------
    LayoutError
        For keys that cannot map to a file safely: empty, ``.`` or ``..`` parts, NUL, parts over 250
        bytes, the temp directory, or a directory part ending in :data:`SUFFIX`.
    """
    parts = key.split("/")
    for p in parts:
        if p in ("", ".", "..") or "\x00" in p or len(p.encode("utf-8", "surrogatepass")) > 250:
            raise LayoutError(f"Invalid chunk key {key!r}: part {p!r} is empty, '.', '..', has NUL or is too long")
    if parts[0] == TMP_DIR:
        raise LayoutError(f"Invalid chunk key {key!r}: {TMP_DIR!r} is the store's temp directory")
    if any(p.endswith(SUFFIX) for p in parts[:-1]):
        raise LayoutError(f"Invalid chunk key {key!r}: a directory part may not end in {SUFFIX!r}")
    return parts


class DiskRoot:
    """The root directory of a disk store, held open; every path under it is walked without following links.

    Parameters
    ----------
    root : Path
        The directory (created if missing, with :data:`TMP_DIR` in it). The root itself may be a link.

    Raises
    ------
    ConfigError
        If the root or its temp directory cannot be created or opened, or the temp directory is a link.
    """

    def __init__(self, root: Path):
        self.path = root
        try:
            os.makedirs(root / TMP_DIR, exist_ok=True)
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"DiskTransport cannot create its directory {root / TMP_DIR}: {e}") from e
        try:
            self.tmp_fd = self._step(self.fd, TMP_DIR, root / TMP_DIR, create=False)
        except (TransportError, ChunkNotFound) as e:
            os.close(self.fd)
            raise ConfigError(f"DiskTransport cannot use {root / TMP_DIR}: {e}") from e

    def close(self) -> None:
        """Close the descriptors of the root and its temp directory (idempotent)."""
        for name in ("tmp_fd", "fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _step(self, dir_fd: int, name: str, where: Path, create: bool) -> int:
        """Open directory ``name`` in ``dir_fd`` without following a link (making it if ``create``)."""
        for _ in range(2):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                if not create:
                    raise ChunkNotFound(f"no directory {where}") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                try:
                    is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    is_link = False
                if is_link:
                    raise TransportError(f"{where} is a symbolic link: DiskTransport does not follow links inside "
                                         f"its root {self.path} (a flush could write outside it)") from None
                raise ChunkNotFound(f"{where} is not a directory") from None
        raise TransportError(f"{where} keeps disappearing while it is created")

    def open_dir(self, parts: list[str], *, create: bool) -> int:
        """A descriptor of ``<root>/<parts...>`` (the caller closes it); directories are made if ``create``.

        Raises
        ------
        ChunkNotFound
            A directory is missing (without ``create``) or a part is a file.
        TransportError
            A part is a symbolic link.
        OSError
            Creating or opening a directory failed otherwise (a full or read-only disk).
        """
        fd = os.dup(self.fd)
        where = self.path
        try:
            for p in parts:
                where = where / p
                nxt = self._step(fd, p, where, create)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_chunk(self, parts: list[str]) -> int:
        """A read descriptor of the chunk file of the key with ``parts`` (the caller closes it).

        Raises
        ------
        ChunkNotFound
            No such file (or a directory part is missing or a file).
        TransportError
            A part or the file is a symbolic link.
        """
        where = self.path.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        dfd = self.open_dir(parts[:-1], create=False)
        try:
            return self.open_file(dfd, parts[-1] + SUFFIX, where)
        finally:
            os.close(dfd)

    def place(self, tmp_name: str, parts: list[str], *, fsync: bool) -> None:
        """Rename the temp file ``tmp_name`` over the chunk file of the key with ``parts`` (atomic),
        making its directories; with ``fsync`` the rename is made durable too.

        Raises
        ------
        TransportError
            A part is a symbolic link or a file, or (``fsync``) the directory could not be synced.
        OSError
            Creating the directories or renaming failed (a full disk).
        """
        where = self.path.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        try:
            dfd = self.open_dir(parts[:-1], create=True)
        except ChunkNotFound as e:  # a directory part is a file
            raise TransportError(f"Cannot write {where}: {e}") from None
        try:
            os.replace(tmp_name, parts[-1] + SUFFIX, src_dir_fd=self.tmp_fd, dst_dir_fd=dfd)
            if fsync:
                try:
                    os.fsync(dfd)
                except OSError as e:
                    raise TransportError(f"{where} is in place but its directory could not be synced: {e}") from e
        finally:
            os.close(dfd)

    def in_dir(self, parts: list[str], op, *, missing):
        """``op(dir_fd, file name)`` in the directory of the key with ``parts``, reached without links;
        ``missing`` if that directory or (``FileNotFoundError`` from ``op``) the file does not exist."""
        try:
            dfd = self.open_dir(parts[:-1], create=False)
        except ChunkNotFound:
            return missing
        try:
            return op(dfd, parts[-1] + SUFFIX)
        except FileNotFoundError:
            return missing
        finally:
            os.close(dfd)

    def open_file(self, dir_fd: int, name: str, where: Path) -> int:
        """Open the regular file ``name`` in ``dir_fd`` for reading, refusing a link.

        Raises
        ------
        ChunkNotFound
            No such file.
        TransportError
            It is a symbolic link, or cannot be opened.
        """
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            raise ChunkNotFound(f"no file {where}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise TransportError(f"{where} is a symbolic link: DiskTransport does not follow links inside "
                                     f"its root {self.path}") from None
            raise TransportError(f"Cannot open {where}: {e}") from e

    def sweep_temp(self, max_age_s: float, now: float | None = None) -> int:
        """Delete regular files in the temp directory older than ``max_age_s`` seconds (see the module
        docstring); returns how many.

        Best effort: a file removed meanwhile or a read-only disk is not an error.
        """
        now = time.time() if now is None else now
        removed = 0
        try:
            names = os.listdir(self.tmp_fd)
        except OSError:
            return 0
        for name in names:
            try:
                st = os.stat(name, dir_fd=self.tmp_fd, follow_symlinks=False)
                changed = max(st.st_mtime, st.st_ctime) if name.endswith(GRAVE_SUFFIX) else st.st_mtime
                if stat.S_ISDIR(st.st_mode) or now - changed <= max_age_s:
                    continue
                os.unlink(name, dir_fd=self.tmp_fd)
                removed += 1
            except OSError:
                continue
        return removed

    def walk(self, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
        """``(key, directory entry)`` of every chunk file whose key starts with ``prefix``; never enters a link."""
        dirs = prefix.split("/")[:-1]  # directories the prefix names in full
        if any(p in ("", ".", "..") for p in dirs) or (dirs and dirs[0] == TMP_DIR):
            return
        try:
            os.close(self.open_dir(dirs, create=False))
        except (ChunkNotFound, TransportError, OSError):
            return
        stack = [(os.path.join(self.path, *dirs), "/".join(dirs))]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                name = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    if name != TMP_DIR and (name.startswith(prefix) or prefix.startswith(name + "/")):
                        stack.append((e.path, name))
                elif e.name.endswith(SUFFIX) and name[:-len(SUFFIX)].startswith(prefix):
                    yield name[:-len(SUFFIX)], e

    def entries(self, prefix: str) -> Iterator[tuple[str, Path, os.stat_result]]:
        """:meth:`walk` as ``(key, file, stat)`` (the stat taken as the walk passes); files removed meanwhile
        are skipped."""
        for key, e in self.walk(prefix):
            try:
                yield key, Path(e.path), e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue

    def is_file(self, parts: list[str]) -> bool:
        """Whether the key with ``parts`` is a regular file (not a link); ``False`` if missing."""
        return self.in_dir(parts, lambda dfd, name: stat.S_ISREG(os.stat(name, dir_fd=dfd,
                                                                         follow_symlinks=False).st_mode),
                           missing=False)

    def unlink(self, parts: list[str]) -> bool:
        """Unlink the key with ``parts``; ``True`` if it existed."""
        def _op(dfd: int, name: str) -> bool:
            os.unlink(name, dir_fd=dfd)
            return True
        return self.in_dir(parts, _op, missing=False)

    def touch(self, parts: list[str]) -> bool:
        """Set the key's file's mtime to now; ``False`` if it is missing."""
        def _op(dfd: int, name: str) -> bool:
            os.utime(name, dir_fd=dfd, follow_symlinks=False)
            return True
        return self.in_dir(parts, _op, missing=False)


__all__ = ["SUFFIX", "TMP_DIR", "TEMP_MAX_AGE_S", "GRAVE_SUFFIX", "key_parts", "DiskRoot"]
