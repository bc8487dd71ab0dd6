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

A :class:`Region` says which part of an HF-layout cache a chunk holds: contiguous ranges of layers,
batch rows, KV heads and tokens. Contiguous ranges cover every use: a pipeline stage owns contiguous
layers, a microbatch contiguous rows, a tensor-parallel rank contiguous heads.

What a chunk looks like in bytes (its header, checksums, wire frames) lives one floor up, in
:mod:`kvstream.chunk`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import LayoutError

#: Axis order of a packed chunk taken from the HF layout.
PACKED_AXES: tuple[str, ...] = ("layer", "kv", "batch", "head", "token", "head_dim")
#: Axis order of a packed chunk taken from the paged layout.
PACKED_PAGED_AXES: tuple[str, ...] = ("layer", "kv", "block", "block_token", "head", "head_dim")

#: dtypes a KV chunk may have, by the name written into headers.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Name of ``dtype`` as written into chunk headers (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises
    ------
    LayoutError
        If kvstream does not ship chunks of this dtype.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise LayoutError(f"Unsupported KV dtype {dtype}; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`. Raises :class:`LayoutError` for an unknown name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise LayoutError(f"Unknown KV dtype name {name!r}; known: {sorted(DTYPES)}") from None


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
        return Region(layers=self.layers, tokens=self.tokens, batch=batch, heads=heads)

    def packed_shape(self, head_dim: int) -> tuple[int, int, int, int, int, int]:
        """Shape of the packed chunk of this region, in :data:`PACKED_AXES` order.

        Raises
        ------
        LayoutError
            If the region is not resolved (batch or heads is ``None``).
        """
        if not self.is_resolved:
            raise LayoutError("Region.packed_shape needs explicit batch and heads; call resolve() first")
        return (len(self.layers), 2, len(self.batch), len(self.heads), len(self.tokens), int(head_dim))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: each range as ``[start, stop]`` (or ``None``)."""

        def enc(r: range | None):
            return None if r is None else [r.start, r.stop]

        return {"layers": enc(self.layers), "tokens": enc(self.tokens), "batch": enc(self.batch), "heads": enc(self.heads)}

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
        Elements per head.
    dtype : torch.dtype
        Element type of the cache.

    Examples
    --------
    >>> KVLayout(num_layers=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16).bytes_per_token(batch_size=1)
    131072
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {v!r}")
        dtype_name(self.dtype)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> "KVLayout":
        """Read the layout off a transformers ``PretrainedConfig`` (Llama, GPT-2, OPT, BLOOM, Qwen2, Mistral, ...).

        Uses ``num_hidden_layers``, ``num_key_value_heads`` (falling back to ``num_attention_heads``) and
        ``head_dim`` (falling back to ``hidden_size // num_attention_heads``); the names go through each
        config's ``attribute_map``, so GPT-2's ``n_layer``/``n_head`` work too.

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
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None)
        if not head_dim:
            hidden = int(config.hidden_size)
            if hidden % heads:
                raise LayoutError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        if dtype is None:
            dtype = config_dtype(config) or torch.float32
        return cls(num_layers=num_layers, kv_heads=int(kv_heads), head_dim=int(head_dim), dtype=dtype)

    def bytes_per_token(self, batch_size: int = 1) -> int:
        """Bytes of K and V for one token of every layer, for ``batch_size`` rows."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * batch_size * self.kv_heads * self.head_dim * itemsize

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        """Inverse of :meth:`to_dict`."""
        return cls(num_layers=int(d["num_layers"]), kv_heads=int(d["kv_heads"]), head_dim=int(d["head_dim"]),
                   dtype=dtype_from_name(d["dtype"]))


#: Config attributes that decide whether stored KV is valid for a model (read through each config's
#: ``attribute_map``, so GPT-2's ``n_layer``/``n_head`` count): who the model is, its attention geometry,
#: and its positions (rope base, scaling and partial rotary; the context length; sliding windows).
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "architectures", "model_type", "_name_or_path", "num_hidden_layers", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "max_position_embeddings", "position_embedding_type", "sliding_window", "layer_types", "alibi",
)


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a transformers config declares (``config.dtype``, or ``torch_dtype`` of older versions), if any.

    A config built in code often declares none (``None``), and ``model.to(dtype)`` does not update it.
    """
    declared = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.replace("torch.", ""))
    return declared if isinstance(declared, torch.dtype) else None


def kv_identity(config: Any) -> dict[str, Any]:
    """The fields of :data:`FINGERPRINT_FIELDS` a config has, as a JSON-able dict (text config of a
    multimodal model). No transformers import: attributes are read."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    out: dict[str, Any] = {"config_class": type(config).__name__}
    for name in FINGERPRINT_FIELDS:
        v = getattr(config, name, None)
        if v is not None:
            out[name] = v
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def kv_fingerprint(config: Any, dtype: torch.dtype | None = None) -> str:
    """A fingerprint of what makes KV valid for a model: 32 hex digits of BLAKE2b.

    It covers the model's identity and geometry (:data:`FINGERPRINT_FIELDS`: architecture and
    ``model_type``, ``_name_or_path``, layers, attention and KV heads, ``head_dim``, rope settings, context
    length, sliding windows) and the KV ``dtype`` (default: :func:`config_dtype`; ``"unspecified"`` if the
    config declares none). Two configs with one fingerprint produce interchangeable KV, as far as a config
    can tell: two checkpoints with the same name and shape but other weights cannot be told apart.

    Parameters
    ----------
    config : transformers.PretrainedConfig or any object with those attributes
    dtype : torch.dtype, optional
        Element type of the KV.

    Examples
    --------
    >>> from kvstream.models import tiny_config
    >>> a, b = tiny_config("llama"), tiny_config("llama")
    >>> b._name_or_path = "another/model"
    >>> kv_fingerprint(a, torch.float16) != kv_fingerprint(b, torch.float16) != kv_fingerprint(b, torch.float32)
    True
    """
    dtype = dtype if dtype is not None else config_dtype(config)
    doc = {"model": kv_identity(config), "dtype": dtype_name(dtype) if dtype is not None else "unspecified"}
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_hf_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], region: Region,
                    *, name: str = "keys") -> Region:
    """Validate per-layer HF-layout tensors against a region and return the region resolved.

    Parameters
    ----------
    keys, values : sequence of torch.Tensor
        One tensor per model layer (indexable by the region's layer ids), each ``[batch, kv_heads, seq,
        head_dim]`` with stride 1 on ``head_dim``; all on one device, of one dtype, with equal batch,
        ``kv_heads`` and ``head_dim``. ``seq`` may differ between layers (sliding windows) but must reach
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
    b, h, _, d = first.shape
    for l in region.layers:
        for kind, t in (("keys", keys[l]), ("values", values[l])):
            if t.dim() != 4 or t.shape[0] != b or t.shape[1] != h or t.shape[3] != d:
                raise LayoutError(f"Invalid shape of {kind}[{l}]: expected [{b}, {h}, >={region.tokens.stop}, {d}], "
                                  f"got {list(t.shape)}")
            if t.shape[2] < region.tokens.stop:
                raise LayoutError(f"Invalid shape of {kind}[{l}]: expected [{b}, {h}, >={region.tokens.stop}, {d}], "
                                  f"got {list(t.shape)} (region tokens [{region.tokens.start}, {region.tokens.stop}))")
            if t.dtype != first.dtype:
                raise LayoutError(f"{kind}[{l}] has dtype {t.dtype}, expected {first.dtype}")
            if t.device != first.device:
                raise LayoutError(f"{kind}[{l}] is on {t.device}, expected {first.device}")
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
