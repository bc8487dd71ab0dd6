"""Token ids in, stable keys out: the chained prefix hashes that name stored chunks.

A chunk of ``chunk_tokens`` tokens is named by a hash of the *whole prefix* up to the chunk's end, not of
the chunk alone: the KV of a token depends on every token before it, so two chunks with the same tokens
after different prefixes hold different KV. The hash is chained, so naming every chunk of a ``T``-token
prompt costs one pass over the ids (LMCache, ``hash((prev_hash, tokens, extra_keys))``; Vineyard's file
cache names a file by the hash of its prefix)::

    h[-1] = blake2b(b"kvstream-prefix-v1" | namespace | chunk_tokens)
    h[i]  = blake2b(h[i-1] | int64-little-endian(tokens[i*c : (i+1)*c]))

The digests come from :mod:`hashlib` (BLAKE2b, 16-byte digests) over explicit little-endian bytes, so
they are the same in every process, on every machine and in every Python version. Python's ``hash()``
is never used: it is salted per process (``PYTHONHASHSEED``), the reason LMCache users saw zero hits
across processes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError

#: Bumped when the hashing scheme changes, so that old files are never mistaken for new ones.
HASH_VERSION = b"kvstream-prefix-v1"
#: Bytes of each digest (128 bits: a collision is out of reach for any realistic store).
DIGEST_BYTES = 16


class TokenIds(list):
    """A list of Python int token ids that :func:`as_token_ids` already checked (it passes through again
    without a second pass over every id: a lookup hands the same ids down through tiers and stores)."""


def token_row(t: torch.Tensor, *, what: str = "token_ids") -> torch.Tensor:
    """The ``[T]`` row of a ``[T]`` or ``[1, T]`` integer tensor of token ids (checked as :func:`as_token_ids`
    checks a tensor, without reading it to the host). Raises ``ConfigError``."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"{what} must hold integer ids, got dtype {t.dtype}")
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ConfigError(f"{what} must hold one sequence ([1, T]); got shape {list(t.shape)}. "
                              "Prefix stores work per sequence: call them once per row")
        t = t[0]
    if t.dim() != 1:
        raise ConfigError(f"{what} must be [T] or [1, T]; got shape {list(t.shape)}")
    return t


def as_token_ids(token_ids: Any, *, what: str = "token_ids") -> list[int]:
    """Normalise the token ids of *one* sequence to a list of Python ints.

    Parameters
    ----------
    token_ids : torch.Tensor, numpy.ndarray or sequence of int
        ``[T]`` or ``[1, T]`` integer ids (a ``[1, T]`` tensor is what ``generate`` takes and returns).

    Raises
    ------
    ConfigError
        If the ids hold more than one sequence (a batch of several rows), are not integers, or are not
        one- or two-dimensional.

    Examples
    --------
    >>> as_token_ids(torch.tensor([[5, 6, 7]]))
    [5, 6, 7]
    """
    if type(token_ids) is TokenIds:
        return token_ids
    if isinstance(token_ids, torch.Tensor):
        return TokenIds(token_row(token_ids, what=what).tolist())  # Python ints (an integer dtype)
    if isinstance(token_ids, np.ndarray):
        return as_token_ids(torch.from_numpy(np.ascontiguousarray(token_ids)), what=what)
    try:
        ids = list(token_ids)
    except TypeError:
        raise ConfigError(f"{what} must be a tensor or a sequence of ints, got {type(token_ids).__name__}") from None
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ConfigError(f"{what} must hold one sequence; got {len(ids)} rows")
        ids = list(ids[0])
    if all(type(x) is int for x in ids):  # the common case (a list from a tensor): no per-id checks
        return TokenIds(ids)
    out = []
    for x in ids:
        if isinstance(x, (bool, float)) or not hasattr(x, "__index__"):
            raise ConfigError(f"{what} must hold integer ids, got {x!r}")
        out.append(int(x))
    return TokenIds(out)


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def namespace_digest(namespace: str = "", chunk_tokens: int = 0) -> bytes:
    """The seed of the hash chain: separates models (``namespace``) and chunk sizes in one directory."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(HASH_VERSION)
    h.update(b"\x00" + namespace.encode("utf-8") + b"\x00")
    h.update(int(chunk_tokens).to_bytes(8, "little"))
    return h.digest()


def prefix_hashes(token_ids: Any, chunk_tokens: int, *, namespace: str = "") -> list[str]:
    """Hex keys of every *full* chunk of ``token_ids``; a trailing partial chunk gets no key.

    Parameters
    ----------
    token_ids : tensor or sequence of int
        ``[T]`` or ``[1, T]`` ids (see :func:`as_token_ids`).
    chunk_tokens : int
        Tokens per chunk (> 0).
    namespace : str
        Mixed into the seed: use the model's name so that two models never share keys.

    Returns
    -------
    list of str
        ``T // chunk_tokens`` keys of 32 hex digits; key ``i`` names tokens ``[0, (i+1)*chunk_tokens)``.

    Raises
    ------
    ConfigError
        For ``chunk_tokens <= 0`` or bad ids.

    Examples
    --------
    >>> keys = prefix_hashes(list(range(40)), 16)
    >>> len(keys), len(keys[0])
    (2, 32)
    >>> prefix_hashes(list(range(40)), 16)[0] == prefix_hashes(list(range(16)), 16)[0]
    True
    """
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    ids = as_token_ids(token_ids)
    prev = namespace_digest(namespace, chunk_tokens)
    out = []
    for i in range(len(ids) // chunk_tokens):
        h = hashlib.blake2b(prev, digest_size=DIGEST_BYTES)
        h.update(_ids_bytes(ids[i * chunk_tokens:(i + 1) * chunk_tokens]))
        prev = h.digest()
        out.append(prev.hex())
    return out


def nested_path(key: str, *, levels: int = 2, chars: int = 2) -> str:
    """Relative ``/``-separated path of a key: ``levels`` directories of ``chars`` hex digits, then the key.

    Vineyard's file cache does the same (``FileCacheConfig(hash_chunk_size=2)``: ``12/34/...``) so that
    no directory holds millions of files.

    Examples
    --------
    >>> nested_path("44c3aa0000000000000000000000beef")
    '44/c3/44c3aa0000000000000000000000beef'
    """
    if levels < 0 or chars <= 0 or levels * chars > len(key):
        raise ConfigError(f"Cannot nest key of {len(key)} characters into {levels} levels of {chars}")
    parts = [key[i * chars:(i + 1) * chars] for i in range(levels)]
    return "/".join([*parts, key])


__all__ = ["HASH_VERSION", "DIGEST_BYTES", "TokenIds", "as_token_ids", "token_row", "namespace_digest", "prefix_hashes", "nested_path"]
