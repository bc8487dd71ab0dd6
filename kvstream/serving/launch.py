"""Helpers of the launchers that start worker or stage processes (``kvstream disagg``, ``kvstream pipeline``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any, Callable

from ..errors import ConfigError, KVStreamError

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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (and exit 2)."""

    def error(self, message: str):
        """argparse's hook: print ``prog: message`` on stderr and raise ``SystemExit(2)`` (no usage text)."""
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def guarded(prog: str, body: Callable[[], Any]) -> tuple[int | None, Any]:
    """Run a launcher's ``body()``: ``(None, result)``, or ``(2, None)`` after printing a
    :class:`~kvstream.errors.ConfigError` in one line, ``(1, None)`` after a ``RuntimeError`` or another
    :class:`~kvstream.errors.KVStreamError` (a stage failed)."""
    try:
        return None, body()
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2, None
    except (RuntimeError, KVStreamError) as e:
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1, None


__all__ = ["GRACE_S", "stop_workers", "OneLineParser", "guarded"]
