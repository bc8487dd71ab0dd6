"""Pins across processes and hosts for a store of files: one small pin file per match in ``<root>/.pins``.

A lookup writes ``<root>/.pins/<host>-<pid>-<id>.pin`` listing the chunk names it is about to use
(atomically: a temp file renamed into place) *before* it checks which chunks exist; the GC reads every
live pin file before it removes a chunk (:class:`~kvstream.stores.chunk_file.ChunkFileStore`). A pin
file older than the lease is taken as left by a dead reader and ignored (and deleted) by the GC.

A read-only or full disk cannot hold a pin file. Lookups must still work there (a read-only shared
store serves readers), so pinning degrades: the match is pinned in this process only, the failure is
counted (:attr:`PinFiles.failures`) and logged once, and no temp file is left behind. Without its pin
file a match can lose a chunk to another host's GC while it loads; the load then shortens the match,
as for any missing chunk: wrong KV is never returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

#: Directory under the root holding pin files.
PINS_DIR = ".pins"


class PinFiles:
    """The pin files of one store root.

    Parameters
    ----------
    pins_dir, tmp_dir : Path
        Where pin files live, and the temp directory (same filesystem) they are written in first.
    lease_s : float
        Age after which a pin file is taken as a dead reader's.
    """

    def __init__(self, pins_dir: Path, tmp_dir: Path, lease_s: float):
        self.dir, self.tmp_dir, self.lease_s = pins_dir, tmp_dir, float(lease_s)
        self.failures = 0
        self.last_error: OSError | None = None
        self._host = socket.gethostname().replace("/", "_")
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:  # a read-only store: lookups pin in-process only
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        if self.failures == 0:
            logger.warning("kvstream: cannot write pin files under %s (%s); matches are pinned in this process "
                           "only, and a GC on another host may shorten them while they load", self.dir, error)
        self.failures += 1
        self.last_error = error

    def write(self, names: list[str]) -> Path | None:
        """Write a pin file listing ``names``; ``None`` if the disk refused it (degraded, see the module
        docstring). Never leaves a temp file."""
        name = f"{self._host}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp = self.tmp_dir / f"pin-{name}.tmp"
        final = self.dir / f"{name}.pin"
        try:
            tmp.write_text("\n".join(names))
            os.replace(tmp, final)
            return final
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._failed(e)
            return None

    @staticmethod
    def release(pin_file: Path | None) -> None:
        """Delete a pin file :meth:`write` made (best effort: a read-only disk keeps it until its lease ends)."""
        if pin_file is not None:
            with contextlib.suppress(OSError):
                pin_file.unlink(missing_ok=True)

    def live(self, now: float, *, reap: bool) -> set[str]:
        """Names listed by pin files younger than the lease (any process, any host); older ones are
        deleted when ``reap``."""
        pinned: set[str] = set()
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return pinned
        for e in entries:
            if not e.name.endswith(".pin"):
                continue
            try:
                if now - e.stat().st_mtime > self.lease_s:
                    if reap:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                    continue
                with open(e.path) as f:
                    pinned.update(f.read().split())
            except FileNotFoundError:  # released meanwhile
                continue
        return pinned


__all__ = ["PINS_DIR", "PinFiles"]
