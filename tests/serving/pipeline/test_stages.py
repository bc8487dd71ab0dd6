"""Stage splitting: the stages of a split model give the whole model's logits and greedy tokens, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kvstream.errors import ConfigError
from kvstream.models import build_model, tiny_config
from kvstream.serving.pipeline.stages import StageModel, greedy, positions_from_mask
from kvstream.serving.worker import generate

ARCHS = ("llama", "qwen2", "mistral", "deepseek_v3", "gpt2", "opt", "bloom")


def _stages(arch: str, depth: int, layers: int = 5) -> list[StageModel]:
    return [StageModel(build_model(tiny_config(arch, num_layers=layers), seed=3), s, depth) for s in range(depth)]


def _batch():
    ids = torch.tensor([[0, 0, 0, 11, 12, 13, 14], [5, 6, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    return ids, mask


def _run(stages, ids, mask, positions, caches):
    x = ids
    for st, cache in zip(stages, caches):
        x = st.forward(x, mask, positions, cache)
    return x


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", [2, 3])
def test_split_prefill_logits_equal_the_whole_model(arch, depth):
    ids, mask = _batch()
    pos = positions_from_mask(mask)
    whole = build_model(tiny_config(arch, num_layers=5), seed=3)
    kw = {"position_ids": pos} if "position_ids" in __import__("inspect").signature(whole.forward).parameters else {}
    with torch.inference_mode():
        want = whole(ids, attention_mask=mask, logits_to_keep=1, **kw).logits[:, -1]
    stages = _stages(arch, depth)
    got = _run(stages, ids, mask, pos, [s.new_cache() for s in stages])
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_greedy_decode_equals_generate(arch):
    """Prefill and eight decode steps through three stages, as the engine runs them: generate's tokens."""
    ids, mask = _batch()
    stages = _stages(arch, 3)
    caches = [s.new_cache() for s in stages]
    eos = stages[-1].model.generation_config.eos_token_id
    pos, m = positions_from_mask(mask), mask
    x, out = ids, []
    for _ in range(8):
        tok = greedy(_run(stages, x, m, pos, caches), eos)
        out.append(tok)
        x, pos = tok[:, None], pos[:, -1:] + 1
        m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], dim=1)
    ref = generate(build_model(tiny_config(arch, num_layers=5), seed=3), ids, mask, 8)
    assert torch.equal(torch.stack(out, dim=1), ref[:, ids.shape[1]:])


def test_stage_owns_only_its_layers_and_the_cache_answers_for_the_others():
    first, last = _stages("llama", 2, layers=4)
    assert (first.layers, last.layers) == (range(0, 2), range(2, 4))
    assert len(first.base.layers) == 2 and isinstance(first.model.lm_head, torch.nn.Identity)
    assert isinstance(first.base.norm, torch.nn.Identity) and not isinstance(last.base.norm, torch.nn.Identity)
    ids, mask = _batch()
    h = first.forward(ids, None, positions_from_mask(torch.ones_like(mask)), c0 := first.new_cache())
    assert h.shape == (2, 7, 64)
    last.forward(h, None, positions_from_mask(torch.ones_like(mask)), c1 := last.new_cache())
    assert [l.get_seq_length() for l in c1.layers] == [0, 0, 7, 7]  # only the stage's layers hold KV
    assert c1.get_seq_length(0) == 7 and c1.get_mask_sizes(1, 0) == (8, 0)  # layer 0 answered by layer 2
    assert c0.get_seq_length(3) == 7


def test_unknown_architecture_and_too_many_stages_are_config_errors():
    model = build_model(tiny_config("llama", num_layers=2))
    with pytest.raises(ConfigError, match="exceeds num_layers"):
        StageModel(model, 0, 3)
    model.config.model_type = "mamba"
    with pytest.raises(ConfigError, match="support model types"):
        StageModel(model, 0, 1)
