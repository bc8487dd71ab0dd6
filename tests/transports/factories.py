"""One factory per transport, for the contract test (``tests/transports/test_contract.py``), and the
chunk helpers the transport tests share.

A factory is a generator function ``factory(tmp_path) -> Iterator[Transport]`` used like a pytest
fixture: it yields a fresh transport and cleans up after the yield (the contract test closes the
transport itself). Adding a transport to the contract test is one line at the bottom of the factory
section::

    register("remote", remote_factory)               # or, needing two GPUs:
    register("nccl", nccl_factory, pytest.mark.gpu2)

Every name in :data:`kvstream.transports.REGISTRY` must have a factory (the contract test checks it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from kvstream.transports import DiskTransport, HostTransport, Transport
from kvstream.chunk import byte_view

#: name -> pytest.param(factory, id=name, marks=...)
FACTORIES: dict[str, object] = {}

#: Capacity of the host transport in the contract test: far above what the tests store.
HOST_CAPACITY_BYTES = 64 << 20


def register(name: str, factory: Callable[[Path], Iterator[Transport]], *marks) -> None:
    """Add ``factory`` to the contract test under ``name`` (its test id), with optional pytest marks."""
    FACTORIES[name] = pytest.param(factory, id=name, marks=marks)


def host_factory(tmp_path: Path) -> Iterator[Transport]:
    """A HostTransport with room to spare (pinned when CUDA is available)."""
    yield HostTransport(capacity_bytes=HOST_CAPACITY_BYTES)


def disk_factory(tmp_path: Path) -> Iterator[Transport]:
    """A DiskTransport under ``tmp_path`` with small blocks, so that chunks span several blocks."""
    yield DiskTransport(tmp_path / "disk", block_bytes=8192, io_threads=3)


def disk_direct_factory(tmp_path: Path) -> Iterator[Transport]:
    """The same with O_DIRECT (taken for page-aligned buffers: the pinned staging of CUDA transfers)."""
    yield DiskTransport(tmp_path / "disk-direct", block_bytes=8192, io_threads=3, direct=True, fsync=True)


register("host", host_factory)
register("disk", disk_factory)
register("disk-direct", disk_direct_factory)


# -- chunk helpers shared by the transport tests ----------------------------------------------------
SENTINEL = 0xA5


def random_chunk(shape, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` whose bytes are uniform random (every bit pattern, NaNs included)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of dtype, shape and bytes (``torch.equal`` on the bytes: NaN-safe)."""
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(byte_view(a.cpu().contiguous()), byte_view(b.cpu().contiguous())))


def sentinel_out(shape, dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(big, out)``: ``out`` is a contiguous view of ``shape`` inside ``big`` with one guard element on
    each side; every byte of ``big`` is :data:`SENTINEL`."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    big = torch.full(((numel + 2) * itemsize,), SENTINEL, dtype=torch.uint8, device=device).view(dtype)
    return big, big[1:1 + numel].view(shape)


def guards_intact(big: torch.Tensor) -> bool:
    """Whether the guard elements around ``out`` in :func:`sentinel_out`'s ``big`` still hold the sentinel."""
    return bool((byte_view(big[:1]) == SENTINEL).all() and (byte_view(big[-1:]) == SENTINEL).all())


def all_sentinel(t: torch.Tensor) -> bool:
    """Whether every byte of ``t`` is :data:`SENTINEL` (nothing was written into it)."""
    return bool((byte_view(t) == SENTINEL).all())


# -- point-to-point transports: one object over a connected pair of endpoints (LoopbackTransport) -----
def remote_factory(tmp_path: Path) -> Iterator[Transport]:
    """RemoteHostTransport endpoints 0 -> 1 in this process over gloo on 127.0.0.1; a missing key waits 0.3 s."""
    from kvstream.transports.remote import RemoteHostTransport

    yield RemoteHostTransport.loopback(timeout_s=30, fetch_timeout_s=0.3)


def nccl_factory(tmp_path: Path) -> Iterator[Transport]:
    """NcclTransport from cuda:0 (send) to cuda:1 (recv) in this process; a missing key waits 0.3 s."""
    from kvstream.transports.nccl import NcclTransport

    yield NcclTransport.loopback((0, 1), timeout_s=60, fetch_timeout_s=0.3)


register("remote", remote_factory)
register("nccl", nccl_factory, pytest.mark.gpu2)
