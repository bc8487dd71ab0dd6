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


def guarded(prog: str, body: Callable[[], Any], *,
            failures: type[BaseException] | tuple[type[BaseException], ...] = (RuntimeError, KVStreamError),
            failed_code: int = 1, failed_prog: str | None = None) -> tuple[int | None, Any]:
    """Run a launcher's (or one process's) ``body()`` and turn its errors into an exit code.

    Returns ``(None, result)``; ``(2, None)`` after printing a :class:`~kvstream.errors.ConfigError` as
    ``prog: message``; ``(failed_code, None)`` after one of ``failures`` (default: a ``RuntimeError`` or
    another :class:`~kvstream.errors.KVStreamError`, i.e. a stage failed), printed as
    ``failed_prog: Type: message`` (``failed_prog`` defaults to ``prog``). Every message is one line on
    stderr; any other exception propagates.
    """
    try:
        return None, body()
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2, None
    except failures as e:
        print(f"{failed_prog or prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return failed_code, None


__all__ = ["GRACE_S", "stop_workers", "OneLineParser", "guarded"]
