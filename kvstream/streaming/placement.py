"""Placement: which region of KV goes from which source rank to which destination rank (stream_out/stream_in).

DéjàVu streams KV between workers whose parallel layouts differ: a prompt pipeline of depth 2 feeding a
token pipeline of depth 4, or tensor parallelism 4 feeding 2. DéjàVuLib's ``stream_out``/``stream_in``
(msr-fiddle/dejavu, ``cache_utils.cc``) bucket layers by destination stage, but that branch is dead code
there (every caller passes the same config). This module is the complete version, as a pure plan: which
bytes go where. :func:`kvstream.streaming.handoff.stream_out`/``stream_in`` move them.

Ownership rules (the same on both sides)
----------------------------------------
A layout is :class:`PipelineConfig` ``(pp_depth, tp_size)``; rank ``r`` is pipeline stage
``r // tp_size`` and tensor-parallel rank ``r % tp_size`` (Megatron-LM's order: tensor parallelism is the
innermost, fastest-varying dimension).

* **Layers by stage** (:func:`split_layers`): contiguous and balanced. With ``L`` layers and ``P``
  stages every stage gets ``L // P`` layers and the first ``L % P`` stages one more. When ``P`` divides
  ``L`` this is FasterTransformer's/DéjàVu's ``local_num_layer = num_layer / pipeline_para_size``; the
  remainder rule extends it (Megatron-LM requires divisibility). ``P > L`` is a :class:`ConfigError`.
* **KV heads by tensor-parallel rank** (:func:`split_heads`): with ``H >= T`` heads per rank are
  contiguous and balanced by the same rule (Megatron/vLLM: ``H / T`` each when ``T`` divides ``H``).
  With ``H < T`` (grouped-query attention with wide tensor parallelism) heads are **replicated**, as vLLM
  does: rank ``t`` holds the single head ``t * H // T``, so every head lives on ``T // H`` or
  ``T // H + 1`` ranks.

Transfers
---------
Every destination rank receives each (layer, head) it owns exactly once. The layers come from the source
stage that owns them (a destination stage spanning two source stages receives two pieces); for each head
the source tensor-parallel rank is one of the ranks that own it, ``owners[dst_tp_rank % len(owners)]``
(deterministic, and it spreads replicated heads over their holders). Consecutive heads with the same
source become one contiguous region, so a transfer is one :class:`~kvstream.layout.Region` and one packed
chunk. Tokens and batch rows pass through unchanged: placement is about layers and heads.

Examples
--------
>>> p = Placement(PipelineConfig(pp_depth=2), PipelineConfig(pp_depth=4), num_layers=8, kv_heads=8)
>>> [(t.src, t.dst, t.region.layers) for t in p.transfers(tokens=range(0, 16))]
[(0, 0, range(0, 2)), (0, 1, range(2, 4)), (1, 2, range(4, 6)), (1, 3, range(6, 8))]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, LayoutError
from ..layout import Region


@dataclass(frozen=True)
class PipelineConfig:
    """A parallel layout: ``pp_depth`` pipeline stages times ``tp_size`` tensor-parallel ranks.

    DéjàVu's ``PipelineConfig {pp_depth, tp_size, ...}`` without the batch fields (a
    :class:`~kvstream.layout.Region` carries the batch rows). Rank ``r`` is stage ``r // tp_size``,
    tensor-parallel rank ``r % tp_size``.

    Raises
    ------
    ConfigError
        If either size is not a positive int.
    """

    pp_depth: int = 1
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("pp_depth", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"PipelineConfig.{name} must be a positive int, got {v!r}")

    @property
    def world_size(self) -> int:
        """Number of ranks: ``pp_depth * tp_size``."""
        return self.pp_depth * self.tp_size

    def rank(self, stage: int, tp_rank: int) -> int:
        """The rank of pipeline stage ``stage`` and tensor-parallel rank ``tp_rank``."""
        if not (0 <= stage < self.pp_depth and 0 <= tp_rank < self.tp_size):
            raise ConfigError(f"(stage {stage}, tp_rank {tp_rank}) outside pp_depth {self.pp_depth} x tp_size "
                              f"{self.tp_size}")
        return stage * self.tp_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """``(stage, tp_rank)`` of ``rank``. Raises :class:`ConfigError` outside ``[0, world_size)``."""
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank!r} outside [0, {self.world_size}) for {self}")
        return divmod(rank, self.tp_size)


def _balanced(n: int, parts: int) -> list[range]:
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def split_layers(num_layers: int, pp_depth: int) -> list[range]:
    """Layers of each pipeline stage: contiguous, ``num_layers // pp_depth`` each, the first
    ``num_layers % pp_depth`` stages one more.

    Raises
    ------
    ConfigError
        If ``pp_depth > num_layers`` (a stage with no layer) or a size is not positive.

    Examples
    --------
    >>> split_layers(10, 4)
    [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    """
    if num_layers <= 0 or pp_depth <= 0:
        raise ConfigError(f"split_layers needs positive sizes, got num_layers={num_layers}, pp_depth={pp_depth}")
    if pp_depth > num_layers:
        raise ConfigError(f"pp_depth {pp_depth} exceeds num_layers {num_layers}: a stage would own no layer")
    return _balanced(num_layers, pp_depth)


def split_heads(kv_heads: int, tp_size: int) -> list[range]:
    """KV heads of each tensor-parallel rank.

    ``kv_heads >= tp_size``: contiguous and balanced (``kv_heads // tp_size`` each, the first
    ``kv_heads % tp_size`` ranks one more). ``kv_heads < tp_size``: replicated, rank ``t`` holds the
    single head ``t * kv_heads // tp_size`` (vLLM's rule for grouped-query attention with wide tensor
    parallelism).

    Raises
    ------
    ConfigError
        If a size is not positive.

    Examples
    --------
    >>> split_heads(8, 2)
    [range(0, 4), range(4, 8)]
    >>> split_heads(2, 4)
    [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    """
    if kv_heads <= 0 or tp_size <= 0:
        raise ConfigError(f"split_heads needs positive sizes, got kv_heads={kv_heads}, tp_size={tp_size}")
    if kv_heads >= tp_size:
        return _balanced(kv_heads, tp_size)
    return [range(t * kv_heads // tp_size, t * kv_heads // tp_size + 1) for t in range(tp_size)]


@dataclass(frozen=True)
class Shard:
    """What one rank owns: its ``layers`` and KV ``heads`` (global indices, contiguous)."""

    rank: int
    stage: int
    tp_rank: int
    layers: range
    heads: range


@dataclass(frozen=True)
class Transfer:
    """One chunk to move: ``region`` (global layers/heads, tokens, batch) from ``src`` rank to ``dst`` rank."""

    src: int
    dst: int
    region: Region


def localize(region: Region, shard: Shard) -> Region:
    """``region`` (global layer and head indices) in the local indices of ``shard``'s tensors.

    A rank's cache holds ``len(shard.layers)`` layer tensors of ``len(shard.heads)`` heads each, so global
    layer ``l`` is local ``l - shard.layers.start`` (heads likewise).

    Raises
    ------
    LayoutError
        If ``region`` is not inside the shard's layers and heads, or its heads are unresolved.
    """
    if region.heads is None:
        raise LayoutError("localize needs a region with explicit heads")
    for what, r, own in (("layers", region.layers, shard.layers), ("heads", region.heads, shard.heads)):
        if r.start < own.start or r.stop > own.stop:
            raise LayoutError(f"Region {what} [{r.start}, {r.stop}) outside rank {shard.rank}'s {what} "
                              f"[{own.start}, {own.stop})")
    return Region(layers=range(region.layers.start - shard.layers.start, region.layers.stop - shard.layers.start),
                  tokens=region.tokens, batch=region.batch,
                  heads=range(region.heads.start - shard.heads.start, region.heads.stop - shard.heads.start))


class Placement:
    """The transfers between a source and a destination layout of one model's KV cache.

    Parameters
    ----------
    src, dst : PipelineConfig
        Source (e.g. prompt workers) and destination (e.g. token workers) layouts. Ranks are numbered
        separately in each.
    num_layers : int
        Decoder layers of the model.
    kv_heads : int
        KV heads per layer.

    Raises
    ------
    ConfigError
        If a layout has more stages than layers or a size is not positive.

    Examples
    --------
    >>> p = Placement(PipelineConfig(tp_size=2), PipelineConfig(tp_size=1), num_layers=2, kv_heads=4)
    >>> [(t.src, t.dst, t.region.heads) for t in p.transfers(tokens=(0, 8))]
    [(0, 0, range(0, 2)), (1, 0, range(2, 4))]
    """

    def __init__(self, src: PipelineConfig, dst: PipelineConfig, *, num_layers: int, kv_heads: int):
        self.src, self.dst = src, dst
        self.num_layers, self.kv_heads = int(num_layers), int(kv_heads)
        self._src_layers = split_layers(self.num_layers, src.pp_depth)
        self._dst_layers = split_layers(self.num_layers, dst.pp_depth)
        self._src_heads = split_heads(self.kv_heads, src.tp_size)
        self._dst_heads = split_heads(self.kv_heads, dst.tp_size)

    def __repr__(self) -> str:
        return (f"Placement(src={self.src}, dst={self.dst}, num_layers={self.num_layers}, "
                f"kv_heads={self.kv_heads})")

    def reversed(self) -> "Placement":
        """The placement from ``dst`` back to ``src`` (the round trip)."""
        return Placement(self.dst, self.src, num_layers=self.num_layers, kv_heads=self.kv_heads)

    def src_shard(self, rank: int) -> Shard:
        """What source ``rank`` owns."""
        stage, tp = self.src.coords(rank)
        return Shard(rank, stage, tp, self._src_layers[stage], self._src_heads[tp])

    def dst_shard(self, rank: int) -> Shard:
        """What destination ``rank`` owns."""
        stage, tp = self.dst.coords(rank)
        return Shard(rank, stage, tp, self._dst_layers[stage], self._dst_heads[tp])

    def _head_sources(self, heads: range, dst_tp: int) -> list[tuple[int, range]]:
        """Contiguous runs of ``heads`` with the source tensor-parallel rank each run comes from."""
        runs: list[tuple[int, range]] = []
        for h in heads:
            owners = [t for t, own in enumerate(self._src_heads) if h in own]
            src_tp = owners[dst_tp % len(owners)]
            if runs and runs[-1][0] == src_tp and runs[-1][1].stop == h:
                runs[-1] = (src_tp, range(runs[-1][1].start, h + 1))
            else:
                runs.append((src_tp, range(h, h + 1)))
        return runs

    def transfers(self, tokens: range | tuple[int, int], batch: range | tuple[int, int] | None = None) -> list[Transfer]:
        """Every transfer, sorted by ``(dst, src, first layer, first head)``.

        Parameters
        ----------
        tokens : range or (start, stop)
            Token positions to move (the prompt ``[0, T)``, or one decode step ``[T, T+1)``).
        batch : range or (start, stop), optional
            Batch rows; ``None`` means every row of the tensors the regions are applied to.
        """
        out: list[Transfer] = []
        for dst in range(self.dst.world_size):
            shard = self.dst_shard(dst)
            for s_stage, s_layers in enumerate(self._src_layers):
                lo, hi = max(s_layers.start, shard.layers.start), min(s_layers.stop, shard.layers.stop)
                if lo >= hi:
                    continue
                for src_tp, heads in self._head_sources(shard.heads, shard.tp_rank):
                    region = Region(layers=range(lo, hi), tokens=tokens, batch=batch, heads=heads)
                    out.append(Transfer(self.src.rank(s_stage, src_tp), dst, region))
        out.sort(key=lambda t: (t.dst, t.src, t.region.layers.start, t.region.heads.start))
        return out

    def outgoing(self, rank: int, tokens, batch=None) -> list[Transfer]:
        """The transfers source ``rank`` sends."""
        self.src.coords(rank)
        return [t for t in self.transfers(tokens, batch) if t.src == rank]

    def incoming(self, rank: int, tokens, batch=None) -> list[Transfer]:
        """The transfers destination ``rank`` receives."""
        self.dst.coords(rank)
        return [t for t in self.transfers(tokens, batch) if t.dst == rank]


def transfer_key(session: str, transfer: Transfer) -> str:
    """The deterministic transport key of ``transfer`` in ``session``; both sides compute it alike.

    ``{session}/xfer/s{src:04d}-d{dst:04d}/l{l0}-{l1}/h{h0}-{h1}/b{b0}-{b1}/t{t0}-{t1}`` (``b*`` for every
    row when the region's batch is ``None``).
    """
    r = transfer.region
    batch = "b*" if r.batch is None else f"b{r.batch.start}-{r.batch.stop}"
    return (f"{session}/xfer/s{transfer.src:04d}-d{transfer.dst:04d}/l{r.layers.start}-{r.layers.stop}/"
            f"h{r.heads.start}-{r.heads.stop}/{batch}/t{r.tokens.start}-{r.tokens.stop}")


__all__ = ["PipelineConfig", "Shard", "Transfer", "Placement", "split_layers", "split_heads", "localize",
           "transfer_key"]
