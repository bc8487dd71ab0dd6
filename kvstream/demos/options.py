"""The demos' option checks, run before anything slow: a bad value is one :class:`~kvstream.errors.ConfigError`
that names the flag and the fix (``kvstream`` prints it as one line and exits 2)."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from ..errors import ConfigError


def positive_int(text: str) -> int:
    """``argparse`` type of a count: an int >= 1 (a bad one is a flag error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def device(spec: str, *, flag: str = "--device") -> torch.device:
    """The device of ``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when a GPU is present).

    Raises
    ------
    ConfigError
        Not a device, a device type the demos do not run on, or CUDA without a GPU (or that GPU index).
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {spec!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {spec!r}: the demos run on cpu or cuda (or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {spec}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                              f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def writable_dir(path: str, *, flag: str) -> str:
    """Create directory ``path`` if missing and check that a file can be written in it; returns ``path``.

    Raises
    ------
    ConfigError
        If ``path`` exists and is not a directory, or cannot be created or written (read-only, no permission).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is not a directory: give a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path!r} cannot be written ({e.strerror}): give a writable directory") from None
    return path


__all__ = ["positive_int", "device", "writable_dir"]
