"""stream_out / stream_in: move the transfers a :class:`~kvstream.streaming.placement.Placement` plans, through
a streamer or a bare transport per peer (DéjàVuLib's ``stream_out``/``stream_in``, msr-fiddle/dejavu
``cache_utils.cc``)."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from .. import kernels
from ..chunk import with_head_dims
from ..errors import ConfigError, LayoutError
from ..handles import AllHandle, CompletedHandle, Handle
from .placement import Placement, Shard, localize, transfer_key
from .protocols import ChunkTransport, Streams


#: What stream_out/stream_in move chunks through: a streamer (its scatter/gather, side stream and level),
#: a Transport, or one of either per peer rank (point-to-point transports).
Via = Union[Streams, ChunkTransport, Mapping[int, Union[Streams, ChunkTransport]]]


def _target_for(via, peer: int):
    if isinstance(via, Mapping):
        try:
            return via[peer]
        except KeyError:
            raise ConfigError(f"No transport given for peer rank {peer}; have {sorted(via)}") from None
    return via


def stream_out(via: Via, placement: Placement, rank: int, keys: Sequence[torch.Tensor],
               values: Sequence[torch.Tensor], *, session: str, tokens: range | tuple[int, int],
               batch: range | tuple[int, int] | None = None, meta: dict | None = None) -> Handle:
    """Pack and flush every region source ``rank`` owes the destination ranks (DéjàVuLib's ``stream_out``).

    Parameters
    ----------
    via : KVStreamer, Transport, or mapping of destination rank -> either
        One shared streamer/transport (host memory, disk) or one per destination rank (point-to-point
        transports: NCCL, remote host). A :class:`~kvstream.streaming.streamer.KVStreamer` packs and
        flushes with its ``scatter`` (its level and side stream); a bare transport gets chunks packed by
        :func:`kvstream.kernels.pack_tokens` (Triton on a GPU, the torch twin on the CPU) on the current
        stream.
    placement : Placement
        Source and destination layouts.
    rank : int
        This rank in ``placement.src``.
    keys, values : sequence of torch.Tensor
        This rank's cache: one tensor per *local* layer (``len(shard.layers)`` of them), each
        ``[batch, local_kv_heads, seq, head_dim]`` (any dtype, CPU or CUDA, ``head_dim`` contiguous) with
        ``seq >= tokens.stop``.
    session : str
        Key prefix; the keys are :func:`transfer_key`.
    tokens, batch : range or (start, stop)
        Token positions and batch rows (``None``: every row) to move.
    meta : dict, optional
        Extras stored in every chunk's header.

    Returns
    -------
    Handle
        Completes when every chunk is flushed.

    Raises
    ------
    LayoutError
        If the tensors do not match this rank's shard (layer count, heads, tokens).
    ConfigError
        If a destination rank has no entry in the mapping.

    Examples
    --------
    >>> p = Placement(PipelineConfig(pp_depth=2), PipelineConfig(pp_depth=4), num_layers=32, kv_heads=8)
    >>> stream_out(transport, p, rank, keys, values, session="req-7", tokens=(0, 1500)).wait()  # doctest: +SKIP
    """
    shard = placement.src_shard(rank)
    _check_local(keys, values, shard, "stream_out")
    handles = []
    for t in placement.outgoing(rank, tokens, batch):
        target, key, local = _target_for(via, t.dst), transfer_key(session, t), localize(t.region, shard)
        if isinstance(target, Streams):
            handles.append(target.scatter(key, keys, values, local, meta=meta))
        else:
            chunk = kernels.pack_tokens(keys, values, local)
            handles.append(target.flush(key, chunk, region=t.region,
                                        meta=with_head_dims(meta, keys[0].shape[3], values[0].shape[3])))
    return AllHandle(handles)


def stream_in(via: Via, placement: Placement, rank: int, keys: Sequence[torch.Tensor],
              values: Sequence[torch.Tensor], *, session: str, tokens: range | tuple[int, int],
              batch: range | tuple[int, int] | None = None) -> Handle:
    """Fetch and unpack every region destination ``rank`` receives (DéjàVuLib's ``stream_in``).

    Parameters
    ----------
    via : KVStreamer, Transport, or mapping of source rank -> either
        Where the chunks were flushed (see :func:`stream_out`).
    placement : Placement
        Source and destination layouts.
    rank : int
        This rank in ``placement.dst``.
    keys, values : sequence of torch.Tensor
        This rank's cache, written in place: one tensor per local layer, each
        ``[batch, local_kv_heads, seq, head_dim]`` with ``seq >= tokens.stop``.
    session, tokens, batch
        As given to :func:`stream_out`.

    Returns
    -------
    Handle
        Already complete: the bytes are in ``keys``/``values`` (stream-ordered on the current stream)
        when this returns.

    Raises
    ------
    ChunkNotFound, PeerError, CorruptChunkError
        From the transport.
    LayoutError
        If the tensors do not match this rank's shard.
    """
    shard = placement.dst_shard(rank)
    _check_local(keys, values, shard, "stream_in")
    first = keys[0]
    pending = []
    for t in placement.incoming(rank, tokens, batch):
        target, key = _target_for(via, t.src), transfer_key(session, t)
        local = localize(t.region, shard).resolve(batch_size=first.shape[0], kv_heads=first.shape[1])
        if isinstance(target, Streams):
            target.gather(key, keys, values, local).wait()
            continue
        buf = torch.empty(local.packed_shape(first.shape[3], values[0].shape[3]), dtype=first.dtype,
                          device=first.device)
        pending.append((target.fetch(key, buf), buf, local))
    for handle, buf, local in pending:
        handle.wait()
        kernels.unpack_tokens(buf, keys, values, local)
    return CompletedHandle()


def _check_local(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], shard: Shard, what: str) -> None:
    if len(keys) != len(shard.layers) or len(values) != len(shard.layers):
        raise LayoutError(f"{what}: rank {shard.rank} owns {len(shard.layers)} layers "
                          f"[{shard.layers.start}, {shard.layers.stop}), got {len(keys)} key and {len(values)} value tensors")
    for kind, ts in (("keys", keys), ("values", values)):
        for i, t in enumerate(ts):
            if t.dim() != 4 or t.shape[1] != len(shard.heads):
                raise LayoutError(f"{what}: invalid shape of {kind}[{i}]: expected [batch, {len(shard.heads)}, seq, "
                                  f"head_dim] (rank {shard.rank} owns heads [{shard.heads.start}, {shard.heads.stop})), "
                                  f"got {list(t.shape)}")


__all__ = ["Streams", "Via", "stream_out", "stream_in"]
