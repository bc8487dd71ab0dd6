"""The keyword a cache object goes under in ``generate`` and ``forward``, for the installed transformers.

transformers 5.2x renamed ``past_key_values=`` to ``cache=`` (the old name is deprecated, to be removed in
6.0); 5.17 and earlier know only ``past_key_values=``. Everything in kvstream that hands a cache to a model
asks :func:`cache_kwargs`, so one place decides.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=None)
def cache_keyword() -> str:
    """``"cache"`` where the installed transformers takes it, else ``"past_key_values"``.

    Decided by the names ``generate`` looks a cache up under (``transformers.generation.utils.ALL_CACHE_NAMES``,
    which lists ``"cache"`` first from 5.2x on and ``"past_key_values"`` before).
    """
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{cache_keyword(): cache}``: spread it into ``model.generate(...)`` or ``model(...)``.

    Examples
    --------
    >>> out = model.generate(input_ids, **kvstream.cache_kwargs(cache), max_new_tokens=64)  # doctest: +SKIP
    """
    return {cache_keyword(): cache}


__all__ = ["cache_keyword", "cache_kwargs"]
