"""The embedded models: real transformers architectures built from a config with seeded random weights.

No model hub is reachable where kvstream is built and tested, so demos, tests and benchmarks build the
model from its config. The code path is the real one (transformers' own modeling files); bit-exact
comparisons need the same weights in every process, not trained ones, and the same seed gives them.

``--model PATH`` (a local checkpoint directory with ``config.json`` and weights) loads a real model
instead, through ``AutoModelForCausalLM.from_pretrained(PATH)``.

Prompts are real text shipped with the package (``kvstream/data/prompts.txt``) turned into token ids
byte by byte (:func:`encode_text`): no tokenizer download needed, and every id is < 256, so any model
with a vocabulary of 256 or more accepts them. A checkpoint directory that ships a tokenizer
(:func:`load_tokenizer`) has the prompts encoded, and the output decoded, with it instead.
"""

from __future__ import annotations

import importlib.resources
import os
import warnings
from typing import Any

import torch

from .errors import ConfigError

#: Files of which a checkpoint directory holds at least one when it ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

#: Architectures the tiny builders know, by short name.
ARCHITECTURES = ("llama", "gpt2", "opt", "bloom", "qwen2", "mistral", "deepseek_v3")


#: Weight std of the embedded models. transformers' default (0.02) makes tiny random GPT-2/OPT/BLOOM models
#: emit one token over and over, so an "identical output" check could not fail; 0.2 makes the output depend
#: on the context (measured: 4-12 distinct tokens in 12 greedy steps instead of 1-2).
INIT_STD = 0.2


def tiny_config(arch: str = "llama", *, num_layers: int = 4, vocab_size: int = 320, sliding_window: int | None = None) -> Any:
    """A tiny transformers config of architecture ``arch`` for CPU tests and the CPU demo.

    Parameters
    ----------
    arch : {"llama", "gpt2", "opt", "bloom", "qwen2", "mistral", "deepseek_v3"}
        The transformers architecture. ``deepseek_v3`` is multi-head latent attention with a mixture of
        experts: its cache holds one head of a 16-element latent as keys and of an 8-element rotary key as
        values (K and V of different head dims).
    num_layers : int
        Decoder layers.
    vocab_size : int
        Vocabulary size; at least 256 so byte-level ids fit.
    sliding_window : int, optional
        For ``mistral``/``qwen2``: a sliding window in tokens (exercises DynamicSlidingWindowLayer).

    Raises
    ------
    ConfigError
        For an unknown architecture.
    """
    import transformers as tf

    common = dict(vocab_size=vocab_size, initializer_range=INIT_STD)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                sliding_window=sliding_window, **common)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             use_sliding_window=sliding_window is not None,
                             sliding_window=sliding_window, max_window_layers=0, **common)
        return cfg
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=num_layers, n_head=4, n_positions=1024,
                             bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=num_layers, num_attention_heads=4,
                            max_position_embeddings=1024, word_embed_proj_dim=64, **common)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=num_layers, n_head=4, **common)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                                   topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8,
                                   max_position_embeddings=1024, **common)
    raise ConfigError(f"Unknown architecture {arch!r}; known: {ARCHITECTURES}")


def llama3_8b_config(num_layers: int = 32) -> Any:
    """A transformers ``LlamaConfig`` with Llama-3-8B's shapes (32 layers, 32 heads, 8 KV heads, head_dim 128).

    Shapes from Meta's published Llama-3-8B ``config.json``; ``num_layers`` may be lowered for benchmarks.
    """
    import transformers as tf

    return tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                          initializer_range=INIT_STD / 2)


def build_model(config: Any, *, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build ``AutoModelForCausalLM`` from ``config`` with weights drawn from a seeded generator.

    The same ``config``, ``seed``, ``device`` and ``dtype`` give bit-identical weights in every process.
    The weights are created directly on ``device`` (no host copy of an 8B model).

    Returns
    -------
    torch.nn.Module
        The model in eval mode.
    """
    import transformers as tf

    device = torch.device(device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = getattr(model.generation_config, "pad_token_id", None) or 0
    return model


def check_checkpoint(path: str) -> str:
    """``path`` if it is a checkpoint directory (it holds a ``config.json``); what ``--model`` accepts.

    Raises
    ------
    ConfigError
        If it is not.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--model {path!r} is not a checkpoint directory with a config.json")
    return path


def load_model(path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a local checkpoint directory (``--model PATH``) with ``from_pretrained``; no network.

    Raises
    ------
    ConfigError
        If ``path`` is not a directory with a ``config.json``.
    """
    import transformers as tf

    check_checkpoint(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", local_files_only=True)
    return model.to(device).eval()


def load_tokenizer(path: str | None) -> Any | None:
    """The tokenizer of checkpoint directory ``path`` (``AutoTokenizer.from_pretrained``, offline), or ``None``.

    ``None`` without a path, when the directory has none of :data:`TOKENIZER_FILES`, or when its tokenizer
    does not load offline (a warning says why): then prompts are byte ids and outputs print as ids.
    """
    if not path or not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError) as e:  # missing backend (sentencepiece), bad files
        warnings.warn(f"--model {path!r}: its tokenizer does not load ({type(e).__name__}: {e}); prompts are byte "
                      "ids and outputs print as ids", stacklevel=2)
        return None


def prompts() -> list[str]:
    """The real text prompts shipped with kvstream (one paragraph each)."""
    text = importlib.resources.files("kvstream").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def encode_text(text: str, length: int | None = None, tokenizer: Any = None) -> list[int]:
    """Token ids of ``text``: byte-level (UTF-8 bytes, each id < 256), or ``tokenizer``'s (no special tokens).

    With ``length``, the ids are cut or repeated (the text again) to exactly ``length`` tokens.
    """
    if tokenizer is not None:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = list(text.encode("utf-8"))
    if length is not None:
        if not ids:
            raise ConfigError("encode_text: empty text cannot fill a length")
        while len(ids) < length:
            ids = ids + ids
        ids = ids[:length]
    return ids


def decode_ids(ids: list[int], tokenizer: Any = None) -> str:
    """Inverse of :func:`encode_text`: ``tokenizer.decode`` (special tokens skipped), or bytes for ids < 256
    (larger ids, a random model's, show as ``?``)."""
    if tokenizer is not None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    return bytes(i if i < 256 else 63 for i in ids).decode("utf-8", errors="replace")


def batch_of_prompts(batch_size: int, length: int, *, device: str | torch.device = "cpu",
                     tokenizer: Any = None) -> torch.Tensor:
    """``[batch_size, length]`` int64 ids from the shipped prompts, one prompt per row (cycling); encoded
    byte by byte, or with ``tokenizer`` (:func:`encode_text`)."""
    ps = prompts()
    rows = [encode_text(ps[i % len(ps)], length, tokenizer) for i in range(batch_size)]
    return torch.tensor(rows, dtype=torch.long, device=device)


__all__ = ["ARCHITECTURES", "tiny_config", "llama3_8b_config", "build_model", "check_checkpoint", "load_model",
           "load_tokenizer", "TOKENIZER_FILES", "prompts", "encode_text", "decode_ids", "batch_of_prompts"]
