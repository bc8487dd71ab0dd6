"""The soak: writer processes and reader threads hammer a session DiskTransport, a ChunkFileStore and a
shared RadixStore for a bounded time, under eviction and TTL GC, while writers are SIGKILLed at random
(issue 13). Then: every load was bit-exact or a clean error (zero wrong KV), pins and leases are back to
zero, no temp file older than its bound is left, pinned host memory is at or below its baseline, no file
descriptor is left open on the soak's files or on unlinked ones, and the radix store's shared memory stays
within its capacity.

Duration: ``KVSTREAM_SOAK_S`` seconds (default 40, what CI runs), or run it longer on demand::

    python tests/soak/test_soak.py --minutes 10

Nothing can hang: every wait has a timeout and every writer process is killed in a ``finally``.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import soak_work as work  # noqa: E402
from kvstream.cuda import default_allocator  # noqa: E402

WRITERS, READERS = 2, 2


def _open_files() -> set[str]:
    """What this process's file descriptors point at (``/proc/self/fd``)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return out


def _leaked_fds(root: Path, before: set[str]) -> list[str]:
    """Descriptors still open on the soak's files (under ``root``) or on unlinked files (shared-memory blobs,
    removed chunks) that were not open before it. Others are not counted: in the full suite an earlier
    test's leftover thread may open a pipe or a library any time, which says nothing about this soak."""
    return sorted(t for t in _open_files() - before if t.startswith(str(root)) or t.endswith("(deleted)"))


def _spawn(root: Path, slot: int, deadline: float, seed: int) -> subprocess.Popen:
    """A writer process; its output goes to ``root/logs`` (a pipe nobody reads could fill and block it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    (root / "logs").mkdir(exist_ok=True)
    with open(root / "logs" / f"writer{slot}-{seed}.log", "wb") as log:
        return subprocess.Popen([sys.executable, str(HERE / "soak_work.py"), str(root), str(slot), str(deadline),
                                 str(seed)], env=env, stdout=log, stderr=subprocess.STDOUT)


def _reader(root, sessions, files, radix, deadline: float, seed: int, tally: Counter, lock, errors: list) -> None:
    rng = random.Random(seed)
    pool = work.sequences()
    try:
        while time.time() < deadline:
            got = ["session " + work.check_session(sessions, f"w{rng.randrange(WRITERS)}-{rng.randrange(3)}"),
                   "file " + work.check_prefix(files, rng.choice(pool)),
                   "radix " + work.check_prefix(radix, rng.choice(pool))]
            with lock:
                tally.update(got)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def soak(root: Path, duration_s: float, seed: int = 0) -> dict:
    """Run the soak under ``root`` for ``duration_s`` seconds; returns what it measured."""
    rng = random.Random(seed)
    gc.collect()  # an earlier test's garbage (a staging in a cycle) must not be freed into the soak's count
    files0, pinned0 = _open_files(), default_allocator().live_bytes
    (root / "shm").mkdir(parents=True, exist_ok=True)
    sessions, files, radix = work.stores(root, gc=True)
    deadline = time.time() + duration_s
    procs: dict[int, subprocess.Popen] = {}
    tally, lock, errors, killed, exits = Counter(), threading.Lock(), [], 0, []
    threads = [threading.Thread(target=_reader, args=(root, sessions, files, radix, deadline, seed + i, tally, lock,
                                                      errors), daemon=True) for i in range(READERS)]
    try:
        born = {}
        for slot in range(WRITERS):
            procs[slot], born[slot] = _spawn(root, slot, deadline, rng.randrange(1 << 30)), time.time()
        for t in threads:
            t.start()
        while time.time() < deadline:
            time.sleep(rng.uniform(0.5, 1.5))
            files.gc()  # TTL GC racing readers and writers
            slot = rng.randrange(WRITERS)
            if procs[slot].poll() is None:
                # a writer needs a few seconds to start (imports); kill it at a random moment of its work
                if time.time() - born[slot] < rng.uniform(4.0, 10.0) or time.time() > deadline - 1:
                    continue
                os.kill(procs[slot].pid, signal.SIGKILL)
                killed += 1
            procs[slot].wait(timeout=30)
            exits.append(procs[slot].returncode)
            procs[slot], born[slot] = _spawn(root, slot, deadline, rng.randrange(1 << 30)), time.time()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a reader thread hung"
        for p in procs.values():
            p.wait(timeout=120)
            exits.append(p.returncode)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert not errors, errors
    # -- afterwards: everything back to zero -------------------------------------------------------------
    time.sleep(max(work.TEMP_MAX_AGE_S, work.PIN_LEASE_S) + 0.5)  # the dead writers' temp files and pins age out
    files.gc(ttl_s=3600)
    sessions.sweep_temp()
    radix.query([1])  # attaching again reaps the pins of dead owners
    result = {
        "tally": dict(tally), "killed": killed, "bad_exits": [c for c in exits if c not in (0, -signal.SIGKILL, None)],
        "file_pins": files.pin_counts(), "file_held": files.pinned(), "pin_files": os.listdir(root / "prefix" / ".pins"),
        "radix_held": radix.pinned(), "radix_pins": radix.stats()["pins"],
        "radix_used_bytes": radix.stats()["used_bytes"],
        "old_temp_files": [p.name for d in (root / "sessions" / ".tmp", root / "prefix" / ".tmp")
                           for p in d.iterdir() if time.time() - p.stat().st_mtime > work.TEMP_MAX_AGE_S],
    }
    sessions.close()
    files.close()
    radix.close()
    again = work.radix_store(root)  # a fresh attach removes blobs of writers killed inside an update
    result["radix_blob_bytes"] = sum(f.stat().st_size for f in (root / "shm").rglob("blob-*"))
    again.close()
    # A mapped blob holds a descriptor (mmap keeps its own) for as long as a tensor views it; a finished
    # match's tensors can wait in a reference cycle for the next collection: collect, then count.
    gc.collect()
    result["leaked_fds"] = _leaked_fds(root, files0)
    result["pinned"], result["pinned0"] = default_allocator().live_bytes, pinned0
    return result


def problems(r: dict) -> list[str]:
    """What a soak left that it must not (see the module docstring); empty when it is clean."""
    t = r["tally"]
    rules = [
        ("wrong KV served", not [k for k in t if k.endswith("wrong")]),
        ("too little work", t.get("session ok", 0) > 5 and t.get("file hit", 0) > 5 and t.get("radix hit", 0) > 5),
        ("no writer was killed", r["killed"] >= 1),
        ("a writer exited on wrong KV it read", r["bad_exits"] == []),
        ("file pins left", r["file_pins"] == {} and r["file_held"] == 0 and r["pin_files"] == []),
        ("radix pins left", r["radix_held"] == 0 and r["radix_pins"] == 0),
        ("old temp files left", r["old_temp_files"] == []),
        ("radix over capacity", r["radix_used_bytes"] <= work.RADIX_CAPACITY and r["radix_blob_bytes"] <= work.RADIX_CAPACITY),
        ("descriptors leaked", r["leaked_fds"] == []),
        # more bytes live than before it is a leak; fewer is an earlier test's buffer freed late (by a thread)
        ("pinned bytes leaked", r["pinned"] <= r["pinned0"]),
    ]
    return [name for name, ok in rules if not ok]


@pytest.mark.slow
def test_soak(tmp_path):
    r = soak(tmp_path, float(os.environ.get("KVSTREAM_SOAK_S", "40")))
    assert problems(r) == [], {k: r[k] for k in ("leaked_fds", "pinned", "pinned0", "killed", "bad_exits")} | r


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(Path(tmp), args.minutes * 60)
    print(json.dumps(result, indent=1, default=str))
    print("problems:", problems(result) or "none")
