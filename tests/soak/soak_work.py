"""The work of the soak (``test_soak.py``): KV that names its producer, and the loops that writer
processes and reader threads run. Run as a script it is one writer process::

    python soak_work.py ROOT SLOT DEADLINE_UNIX_S SEED

Every tensor a writer streams is a function of who wrote it (:func:`session_kv`: the run id, layer and
position; :func:`prefix_kv` of ``store_helpers``: the whole token prefix), so a reader can tell the KV it
loaded is exactly the KV it asked for, bit for bit.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "stores"))

import kvstream  # noqa: E402
from kvstream.errors import ChunkNotFound, CorruptChunkError, LayoutError, TransportError  # noqa: E402
from store_helpers import prefix_kv  # noqa: E402

LAYERS, HEADS, DIM, BATCH = 3, 2, 8, 2
CHUNK_TOKENS = 4
RADIX_CAPACITY = 96 * CHUNK_TOKENS * 2 * 2 * 2 * 4  # a few sequences' worth: evictions all the time
TEMP_MAX_AGE_S = 2.0
PIN_LEASE_S = 4.0
#: Errors a load may end in when a writer died or replaced what it was reading: clean, never wrong KV.
CLEAN = (ChunkNotFound, CorruptChunkError, LayoutError, TransportError)


def session_kv(run: str, layer: int, start: int, tokens: int, kind: int) -> torch.Tensor:
    """``[BATCH, HEADS, tokens, DIM]`` float32 KV of positions ``[start, start + tokens)``, named by the run."""
    seed = int(run[:8], 16) % 100003
    t = torch.arange(start, start + tokens).view(1, 1, tokens, 1)
    b = torch.arange(BATCH).view(BATCH, 1, 1, 1)
    h = torch.arange(HEADS).view(1, HEADS, 1, 1)
    d = torch.arange(DIM).view(1, 1, 1, DIM)
    return ((seed * 31 + layer * 131 + kind * 977 + t * 7 + b * 3 + h * 5 + d) % 1013).float() / 7.0


def sequences(n: int = 12, length: int = 4 * CHUNK_TOKENS + 2) -> list[list[int]]:
    """A pool of token sequences sharing prefixes (so chunks and radix nodes are shared and split)."""
    rng = random.Random(7)
    base = [rng.randrange(1, 50) for _ in range(length)]
    out = []
    for i in range(n):
        cut = (i % 4 + 1) * CHUNK_TOKENS
        out.append(base[:cut] + [rng.randrange(50, 100) for _ in range(length - cut)])
    return out


def stores(root: Path, *, gc: bool = False):
    """The three stores every process opens: sessions on disk, a chunk file store, a shared radix store."""
    sessions = kvstream.DiskTransport(root / "sessions", temp_max_age_s=TEMP_MAX_AGE_S, io_threads=2)
    files = kvstream.ChunkFileStore(root / "prefix", chunk_tokens=CHUNK_TOKENS, namespace="soak", io_threads=2,
                                    pin_lease_s=PIN_LEASE_S, temp_max_age_s=TEMP_MAX_AGE_S,
                                    ttl_s=1.0 if gc else None)
    return sessions, files, radix_store(root)


def radix_store(root: Path):
    """The shared radix store of the soak (small: evictions all the time)."""
    return kvstream.RadixStore(capacity_bytes=RADIX_CAPACITY, shared_name="soak", shm_dir=str(root / "shm"),
                               namespace="soak", pin_memory=False)


def stream_session(transport, name: str, rng: random.Random, commit: bool) -> None:
    """One run of session ``name``: a prefill and a few decode steps of :func:`session_kv`."""
    cache = kvstream.StreamingCache(transport=transport, session=name, layer_chunk_min_tokens=4)
    pos = 0
    for tokens in [rng.randrange(6, 20)] + [1] * rng.randrange(1, 6):
        for layer in range(LAYERS):
            cache.update(session_kv(cache.run_id, layer, pos, tokens, 0),
                         session_kv(cache.run_id, layer, pos, tokens, 1), layer)
        pos += tokens
    if commit:
        cache.wait()
    elif cache.streamer is not None:
        cache._settle()
        cache.streamer.wait()  # the chunks landed; the manifest is never written


def check_session(transport, name: str) -> str:
    """Load ``name`` and compare with what its run wrote: ``"ok"``, ``"clean"`` (a clean error) or ``"wrong"``."""
    try:
        manifest = kvstream.StreamingCache.read_manifest(transport, name)
        cache = kvstream.StreamingCache.load(transport, name, stream=False)
        if kvstream.StreamingCache.read_manifest(transport, name).run != manifest.run:
            return "clean"  # a new run committed meanwhile: the load may have read its manifest, not this one
    except CLEAN:
        return "clean"
    run = manifest.run_of(0)
    n = cache.get_seq_length()
    if n != manifest.seq_length:
        return "wrong"
    for layer in range(LAYERS):
        lay = cache.layers[layer]
        if not (torch.equal(lay.keys, session_kv(run, layer, 0, n, 0))
                and torch.equal(lay.values, session_kv(run, layer, 0, n, 1))):
            return "wrong"
    return "ok"


def check_prefix(store, ids: list[int]) -> str:
    """Look ``ids`` up and compare the match with the KV of its prefix: ``"hit"`` (KV matched and equal),
    ``"ok"`` (nothing matched), ``"clean"`` or ``"wrong"``."""
    try:
        with store.fetch_prefix(ids) as m:
            n = m.matched_tokens
            if n == 0:
                return "ok"
            keys, values = prefix_kv(ids[:n])
            good = all(torch.equal(m.keys[l], keys[l]) and torch.equal(m.values[l], values[l])
                       for l in range(len(keys)))
            return "hit" if good else "wrong"
    except CLEAN:
        return "clean"


def store_prefix(store, ids: list[int]) -> None:
    keys, values = prefix_kv(ids)
    try:
        store.update_kv(ids, keys, values)
    except CLEAN:
        pass


def writer(root: Path, slot: int, deadline: float, seed: int) -> None:
    """A writer process: streams sessions (names reused after its predecessor was killed), updates and
    queries both stores, until ``deadline``."""
    rng = random.Random(seed)
    sessions, files, radix = stores(root)
    pool = sequences()
    while time.time() < deadline:
        stream_session(sessions, f"w{slot}-{rng.randrange(3)}", rng, commit=rng.random() < 0.85)
        ids = rng.choice(pool)
        store_prefix(files, ids)
        store_prefix(radix, ids)
        for store in (files, radix):
            if check_prefix(store, rng.choice(pool)) == "wrong":
                print("WRONG KV in a writer", flush=True)
                os._exit(3)


if __name__ == "__main__":
    writer(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
