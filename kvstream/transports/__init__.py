"""Transports ship packed chunks to a destination under a key and bring them back (``flush``/``fetch``).

One small ABC (:mod:`.base`), one file per transport: :class:`HostTransport` (pinned host memory),
:class:`DiskTransport` (files on a local or shared filesystem), and the NCCL and remote-host transports
of the multi-GPU work. :data:`REGISTRY` maps the names used in options and benchmark tables to classes;
a configured name that is unknown or fails to import raises :class:`~kvstream.errors.ConfigError` (it is
never logged and skipped).

Example
-------
>>> from kvstream.transports import REGISTRY
>>> REGISTRY["disk"].__name__
'DiskTransport'
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from ..errors import ConfigError
from ..handles import AllHandle, CompletedHandle, EventHandle, FutureHandle, Handle
from .base import Transport
from .disk import DiskTransport
from .host import HostTransport

#: name -> "module:Class" of every transport, loaded on first use (so that a transport whose
#: dependencies are missing only fails when it is asked for). Adding a transport is one line here.
_SPECS: dict[str, str] = {
    "host": "kvstream.transports.host:HostTransport",
    "disk": "kvstream.transports.disk:DiskTransport",
    "remote": "kvstream.transports.remote:RemoteHostTransport",
    "nccl": "kvstream.transports.nccl:NcclTransport",
}


class _Registry(Mapping):
    """A read-only ``name -> Transport subclass`` mapping that imports each class on first use.

    ``REGISTRY[name]`` raises :class:`ConfigError` naming the known transports for an unknown name, and
    with the cause for one that fails to import or is not a :class:`Transport` subclass.
    """

    def __init__(self, specs: dict[str, str]):
        self._specs = specs
        self._loaded: dict[str, type[Transport]] = {}

    def __getitem__(self, name: str) -> type[Transport]:
        if name in self._loaded:
            return self._loaded[name]
        spec = self._specs.get(name)
        if spec is None:
            raise ConfigError(f"Unknown transport {name!r}; known: {sorted(self._specs)}")
        module_name, _, cls_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except Exception as e:  # noqa: BLE001 - re-raised as ConfigError with the cause
            raise ConfigError(f"Transport {name!r} ({spec}) failed to load: {type(e).__name__}: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Transport)):
            raise ConfigError(f"Transport {name!r} ({spec}) is not a kvstream Transport subclass")
        self._loaded[name] = cls
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)


#: Transport classes by name (``REGISTRY["disk"] is DiskTransport``); see :class:`_Registry`.
REGISTRY: Mapping[str, type[Transport]] = _Registry(_SPECS)

__all__ = ["Handle", "CompletedHandle", "FutureHandle", "EventHandle", "AllHandle", "Transport", "HostTransport",
           "DiskTransport", "REGISTRY"]
