"""What a piece of KV cache is: the one source of truth for tensor layouts, regions and packed chunks.

Three shapes matter in kvstream:

* **HF layout** — one key and one value tensor per layer, ``[batch, kv_heads, seq, head_dim]``, any
  strides as long as ``head_dim`` is contiguous (stride 1). This is what transformers' ``DynamicCache``
  (contiguous tensors), ``StaticCache`` (preallocated ``max_cache_len``) and views of either hold.
* **Paged layout** — vLLM/FlashInfer "NHD": one key and one value tensor per layer,
  ``[num_blocks, block_size, kv_heads, head_dim]``, addressed by block ids.
* **Packed chunk** — the contiguous buffer that kernels produce and transports ship. Its axis order is
  fixed (:data:`PACKED_AXES`)::

      [layers, 2 (K, V), batch, kv_heads, tokens, head_dim]        # from the HF layout
      [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]   # from the paged layout

  A decode step (the newest token of every layer) is the same order with ``tokens == 1``.

  Keys and values of different head dims (MLA: DeepSeek-V2/V3 cache a latent of ``kv_lora_rank`` and a
  rotary key of ``qk_rope_head_dim`` per token) cannot share a ``head_dim`` axis. Their chunk keeps every
  axis but ``kv`` and puts each row's keys and then its values side by side on the last one
  (:data:`PACKED_SPLIT_AXES`, :func:`packed_kv_shape`)::

      [layers, batch, kv_heads, tokens, head_dim_k + head_dim_v]         # from the HF layout
      [layers, blocks, block_size, kv_heads, head_dim_k + head_dim_v]    # from the paged layout

  so that tokens, rows and heads stay tensor axes (slices, concatenation and the per-layer checksums work
  as for the other form), and :func:`packed_kv` gives the K and V parts of either form. The chunk header
  records the two head dims (:mod:`kvstream.chunk`). Chunks of one head dim keep the first form.

A :class:`Region` says which part of an HF-layout cache a chunk holds: contiguous ranges of layers,
batch rows, KV heads and tokens. Contiguous ranges cover every use: a pipeline stage owns contiguous
layers, a microbatch contiguous rows, a tensor-parallel rank contiguous heads.

What a chunk looks like in bytes (its header, checksums, wire frames) lives one floor up, in
:mod:`kvstream.chunk`. The dtype names (:mod:`kvstream.dtypes`) and the model fingerprint
(:mod:`kvstream.fingerprint`) live one floor down; this module re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .dtypes import DTYPES, config_dtype, dtype_from_name, dtype_name
from .errors import LayoutError
from .fingerprint import FINGERPRINT_FIELDS, kv_fingerprint, kv_identity

#: Axis order of a packed chunk taken from the HF layout.
PACKED_AXES: tuple[str, ...] = ("layer", "kv", "batch", "head", "token", "head_dim")
#: Axis order of a packed chunk taken from the paged layout.
PACKED_PAGED_AXES: tuple[str, ...] = ("layer", "kv", "block", "block_token", "head", "head_dim")
#: Axis order of a packed chunk of keys and values with different head dims (HF layout): each row's
#: ``head_dim_k`` keys, then its ``head_dim_v`` values, on the last axis.
PACKED_SPLIT_AXES: tuple[str, ...] = ("layer", "batch", "head", "token", "kv_head_dim")

def _as_range(value: range | Sequence[int] | None, what: str) -> range | None:
    if value is None:
        return None
    if isinstance(value, range):
        r = value
    else:
        if len(value) != 2:
            raise LayoutError(f"{what} must be a range or a (start, stop) pair, got {value!r}")
        r = range(int(value[0]), int(value[1]))
    if r.step != 1:
        raise LayoutError(f"{what} must be contiguous (step 1), got {r!r}")
    if r.start < 0 or r.stop < r.start:
        raise LayoutError(f"{what} must satisfy 0 <= start <= stop, got [{r.start}, {r.stop})")
    return r


def packed_kv_shape(layers: int, middle: Sequence[int], head_dim: int,
                    head_dim_v: int | None = None) -> tuple[int, ...]:
    """Shape of a packed chunk: ``[L, 2, *middle, D]``, or ``[L, *middle, Dk + Dv]`` when ``head_dim_v``
    differs from ``head_dim`` (see the module docstring).

    ``middle`` is ``(batch, kv_heads, tokens)`` for the HF layout and ``(blocks, block_size, kv_heads)`` for
    the paged one.

    Examples
    --------
    >>> packed_kv_shape(32, (16, 8, 1), 128)
    (32, 2, 16, 8, 1, 128)
    >>> packed_kv_shape(61, (1, 1, 1), 512, 64)
    (61, 1, 1, 1, 576)
    """
    middle = tuple(int(m) for m in middle)
    if head_dim_v is None or head_dim_v == head_dim:
        return (int(layers), 2, *middle, int(head_dim))
    return (int(layers), *middle, int(head_dim) + int(head_dim_v))


def packed_kv(chunk: torch.Tensor, head_dim_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and the values of a packed chunk, as views (no copy).

    Parameters
    ----------
    chunk : torch.Tensor
        A 6-D packed chunk ``[L, 2, ...]`` (keys at ``[:, 0]``, values at ``[:, 1]``), or a 5-D one of split
        head dims ``[L, ..., Dk + Dv]`` (keys the first ``head_dim_k`` elements of the last axis).
    head_dim_k : int, optional
        Keys' head dim; needed for a 5-D chunk.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[L, ..., Dk]`` and ``[L, ..., Dv]``, on the chunk's device.

    Raises
    ------
    LayoutError
        For a chunk of another rank, or a 5-D chunk without a ``head_dim_k`` that splits its last axis.
    """
    if chunk.dim() == 6:
        return chunk[:, 0], chunk[:, 1]
    if chunk.dim() == 5 and head_dim_k is not None and 0 < head_dim_k < chunk.shape[4]:
        return chunk[..., :head_dim_k], chunk[..., head_dim_k:]
    raise LayoutError(f"Not a packed chunk: shape {list(chunk.shape)} (expected [L, 2, ..., head_dim], or "
                      f"[L, ..., head_dim_k + head_dim_v] with head_dim_k given; got head_dim_k={head_dim_k})")


@dataclass(frozen=True)
class Region:
    """A box of KV cache in the HF layout: ``[layers) x [batch) x [heads) x [tokens)``, all of ``head_dim``.

    Parameters
    ----------
    layers : range or (start, stop)
        Layer indices, contiguous.
    tokens : range or (start, stop)
        Token positions ``[start, stop)`` along the ``seq`` axis of each layer's tensors.
    batch : range or (start, stop), optional
        Batch rows; ``None`` means every row of the tensors it is applied to.
    heads : range or (start, stop), optional
        KV heads; ``None`` means every head.

    Raises
    ------
    LayoutError
        If a range is not contiguous or has ``stop < start`` or a negative start.

    Examples
    --------
    >>> r = Region(layers=range(0, 32), tokens=(0, 1500))
    >>> r.resolve(batch_size=16, kv_heads=8).packed_shape(head_dim=128)
    (32, 2, 16, 8, 1500, 128)
    """

    layers: range
    tokens: range
    batch: range | None = None
    heads: range | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _as_range(self.layers, "Region.layers"))
        object.__setattr__(self, "tokens", _as_range(self.tokens, "Region.tokens"))
        object.__setattr__(self, "batch", _as_range(self.batch, "Region.batch"))
        object.__setattr__(self, "heads", _as_range(self.heads, "Region.heads"))

    @property
    def is_resolved(self) -> bool:
        """True when batch and heads are given explicitly."""
        return self.batch is not None and self.heads is not None

    def resolve(self, batch_size: int, kv_heads: int) -> "Region":
        """The same region with ``None`` batch/heads replaced by every row/head, checked against the sizes.

        Raises
        ------
        LayoutError
            If the region's batch rows or heads fall outside ``batch_size`` / ``kv_heads``.
        """
        batch = self.batch if self.batch is not None else range(0, batch_size)
        heads = self.heads if self.heads is not None else range(0, kv_heads)
        if batch.stop > batch_size:
            raise LayoutError(f"Region batch rows [{batch.start}, {batch.stop}) exceed batch size {batch_size}")
        if heads.stop > kv_heads:
            raise LayoutError(f"Region heads [{heads.start}, {heads.stop}) exceed kv_heads {kv_heads}")
        if batch is self.batch and heads is self.heads:
            return self  # resolved already (frozen: the same region)
        return Region(layers=self.layers, tokens=self.tokens, batch=batch, heads=heads)

    def packed_shape(self, head_dim: int, head_dim_v: int | None = None) -> tuple[int, ...]:
        """Shape of the packed chunk of this region, in :data:`PACKED_AXES` order (in
        :data:`PACKED_SPLIT_AXES` order when ``head_dim_v`` differs from ``head_dim``: :func:`packed_kv_shape`).

        Raises
        ------
        LayoutError
            If the region is not resolved (batch or heads is ``None``).
        """
        if not self.is_resolved:
            raise LayoutError("Region.packed_shape needs explicit batch and heads; call resolve() first")
        return packed_kv_shape(len(self.layers), (len(self.batch), len(self.heads), len(self.tokens)), head_dim,
                               head_dim_v)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: each range as ``[start, stop]`` (or ``None``)."""

        def _enc(r: range | None):
            return None if r is None else [r.start, r.stop]

        return {"layers": _enc(self.layers), "tokens": _enc(self.tokens), "batch": _enc(self.batch), "heads": _enc(self.heads)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        """Inverse of :meth:`to_dict`. Raises :class:`LayoutError` on a malformed dict."""
        try:
            return cls(layers=d["layers"], tokens=d["tokens"], batch=d.get("batch"), heads=d.get("heads"))
        except (KeyError, TypeError) as e:
            raise LayoutError(f"Malformed region {d!r}: {e}") from None


@dataclass(frozen=True)
class KVLayout:
    """The per-layer KV geometry of a model: how many layers, KV heads, ``head_dim`` and the dtype.

    Parameters
    ----------
    num_layers : int
        Decoder layers that hold a KV cache.
    kv_heads : int
        Key/value heads per layer (grouped-query attention: fewer than attention heads).
    head_dim : int
        Elements per head of the keys (and of the values, unless ``head_dim_v`` says otherwise).
    dtype : torch.dtype
        Element type of the cache.
    head_dim_v : int, optional
        Elements per head of the values when they differ from the keys' (MLA); ``None``: ``head_dim``.

    Examples
    --------
    >>> KVLayout(num_layers=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16).bytes_per_token(batch_size=1)
    131072
    >>> KVLayout(num_layers=61, kv_heads=1, head_dim=512, dtype=torch.bfloat16, head_dim_v=64).bytes_per_token()
    70272
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    head_dim_v: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim)
        for name in ("num_layers", "kv_heads", "head_dim", "head_dim_v"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {v!r}")
        dtype_name(self.dtype)

    @property
    def head_dim_k(self) -> int:
        """Elements per head of the keys (``head_dim``)."""
        return self.head_dim

    @property
    def split(self) -> bool:
        """Whether keys and values have different head dims (chunks in :data:`PACKED_SPLIT_AXES` order)."""
        return self.head_dim_v != self.head_dim

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> "KVLayout":
        """Read the layout off a transformers ``PretrainedConfig`` (Llama, GPT-2, OPT, BLOOM, Qwen2, Mistral, ...).

        Uses ``num_hidden_layers``, ``num_key_value_heads`` (falling back to ``num_attention_heads``) and
        ``head_dim`` (falling back to ``hidden_size // num_attention_heads``); the names go through each
        config's ``attribute_map``, so GPT-2's ``n_layer``/``n_head`` work too. A ``v_head_dim`` other than
        ``head_dim`` becomes ``head_dim_v``. An MLA config (one with ``kv_lora_rank``: DeepSeek-V2/V3,
        MiniCPM3, ...) caches what transformers 5 caches for it: one head of the compressed latent
        (``kv_lora_rank`` elements, the "keys") and of the rotary key (``qk_rope_head_dim``, the "values"),
        as ``DeepseekV3Attention`` does in transformers 5.17 and 5.24.

        Raises
        ------
        LayoutError
            If the config lacks the attributes or they are inconsistent.
        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        try:
            num_layers = int(config.num_hidden_layers)
            heads = int(config.num_attention_heads)
        except AttributeError as e:
            raise LayoutError(f"Config {type(config).__name__} lacks layer/head counts: {e}") from None
        if dtype is None:
            dtype = config_dtype(config) or torch.float32
        if getattr(config, "kv_lora_rank", None):
            return cls(num_layers=num_layers, kv_heads=1, head_dim=int(config.kv_lora_rank), dtype=dtype,
                       head_dim_v=int(config.qk_rope_head_dim))
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None)
        if not head_dim:
            hidden = int(config.hidden_size)
            if hidden % heads:
                raise LayoutError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        head_dim_v = getattr(config, "v_head_dim", None) or head_dim
        return cls(num_layers=num_layers, kv_heads=int(kv_heads), head_dim=int(head_dim), dtype=dtype,
                   head_dim_v=int(head_dim_v))

    def bytes_per_token(self, batch_size: int = 1) -> int:
        """Bytes of K and V for one token of every layer, for ``batch_size`` rows."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * batch_size * self.kv_heads * (self.head_dim + self.head_dim_v) * itemsize

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``head_dim_v`` only when it differs from ``head_dim``)."""
        d = {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
             "dtype": dtype_name(self.dtype)}
        if self.split:
            d["head_dim_v"] = self.head_dim_v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        """Inverse of :meth:`to_dict`."""
        return cls(num_layers=int(d["num_layers"]), kv_heads=int(d["kv_heads"]), head_dim=int(d["head_dim"]),
                   dtype=dtype_from_name(d["dtype"]), head_dim_v=int(d.get("head_dim_v", d["head_dim"])))


def check_hf_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                    *, name: str = "keys") -> Region:
    """Validate per-layer HF-layout tensors against a region and return the region resolved.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        One tensor per model layer (indexable by the region's layer ids), each ``[batch, kv_heads, seq,
        head_dim]`` with stride 1 on ``head_dim``; all on one device, of one dtype, with equal batch and
        ``kv_heads``; every key tensor of one ``head_dim`` and every value tensor of one (the two may
        differ: MLA). ``seq`` may differ between layers (sliding windows) but must reach
        ``region.tokens.stop`` on every layer in the region.
    region : Region
        The part to pack or unpack.

    Returns
    -------
    Region
        ``region`` with batch and heads resolved.

    Raises
    ------
    LayoutError
        With the offending layer and the numbers, on any mismatch.
    """
    if len(keys) != len(values):
        raise LayoutError(f"{name}: {len(keys)} key tensors but {len(values)} value tensors")
    if region.layers.stop > len(keys):
        raise LayoutError(f"Region layers [{region.layers.start}, {region.layers.stop}) exceed the {len(keys)} layers given")
    if len(region.layers) == 0:
        raise LayoutError("Region has no layers")
    first = keys[region.layers.start]
    if first.dim() != 4:
        raise LayoutError(f"Invalid shape of {name}[{region.layers.start}]: expected [batch, kv_heads, seq, head_dim], "
                          f"got {list(first.shape)}")
    b, h, _, dk = first.shape
    dv = values[region.layers.start].shape[-1] if values[region.layers.start].dim() == 4 else dk
    dtype, device, stop = first.dtype, first.device, region.tokens.stop
    for l in region.layers:
        for kind, t, d in (("keys", keys[l], dk), ("values", values[l], dv)):
            s = t.shape
            if len(s) != 4 or s[0] != b or s[1] != h or s[3] != d:
                raise LayoutError(f"Invalid shape of {kind}[{l}]: expected [{b}, {h}, >={stop}, {d}], got {list(s)}")
            if s[2] < stop:
                raise LayoutError(f"Invalid shape of {kind}[{l}]: expected [{b}, {h}, >={stop}, {d}], "
                                  f"got {list(s)} (region tokens [{region.tokens.start}, {stop}))")
            if t.dtype != dtype:
                raise LayoutError(f"{kind}[{l}] has dtype {t.dtype}, expected {dtype}")
            if t.device != device:
                raise LayoutError(f"{kind}[{l}] is on {t.device}, expected {device}")
            if d > 1 and t.stride(3) != 1:
                raise LayoutError(f"{kind}[{l}] has stride {t.stride(3)} on head_dim; head_dim must be contiguous (stride 1)")
    return region.resolve(batch_size=b, kv_heads=h)


def check_packed(chunk: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, *, name: str = "chunk") -> None:
    """Check that a packed chunk is contiguous with the expected shape and dtype.

    Raises
    ------
    LayoutError
        If ``chunk`` has another shape or dtype, or is not contiguous.
    """
    if tuple(chunk.shape) != tuple(shape):
        raise LayoutError(f"Invalid shape of {name}: expected {list(shape)}, got {list(chunk.shape)}")
    if chunk.dtype != dtype:
        raise LayoutError(f"Invalid dtype of {name}: expected {dtype}, got {chunk.dtype}")
    if not chunk.is_contiguous():
        raise LayoutError(f"{name} must be contiguous (a packed chunk), got strides {chunk.stride()}")


__all__ = [
    "PACKED_AXES",
    "PACKED_PAGED_AXES",
    "PACKED_SPLIT_AXES",
    "packed_kv_shape",
    "packed_kv",
    "DTYPES",
    "dtype_name",
    "dtype_from_name",
    "Region",
    "KVLayout",
    "FINGERPRINT_FIELDS",
    "config_dtype",
    "kv_identity",
    "kv_fingerprint",
    "check_hf_layers",
    "check_packed",
]
