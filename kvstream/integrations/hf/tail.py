"""Decode steps streamed in bulk: the newest tokens of ``steps_per_chunk`` steps go out as one chunk.

Every decode step adds one token per layer, and streaming it at once costs the host the same fixed work
(stack the new KV of every layer, one flush) whatever its size: ~85-93 us per step on the H200 host
(bench/NOTES.md, "Results, 2026-12-01 evening") against a step whose own cache updates take ~20 us a layer.
The new tokens stay in the cache anyway, so the hook lets ``steps_per_chunk`` steps pass with no work but a
counter and then streams their tokens, still in the cache's layers, as one ``[L, 2, B, H, n, D]`` chunk (a
:class:`~kvstream.streaming.session.Step` segment of ``n`` tokens, which replays like any other). The host
pays that fixed work once per ``steps_per_chunk`` steps, at a step boundary (the "do it in bulk at
step boundaries" of DéjàVu's token path, amortized).

What is streamed is always what the cache holds: anything that reads or rewrites history as a whole
(``wait``, ``manifest``, ``crop``, beam-search reorders, a long forward) first streams the pending steps.
A producer killed between two chunks loses at most ``steps_per_chunk - 1`` steps of the stored session;
``StreamingCache.load(recover=True)`` returns the positions that did land and ``generate`` recomputes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Decode steps per chunk by default: the host's fixed cost per chunk (~90 us) amortized to ~6 us a step,
#: and at most 15 steps for a ``recover=True`` load to recompute.
STEPS_PER_CHUNK = 16


@dataclass
class StepTail:
    """Decode steps applied to the cache but not yet streamed: positions ``[start, start + tokens)`` of
    every KV layer, ``steps`` forwards of ``n`` tokens each.

    ``first``/``last`` are the first and last KV layer ids; ``layers`` the number of KV layers (a step is
    regular when each was updated once); ``seen`` counts the layers of the forward in progress; ``cap`` the
    most tokens the chunk may hold (a sliding-window layer keeps only its window's).
    """

    start: int
    batch: int
    first: int
    last: int
    layers: int
    n: int
    cap: int
    per_chunk: int
    tokens: int = 0
    steps: int = 0
    seen: int = 0

    def step_ended(self) -> bool:
        """The forward in progress reached the last KV layer: count it. Returns whether the pending steps are
        due to be streamed (``per_chunk`` of them, or the next would pass ``cap``). Raises nothing; an
        irregular forward (``seen != layers``) is for the caller to check before."""
        self.seen = 0
        self.tokens += self.n
        self.steps += 1
        return self.steps >= self.per_chunk or self.tokens + self.n > self.cap

    def taken(self) -> None:
        """The pending steps were streamed: the next chunk starts where they ended."""
        self.start += self.tokens
        self.tokens = 0
        self.steps = 0


def window_cap(layers, ids) -> int:
    """Most tokens a pending chunk may hold: a sliding-window layer keeps only its last ``sliding_window - 1``
    tokens (transformers' ``DynamicSlidingWindowLayer``), so a chunk must not be older than that."""
    caps = [int(layers[i].sliding_window) - 1 for i in ids if getattr(layers[i], "sliding_window", None)]
    return min(caps) if caps else 1 << 62


__all__ = ["STEPS_PER_CHUNK", "StepTail", "window_cap"]
