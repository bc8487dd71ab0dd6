"""The replicator on its own (no processes): a release deletes what is still being written, too."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvstream.handles import FutureHandle
from kvstream.models import tiny_config
from kvstream.serving.failover.replicator import Replicator
from kvstream.transports.host import HostTransport


class _SlowStore(HostTransport):
    """A store whose writes land 0.3 s after ``flush`` returns (as a disk's write threads do)."""

    def __init__(self):
        super().__init__(1 << 20)
        self._pool = ThreadPoolExecutor(1)

    def flush(self, key, chunk, region=None, meta=None):
        def write():
            time.sleep(0.3)
            super(_SlowStore, self).flush(key, chunk.clone(), region=region, meta=meta).wait()
        return FutureHandle(self._pool.submit(write))


class _Store:
    def set(self, key, value):
        pass


def test_a_release_waits_for_the_sessions_writes_in_flight():
    dest = _SlowStore()
    rep = Replicator(stage=0, layers=range(0, 1), config=tiny_config(num_layers=1), dtype=torch.float32,
                     device=torch.device("cpu"), store=_Store(), phase=0)
    try:
        rep.connect(lambda: dest)
        rep.begin(0, "prefill", 0, tokens=4, rows=1)
        rep.end([], torch.ones(1, 4))  # the step's output: one chunk, still being written ...
        rep.release(0)  # ... when the request finishes
        deadline = time.monotonic() + 10
        while not rep.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # any write still in flight has landed by now
        assert dest.keys("ft/") == []
    finally:
        rep.close()
