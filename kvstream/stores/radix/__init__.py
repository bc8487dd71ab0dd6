"""The radix-tree prefix store: :class:`RadixStore` (:mod:`.store`) over a pure radix tree of token ids
(:mod:`.tree`), optionally shared between the processes of one host through shared memory (:mod:`.shared`)."""

from __future__ import annotations

from .store import RadixStore

__all__ = ["RadixStore"]
