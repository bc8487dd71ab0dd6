"""Helpers of the launchers that start worker or stage processes (``kvstream disagg``, ``kvstream pipeline``)."""

from __future__ import annotations

import subprocess
import time

#: Seconds the launcher gives the other processes to exit after one failed.
GRACE_S = 10.0


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes still running; kill those that do not exit within :data:`GRACE_S`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


__all__ = ["GRACE_S", "stop_workers"]
