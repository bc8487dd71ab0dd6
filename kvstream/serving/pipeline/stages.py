"""Stage splitting: one pipeline stage of a Hugging Face decoder, run through the model's own forward.

A stage owns a contiguous range of decoder layers (:func:`kvstream.streaming.placement.split_layers`);
stage 0 also owns the embeddings, the last stage the final norm and the LM head. Rather than re-implement
each architecture's forward (masks, rotary or ALiBi position encodings, learned positions), a stage keeps
the model object and prunes it: the base model's layer list holds only the stage's layers, and the
modules that belong to other stages are replaced by neutral ones (:data:`ARCHITECTURES`):

* stages after the first pass the previous stage's hidden states as ``inputs_embeds``; what a base model
  adds to ``inputs_embeds`` (GPT-2's ``wpe``, OPT's learned positions and ``project_in``, BLOOM's
  embedding layer norm) becomes a zero or an identity there;
* stages before the last replace the final norm (and OPT's ``project_out``) by an identity.

So every stage runs the installed transformers version's own code (the mask helpers, rotary embeddings,
ALiBi), with the documented forward arguments (``inputs_embeds``, ``attention_mask``, ``position_ids``,
the cache, ``use_cache``). The attention modules keep their global ``layer_idx``, so a stage's
:class:`StageCache` is a ``DynamicCache`` of the whole model in which only the stage's layers fill;
:meth:`StageCache.get_seq_length` and :meth:`StageCache.get_mask_sizes` answer for a layer the stage does
not own (the mask helpers ask for the first full-attention layer, layer 0) with a stage layer of the same
kind. Works for Llama, Qwen2, Mistral, DeepSeek-V3 (MLA), GPT-2, OPT and BLOOM
(tests/serving/pipeline/test_stages.py checks logits and greedy tokens against the whole model on
transformers 5.x).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...errors import ConfigError
from ...streaming.placement import split_layers


class _Zero(torch.nn.Module):
    """A position-embedding stand-in on later stages: adds a 0-dim zero (``x + 0`` is ``x``)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Take the replaced module's arguments, ignore them and return a 0-dim zero (default dtype, CPU)."""
        return torch.zeros(())


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its pieces.

    ``base`` is the attribute path from the causal-LM model to the module whose forward runs the layers;
    ``layers`` that module's layer list; ``later_zero``/``later_identity`` what later stages neutralize
    (modules applied to ``inputs_embeds``); ``head_identity`` what stages before the last neutralize.
    """

    base: tuple[str, ...]
    layers: str
    later_zero: tuple[str, ...] = ()
    later_identity: tuple[str, ...] = ()
    head_identity: tuple[str, ...] = ()


#: model_type -> where its pieces are (transformers 5.x module names).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(("model",), "layers", head_identity=("norm",)),
    "qwen2": Architecture(("model",), "layers", head_identity=("norm",)),
    "mistral": Architecture(("model",), "layers", head_identity=("norm",)),
    "deepseek_v3": Architecture(("model",), "layers", head_identity=("norm",)),
    "gpt2": Architecture(("transformer",), "h", later_zero=("wpe",), head_identity=("ln_f",)),
    "opt": Architecture(("model", "decoder"), "layers", later_zero=("embed_positions",), later_identity=("project_in",),
                        head_identity=("final_layer_norm", "project_out")),
    "bloom": Architecture(("transformer",), "h", later_identity=("word_embeddings_layernorm",), head_identity=("ln_f",)),
}


def architecture(config: Any) -> Architecture:
    """The :class:`Architecture` of a transformers config.

    Raises
    ------
    ConfigError
        For a model type the stage splitter does not know.
    """
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ConfigError(f"pipeline stages support model types {sorted(ARCHITECTURES)}, not {kind!r}")
    return ARCHITECTURES[kind]


class StageCache(DynamicCache):
    """A ``DynamicCache`` of the whole model in which only one stage's layers hold KV.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (all layers: attention modules index the cache by their global ``layer_idx``).
    layers : range
        The stage's layers.
    hooks : object, optional
        Called around each layer's update: ``hooks.before_update(layer_idx, key_states, value_states)``
        (wait for a swap-in, count the bytes about to be allocated) and ``hooks.after_update(layer_idx,
        old_bytes)``. ``None``: a plain ``DynamicCache``.
    """

    def __init__(self, config: Any, layers: range, hooks: Any = None):
        super().__init__(config=config)
        self.stage_layers = layers
        self.hooks = hooks
        sliding = list(self.is_sliding)
        self._stand_in = {}
        for i in range(len(self.layers)):
            if i not in layers:
                same = [l for l in layers if sliding[l] == sliding[i]]
                self._stand_in[i] = same[0] if same else layers.start

    def _own(self, layer_idx: int) -> int:
        return self._stand_in.get(layer_idx, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached in ``layer_idx``, or in a stage layer of the same kind when the stage does not own it."""
        return super().get_seq_length(self._own(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask helpers, answered by a stage layer (see the class docstring)."""
        return super().get_mask_sizes(query_length, self._own(layer_idx))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """``DynamicCache.update`` between the hooks (the arguments pass through as HF's attention gives them)."""
        if self.hooks is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        old = kv_bytes(layer)
        self.hooks.before_update(layer_idx, key_states, value_states)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.hooks.after_update(layer_idx, old)
        return out

    def kv_layers(self) -> list[DynamicLayer]:
        """The stage's cache layers, in layer order."""
        return [self.layers[i] for i in self.stage_layers]


def kv_bytes(layer: Any) -> int:
    """Bytes of a cache layer's keys and values (0 when it holds none)."""
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


class StageModel:
    """One pipeline stage of a causal LM: embeddings (stage 0), a range of layers, norm + LM head (last).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The whole causal-LM model; it is pruned **in place** (its other layers are dropped).
    stage, num_stages : int
        This stage and the pipeline depth; layers by :func:`~kvstream.streaming.placement.split_layers`.

    Raises
    ------
    ConfigError
        For an unknown architecture or more stages than layers.

    Examples
    --------
    >>> first = StageModel(build_model(tiny_config()), 0, 2)       # doctest: +SKIP
    >>> last = StageModel(build_model(tiny_config()), 1, 2)        # doctest: +SKIP
    >>> h = first.forward(ids, mask, positions, first.new_cache())  # doctest: +SKIP
    >>> logits = last.forward(h, mask, positions, last.new_cache())
    """

    def __init__(self, model: torch.nn.Module, stage: int, num_stages: int):
        self.arch = architecture(model.config)
        self.config = model.config
        self.stage, self.num_stages = int(stage), int(num_stages)
        self.layers = split_layers(int(model.config.num_hidden_layers), self.num_stages)[self.stage]
        self.first, self.last = self.stage == 0, self.stage == self.num_stages - 1
        self.model = model
        base = self.base = _get(model, self.arch.base)
        layer_list = getattr(base, self.arch.layers)
        setattr(base, self.arch.layers, torch.nn.ModuleList([layer_list[i] for i in self.layers]))
        types = getattr(base.config, "layer_types", None)
        if types is not None:  # forwards that index config.layer_types by the local layer number
            base.config = copy.copy(base.config)
            base.config.layer_types = list(types)[self.layers.start:self.layers.stop]
        if not self.first:
            for name in self.arch.later_zero:
                setattr(base, name, _Zero())
            for name in self.arch.later_identity:
                if getattr(base, name, None) is not None:
                    setattr(base, name, torch.nn.Identity())
        if not self.last:
            for name in self.arch.head_identity:
                if getattr(base, name, None) is not None:
                    setattr(base, name, torch.nn.Identity())
            model.lm_head = torch.nn.Identity()
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.hidden_size = int(model.config.hidden_size)

    def new_cache(self, hooks: Any = None) -> StageCache:
        """An empty :class:`StageCache` for one microbatch on this stage."""
        return StageCache(self.config, self.layers, hooks)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor,
                cache: StageCache) -> torch.Tensor:
        """Run the stage on one microbatch step.

        Parameters
        ----------
        x : torch.Tensor
            Stage 0: token ids ``[B, T]`` int64; later stages: hidden states ``[B, T, hidden]`` of the model
            dtype. On the stage's device.
        attention_mask : torch.Tensor or None
            ``[B, past + T]`` int64 (1 = attend), or ``None`` without padding (as ``generate`` drops it).
        positions : torch.Tensor
            ``[B, T]`` int64 position ids (``generate``'s: the mask's cumulative sum minus one).
        cache : StageCache
            The microbatch's cache on this stage; updated in place.

        Returns
        -------
        torch.Tensor
            Hidden states ``[B, T, hidden]``, or on the last stage the logits of the last position
            ``[B, vocab]`` (as ``generate`` computes them: the LM head on the last position only).
        """
        kw: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": True, self._cache_kw: cache}
        if self.takes_positions:
            kw["position_ids"] = positions
        with torch.inference_mode():
            if self.first:
                hidden = self.base(input_ids=x, **kw).last_hidden_state
            else:
                hidden = self.base(inputs_embeds=x, **kw).last_hidden_state
            if not self.last:
                return hidden
            return self.model.lm_head(hidden[:, -1:, :])[:, -1]


def greedy(logits: torch.Tensor, eos_token_id: Any) -> torch.Tensor:
    """Greedy next tokens ``[B]`` int64 from last-position logits ``[B, vocab]``, EOS suppressed.

    What ``generate(do_sample=False, min_new_tokens=N)`` does before its length is reached: the logits in
    float32, EOS set to ``-inf`` (``MinNewTokensLengthLogitsProcessor``), then ``argmax``.
    """
    scores = logits.to(torch.float32, copy=True)
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        scores[:, ids] = -float("inf")
    return scores.argmax(dim=-1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``generate``'s prefill position ids ``[B, T]``: cumulative sum of the mask minus one, 0 on padding."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


__all__ = ["ARCHITECTURES", "Architecture", "architecture", "StageCache", "StageModel", "kv_bytes", "greedy",
           "positions_from_mask"]
