"""Helpers shared by the prefix-store tests: KV that depends on the whole prefix, like a real model's."""

from __future__ import annotations

import torch

LAYERS, HEADS, HEAD_DIM = 2, 2, 4


def token_kv(prefix_state: int, layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[layers, 2, heads, head_dim]`` random KV of one token, drawn from a seed that names its whole prefix."""
    g = torch.Generator().manual_seed(prefix_state)
    return torch.randn((layers, 2, heads, head_dim), generator=g).to(dtype)


def prefix_kv(ids, layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM,
              dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values ``[1, heads, T, head_dim]`` of ``ids``: token ``i``'s KV depends on ``ids[:i+1]``.

    Two sequences with a common prefix get the same KV over it (as a causal model gives), so any KV a
    store returns for a prefix can be checked bit-exactly against ``prefix_kv`` of that prefix.
    """
    state, rows = 0, []
    for t in ids:
        state = (state * 1_000_003 + int(t) + 1) % (1 << 61)
        rows.append(token_kv(state, layers, heads, head_dim, dtype))
    if not rows:
        empty = torch.empty((1, heads, 0, head_dim), dtype=dtype)
        return [empty.clone() for _ in range(layers)], [empty.clone() for _ in range(layers)]
    kv = torch.stack(rows, dim=2)  # [layers, 2, T, heads, head_dim]
    kv = kv.permute(0, 1, 3, 2, 4).unsqueeze(2)  # [layers, 2, 1, heads, T, head_dim]
    return [kv[l, 0].contiguous() for l in range(layers)], [kv[l, 1].contiguous() for l in range(layers)]


def assert_match_is_prefix_kv(match, ids, n: int) -> None:
    """The loaded match holds exactly the KV of ``ids[:n]`` (bit for bit) in every layer."""
    assert match.matched_tokens == n
    if n == 0:
        assert match.keys == [] and match.values == []
        return
    keys, values = prefix_kv(list(ids)[:n])
    assert len(match.keys) == len(keys)
    for l in range(len(keys)):
        assert match.keys[l].shape == keys[l].shape
        assert torch.equal(match.keys[l], keys[l]), f"layer {l} keys differ"
        assert torch.equal(match.values[l], values[l]), f"layer {l} values differ"
