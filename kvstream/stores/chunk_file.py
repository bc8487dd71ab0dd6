"""The token-chunk-hash file store: fixed chunks of tokens as files named by chained prefix hashes.

Design (after Vineyard's file cache, v6d ``modules/llm-cache``, and LMCache's chunk hashing):

* A sequence is cut into chunks of ``chunk_tokens`` tokens; chunk ``i`` is named by the chained hash of
  the whole prefix up to its end (:func:`~kvstream.stores.hashing.prefix_hashes`), laid out as nested
  directories (key ``44/c3/44c3...``). A trailing partial chunk is not stored. The longest stored
  prefix is the run of chunk files that exist, from the first.
* Files are written and read by :class:`~kvstream.transports.disk.DiskTransport`: a 4096-byte
  :class:`~kvstream.chunk.ChunkHeader` (dtype, shape, region, xxh3 checksum) then the payload
  ``[layers, 2, 1, kv_heads, chunk_tokens, head_dim]`` (:func:`kvstream.kernels.pack_tokens`'s order),
  written to a temp file and renamed into place (atomic), verified on every read. Several processes or
  hosts writing the same chunk each write their own temp file; the last rename wins and readers only
  ever see a complete file (rename is the only atomic operation assumed of the filesystem, as on NFS or
  Lustre). A full disk raises :class:`~kvstream.errors.CapacityError` and leaves no partial file.
* A chunk that fails its checks at load time (checksum, header, the key it was written under, the
  model's geometry) shortens the match to the chunks before it (the caller recomputes the rest) and is
  deleted, so the next update rewrites it and later requests do not fail on it again; wrong KV is never
  returned. The first chunk's header is checked against the bound model before the match's memory is
  allocated. Each header also carries one checksum per layer, so loads read every layer of every file in
  parallel and verify each before it moves on to the device (:mod:`.chunk_read`).
* **Which model.** Keys are hashed under the store's namespace: the fingerprint of the model's config
  (:mod:`kvstream.stores.identity`), so another model never matches this one's prefixes.
* **Access times** are recorded by the store itself: a successful read sets the file's mtime to now
  (``os.utime``); atime is not relied on (``noatime``/``relatime`` mounts). The **GC** walks the
  transport's files (:meth:`~kvstream.transports.disk.DiskTransport.entries`) and deletes chunks whose
  mtime is older than ``ttl_s`` (:meth:`ChunkFileStore.gc`, or every ``gc_interval_s`` on a background
  thread), and temp files left by writers that died.
* **Pins across processes and hosts** (:mod:`.pins`). A lookup first writes a pin file listing the chunk
  keys it is about to use, *then* checks which chunks exist; on a read-only or full disk it pins in this
  process only and still serves. The GC never unlinks a chunk directly: it renames it to a grave in ``<root>/.tmp``, re-reads the pin
  files, and puts the chunk back if a pin appeared in between, so a chunk a lookup reported stays
  readable until the match is released. A reader that finds a pinned chunk missing during that short
  window retries. A pin file older than ``pin_lease_s`` is ignored (and deleted) by the GC. On NFS, pin files must be visible to the GC host within the lease: mount
  with a short attribute cache (``actimeo``) or keep ``ttl_s`` well above it; clocks of the hosts must
  agree to within a small fraction of ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from ..chunk import slice_checksums
from ..errors import CapacityError, ChunkNotFound, ConfigError, CorruptChunkError, TransportError
from ..kernels import pack_tokens
from ..layout import KVLayout, Region
from ..transports.disk import TEMP_MAX_AGE_S, TMP_DIR, DiskTransport
from ..transports.diskpaths import GRAVE_SUFFIX
from ..transports.slices import DEFAULT_QUEUE_DEPTH
from .base import PinError, PrefixMatch, PrefixStore, check_kv, check_max_tokens
from .chunk_read import ChunkReads, probe_fetch
from .calibration import Calibration, device_copy_Bps
from .cost import COPY_CONTENTION, LOAD_SAFETY, TierCost
from .hashing import TokenIds, as_token_ids, nested_path, prefix_hashes
from .identity import ModelScope
from .pins import PINS_DIR, PinFiles

logger = logging.getLogger(__name__)
#: File beside the store holding its measured read cost (:mod:`kvstream.stores.cost`), by host and options.
COST_FILE = ".kvstream-cost.json"


class ChunkFileStore(ModelScope, PrefixStore):
    """Prefix store of fixed token chunks in files named by chained prefix hashes (local disk or a shared FS).

    Parameters
    ----------
    root : str or Path
        Directory of the store (created if missing); several processes and hosts may share it.
    chunk_tokens : int
        Tokens per chunk (Vineyard uses 16 or 32, LMCache 256). Smaller chunks match more of a prefix;
        larger ones make fewer, bigger files (faster I/O).
    namespace : str, optional
        Mixed into every key. Default: the fingerprint of ``config`` (or of the first model the store is
        used with: :mod:`kvstream.stores.identity`). An explicit namespace is used as is.
    config : transformers.PretrainedConfig, optional
        The model whose KV the store holds: its fingerprint is the namespace, its geometry is checked.
    dtype : torch.dtype, optional
        The KV dtype (default: the one ``config`` declares, if any).
    dir_levels, dir_chars : int
        Nested directories: ``dir_levels`` levels named by ``dir_chars`` hex digits of the key each.
    ttl_s : float, optional
        Time to live since the last access, for :meth:`gc`. ``None``: no GC unless :meth:`gc` is given one.
    gc_interval_s : float, optional
        Run :meth:`gc` on a background thread this often (needs ``ttl_s``).
    pin_lease_s : float
        Age after which the GC ignores a pin file (its reader is taken as dead).
    fsync, io_threads, direct, temp_max_age_s, queue_depth :
        Passed to :class:`~kvstream.transports.disk.DiskTransport` (the GC deletes temp files older than
        ``temp_max_age_s``, writers that died mid-write left them; ``queue_depth``: reads in flight of a load).
    slice_checksums : bool
        Write a checksum per layer into each chunk's header (default), so that loads verify and copy
        layer by layer (:mod:`.chunk_read`); ``False`` writes files as before, loaded whole and at once.

    Raises
    ------
    ConfigError
        For bad options or a root that cannot be created.

    Examples
    --------
    >>> store = ChunkFileStore("/mnt/shared/kv", chunk_tokens=256, config=model.config)  # doctest: +SKIP
    >>> store.update(out, cache)                 # after model.generate(..., cache=cache)  # doctest: +SKIP
    >>> with store.fetch_prefix(next_ids, device="cuda", max_tokens=next_ids.shape[1] - 1) as m:  # doctest: +SKIP
    ...     print(m.matched_tokens)
    """

    name = "chunk_file"

    def __init__(self, root: str | os.PathLike, chunk_tokens: int = 256, *, namespace: str | None = None,
                 config: Any = None, dtype: torch.dtype | None = None, dir_levels: int = 2, dir_chars: int = 2,
                 ttl_s: float | None = None, gc_interval_s: float | None = None, pin_lease_s: float = 600.0,
                 fsync: bool = False, io_threads: int = 4, direct: bool = False,
                 temp_max_age_s: float = TEMP_MAX_AGE_S, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 slice_checksums: bool = True):
        super().__init__()
        self._init_model(namespace, config, dtype)
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise ConfigError(f"ChunkFileStore chunk_tokens must be a positive int, got {chunk_tokens!r}")
        if dir_levels < 0 or dir_chars <= 0 or dir_levels * dir_chars > 32:
            raise ConfigError(f"ChunkFileStore: {dir_levels} directory levels of {dir_chars} hex digits do not fit "
                              "a 32-digit key")
        if ttl_s is not None and ttl_s < 0:
            raise ConfigError(f"ChunkFileStore ttl_s must be >= 0, got {ttl_s}")
        if gc_interval_s is not None and (gc_interval_s <= 0 or ttl_s is None):
            raise ConfigError(f"ChunkFileStore gc_interval_s={gc_interval_s} needs a positive interval and a ttl_s")
        if pin_lease_s <= 0:
            raise ConfigError(f"ChunkFileStore pin_lease_s must be > 0, got {pin_lease_s}")
        self.root = Path(root)
        self.chunk_tokens = chunk_tokens
        self.dir_levels, self.dir_chars = dir_levels, dir_chars
        self.ttl_s = ttl_s
        self.pin_lease_s = float(pin_lease_s)
        self.slice_checksums = bool(slice_checksums)
        self._transport = DiskTransport(self.root, fsync=fsync, io_threads=io_threads, direct=direct,
                                        temp_max_age_s=temp_max_age_s, queue_depth=queue_depth)
        self._calibration = Calibration(self.root / COST_FILE, f"{socket.gethostname()}:"
                                        f"{'direct' if direct else 'buffered'}:qd{queue_depth}")
        self._tmp_dir = self.root / TMP_DIR
        self._pin_files = PinFiles(self.root / PINS_DIR, self._tmp_dir, self.pin_lease_s)
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()  # chunk key -> pins this process holds
        self._held = 0
        self._known_per_token: int | None = None  # bytes per token of the last header read
        self.last_gc_error: BaseException | None = None
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        if gc_interval_s is not None:
            self._gc_thread = threading.Thread(target=self._gc_loop, args=(float(gc_interval_s),),
                                               name="kvstream-chunk-gc", daemon=True)
            self._gc_thread.start()

    # -- keys and paths ----------------------------------------------------------------------------------
    def keys_for(self, token_ids: Any) -> list[str]:
        """Store keys (``"44/c3/44c3..."``) of the full chunks of ``token_ids``, in order."""
        return [nested_path(h, levels=self.dir_levels, chars=self.dir_chars)
                for h in prefix_hashes(token_ids, self.chunk_tokens, namespace=self.namespace)]

    def path(self, key: str) -> Path:
        """The file of a chunk key."""
        return self._transport.path(key)

    # -- pins --------------------------------------------------------------------------------------------
    @property
    def pin_file_failures(self) -> int:
        """Lookups whose pin file the disk refused (read-only or full): pinned in this process only."""
        return self._pin_files.failures

    def _pinned_hashes(self, now: float, *, reap: bool) -> set[str]:
        """Hashes named by live pin files (any process, any host) and by this process's pins."""
        pinned = self._pin_files.live(now, reap=reap)
        with self._lock:
            pinned.update(k.rsplit("/", 1)[-1] for k, n in self._pins.items() if n > 0)
        return pinned

    def pinned(self) -> int:
        """Matches of this process not yet released."""
        return self._held

    def pin_counts(self) -> dict[str, int]:
        """Pins this process holds, by chunk key (keys with a zero count are absent)."""
        with self._lock:
            return {k: n for k, n in self._pins.items() if n > 0}

    # -- the store interface -----------------------------------------------------------------------------
    def query(self, token_ids: Any) -> int:
        """Tokens in the run of stored chunks at the start of ``token_ids`` (existence only: no pin, no read)."""
        self._check_open()
        n = 0
        for key in self.keys_for(token_ids):
            if not self._transport.contains(key):
                break
            n += 1
        return n * self.chunk_tokens

    def lookup(self, token_ids: Any, *, max_tokens: int | None = None, defer_pins: bool = False) -> PrefixMatch:
        """Pin, then find, the run of stored chunks at the start of ``token_ids``; see :meth:`PrefixStore.lookup`.

        The match may end inside its last chunk when ``max_tokens`` says so (the whole chunk is read).
        ``defer_pins=True`` only finds the run (hashing and one ``stat`` per chunk): the pin file and the
        first chunk's header wait until the match is first used (:meth:`PrefixMatch.pin`), so a lookup
        whose match a plan does not load costs no write and no read.
        """
        self._check_open()
        ids = as_token_ids(token_ids)
        cap = check_max_tokens(max_tokens, len(ids))
        c = self.chunk_tokens
        wanted = min(math.ceil(cap / c), len(ids) // c)
        keys = self.keys_for(TokenIds(ids[:wanted * c]))
        if not keys:
            return PrefixMatch(0, None, None, source="ChunkFileStore")
        pin_file = None if defer_pins else self._pin_files.write([k.rsplit("/", 1)[-1] for k in keys])  # see pins.py
        found = 0
        for key in keys:
            if not self._transport.contains(key):
                break
            found += 1
        matched = min(found * c, cap)
        if matched == 0:
            PinFiles.release(pin_file)
            return PrefixMatch(0, None, None, source="ChunkFileStore")
        keys = keys[:found]
        reads: list[ChunkReads] = []  # the match's reads, once started (prefetch or load)
        pins: list = []  # the pin file, once the pins are taken

        def pin(match: PrefixMatch | None = None) -> None:
            """Take the match's pins (a deferred lookup's: its pin file first); a whole-file chunk loads at once."""
            pins.append(pin_file if match is None else self._pin_files.write([k.rsplit("/", 1)[-1] for k in keys]))
            with self._lock:
                self._pins.update(keys)
                self._held += 1
            if match is not None and match._layer_loader is not None:
                header = self._header(keys[0])
                if header is not None and slice_checksums(header) is None:
                    match._layer_loader = None

        def read(start: int) -> ChunkReads:
            """The match's reads from token ``start`` (a multiple of the chunk size), started on first use."""
            if not reads:
                reads.append(self._reads(keys[start // c:math.ceil(matched / c)]))
            return reads[0]

        def loader(device: torch.device, n_tokens: int, start: int = 0):
            """Read tokens ``[start, n_tokens)`` of the match onto a device; see PrefixMatch.load."""
            return read(start).packed(device, n_tokens - start), None

        def layer_loader(device: torch.device, n_tokens: int, stream, start: int = 0):
            """Read tokens ``[start, n_tokens)``, verified, then copy them layer by layer; see PrefixMatch.load_layers."""
            return read(start).layered(device, n_tokens - start, stream, start)

        def releaser() -> None:
            """Wait for reads still in flight, then release this match's pins on its chunks (never below zero)."""
            for r in reads:
                r.close()
            with self._lock:
                for key in keys:
                    if self._pins[key] <= 0:
                        raise PinError(f"ChunkFileStore: pin count of {key} would go below zero")
                for key in keys:
                    self._pins[key] -= 1
                    if self._pins[key] == 0:
                        del self._pins[key]
                self._held -= 1
            PinFiles.release(pins[0])

        if not defer_pins:
            pin()
        per_token = self.bytes_per_token() if defer_pins else None
        header = None if per_token is not None else self._header(keys[0])
        layered = header is None or slice_checksums(header) is not None  # no per-layer checksums: whole-file loads
        if header is not None:
            per_token = self._known_per_token = header.nbytes // c
        return PrefixMatch(matched, loader, releaser, source="ChunkFileStore", prefetcher=read,
                           layer_loader=layer_loader if layered else None, store=self, granularity=c,
                           bytes_per_token=per_token, pinner=pin if defer_pins else None)

    def _header(self, key: str):
        """The chunk's header, or ``None`` if it cannot be read (the reads will tell why)."""
        with contextlib.suppress(ChunkNotFound, CorruptChunkError, TransportError):
            return self._transport.describe(key)
        return None

    def bytes_per_token(self) -> int | None:
        """Bytes of KV per token, no chunk read: the bound model's geometry and dtype, else the last header's (or None)."""
        if self._geometry is not None and self._kv_dtype is not None:
            return math.prod(self._geometry) * 2 * torch.empty((), dtype=self._kv_dtype).element_size()
        return self._known_per_token

    def _drop_corrupt(self, key: str, error: Exception) -> None:
        logger.warning("ChunkFileStore: dropping corrupt chunk %s: %s", key, error)
        with contextlib.suppress(TransportError):
            self._transport.delete(key)

    def _reads(self, keys: list[str]) -> ChunkReads:
        return ChunkReads(self._transport, keys, self.chunk_tokens, drop=self._drop_corrupt,
                          touch=self._transport.touch, observe=self._calibration.observe,
                          expects=lambda shape, dtype: self.expects(shape, dtype, self.chunk_tokens))

    def read_cost(self, device: torch.device | str) -> TierCost:
        """The measured cost of a load onto ``device``: :attr:`tier_cost` if set, else this disk's fetch rate
        (measured once with a probe file, then cached beside the store in ``.kvstream-cost.json`` per host
        and I/O options, and replaced when observed loads drift) and the device's copy rate."""
        if self.tier_cost is not None:
            return self.tier_cost
        fetch = self._calibration.get()
        if fetch is None:
            fetch = self._calibration.set(*probe_fetch(self._transport), "probe")
        return TierCost(fetch_Bps=fetch["fetch_Bps"], copy_Bps=device_copy_Bps(torch.device(device)),
                        latency_s=fetch.get("latency_s", 0.0), file_tokens=self.chunk_tokens,
                        contention=COPY_CONTENTION, safety=LOAD_SAFETY)

    def update_kv(self, token_ids: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                  start: int = 0, overwrite: bool = False) -> int:
        """Write the full chunks of ``token_ids[start:]`` that are not stored yet; see :meth:`PrefixStore.update_kv`.

        Parameters
        ----------
        start : int
            A multiple of ``chunk_tokens`` (Vineyard's rule for a prefix).
        overwrite : bool
            Rewrite chunks that exist (the default skips them: same key, same KV).

        Returns
        -------
        int
            Tokens of ``token_ids[start:]`` in stored full chunks; a trailing partial chunk is not stored.

        Raises
        ------
        CapacityError
            The disk is full; the chunks written before are complete, nothing partial is visible.
        """
        self._check_open()
        ids = as_token_ids(token_ids)
        n, c = len(ids), self.chunk_tokens
        if not 0 <= start <= n or start % c:
            raise ConfigError(f"ChunkFileStore.update_kv: start must be a multiple of chunk_tokens={c} in [0, {n}], "
                              f"got {start}")
        layout = check_kv(keys, values, n - start)
        self.check_layout(layout)
        all_keys = self.keys_for(ids)
        first = start // c
        todo = [i for i in range(first, len(all_keys)) if overwrite or not self._transport.contains(all_keys[i])]
        if todo:
            self._write_chunks(all_keys, todo, keys, values, layout, start)
        return (len(all_keys) - first) * c

    def _write_chunks(self, all_keys: list[str], todo: list[int], keys, values, layout: KVLayout, start: int) -> None:
        c, layers = self.chunk_tokens, layout.num_layers
        chunks = torch.empty((len(todo), layers, 2, 1, layout.kv_heads, c, layout.head_dim), dtype=layout.dtype,
                             device=keys[0].device)
        handles = []
        for j, i in enumerate(todo):
            pack_tokens(keys, values, Region(layers=(0, layers), tokens=(i * c - start, (i + 1) * c - start)),
                        out=chunks[j])
            region = Region(layers=(0, layers), tokens=(i * c, (i + 1) * c), batch=(0, 1), heads=(0, layout.kv_heads))
            meta = {"prefix_key": all_keys[i].rsplit("/", 1)[-1], "namespace": self.namespace}
            handles.append(self._transport.flush(all_keys[i], chunks[j], region, meta, slices=self.slice_checksums))
        errors = []
        for h in handles:  # every write must finish before ``chunks`` may be freed
            try:
                h.wait()
            except TransportError as e:
                errors.append(e)
        if errors:
            e = errors[0]
            written = len(handles) - len(errors)
            if isinstance(e, CapacityError):
                raise CapacityError(f"ChunkFileStore at {self.root}: disk full; {written} of {len(handles)} new chunks "
                                    f"were stored, complete; the rest were not: {e}") from e
            raise e

    # -- garbage collection ------------------------------------------------------------------------------
    def gc(self, *, ttl_s: float | None = None, now: float | None = None) -> int:
        """Delete chunks not accessed for ``ttl_s`` seconds (default: the store's), skipping pinned ones.

        Also deletes temp files older than ``temp_max_age_s`` (of writers that died) and pin files past
        their lease.

        Returns
        -------
        int
            Chunk files deleted.

        Raises
        ------
        ConfigError
            If neither the store nor the call gives a TTL.
        """
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl is None:
            raise ConfigError("ChunkFileStore.gc needs a ttl_s (store option or argument)")
        now = time.time() if now is None else now
        cutoff = now - ttl
        pinned = self._pinned_hashes(now, reap=True)
        removed = 0
        for key, path, st in self._transport.entries():
            if st.st_mtime >= cutoff or key.count("/") != self.dir_levels:
                continue
            hexkey = key.rsplit("/", 1)[-1]
            if hexkey in pinned:
                continue
            grave = self._tmp_dir / f"gc-{uuid.uuid4().hex}{GRAVE_SUFFIX}"
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                continue
            # A reader may have pinned it, or a writer or reader refreshed it, since we looked: put it back.
            if os.stat(grave).st_mtime >= cutoff or hexkey in self._pinned_hashes(time.time(), reap=False):
                with contextlib.suppress(FileExistsError):  # a writer already put a new copy there
                    os.link(grave, path)
                os.unlink(grave)
                continue
            os.unlink(grave)
            removed += 1
        self._transport.sweep_temp(now=now)
        return removed

    def _gc_loop(self, interval_s: float) -> None:
        while not self._gc_stop.wait(interval_s):
            try:
                self.gc()
            except Exception as e:  # noqa: BLE001 - kept for the owner; GC must not kill serving
                self.last_gc_error = e
                logger.exception("ChunkFileStore background GC failed")

    def close(self) -> None:
        """Stop the background GC, finish I/O in flight and close the transport. Idempotent."""
        if self._closed:
            return
        self._gc_stop.set()
        if self._gc_thread is not None:
            self._gc_thread.join()
        self._transport.close()
        super().close()


__all__ = ["ChunkFileStore", "PINS_DIR", "TEMP_MAX_AGE_S", "COST_FILE"]
