"""What makes KV valid for a model: the config fields that decide it and their fingerprint.

KV computed by one model is garbage for another of the same shape, so sessions, chunks and prefix stores
record the producing model's fingerprint and refuse KV of another (:mod:`kvstream.streaming.session`,
:mod:`kvstream.stores.identity`). :mod:`kvstream.layout` re-exports every name here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .dtypes import config_dtype, dtype_name

#: Config attributes that decide whether stored KV is valid for a model (read through each config's
#: ``attribute_map``, so GPT-2's ``n_layer``/``n_head`` count): who the model is, its attention geometry,
#: and its positions (rope base, scaling and partial rotary; the context length; sliding windows); MLA's
#: latent and rotary sizes, and a value head dim of its own.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "architectures", "model_type", "_name_or_path", "num_hidden_layers", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "max_position_embeddings", "position_embedding_type", "sliding_window", "layer_types", "alibi",
    "v_head_dim", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
)


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


__all__ = ["FINGERPRINT_FIELDS", "kv_identity", "kv_fingerprint"]
