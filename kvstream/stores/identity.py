"""Which model a prefix store's KV belongs to: the namespace its keys are made under, and the checks that
keep another model's KV out.

KV is only valid for the model that computed it. A store's *namespace* is mixed into every key (the
chunk hashes of :class:`~kvstream.stores.chunk_file.ChunkFileStore`, the tree of
:class:`~kvstream.stores.radix.RadixStore`):

* ``namespace="..."`` given explicitly: used as is (the caller vouches that one model uses it);
* ``config=`` given: the :func:`~kvstream.layout.kv_fingerprint` of the config (and ``dtype``), and the
  store knows the geometry (layers, KV heads, ``head_dim``, dtype where declared) its KV must have;
* neither: the store takes the fingerprint of the first model it is used with
  (:meth:`ModelScope.bind_model`, which :meth:`StreamingCache.from_prefix
  <kvstream.integrations.hf.cache.StreamingCache.from_prefix>`, ``load_prefix_into`` and ``update`` of a
  cache that carries a config call); until then it is unbound (namespace ``""``, as a model-free store).
  KV stored while unbound is not another model's as far as the store can tell: the radix store keeps
  it for the model it binds to; the file store's keys change with the namespace, so it is not found.

A store bound to one model refuses another with :class:`~kvstream.errors.LayoutError` (one store object
per model; several models may share one directory, each through its own store object).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..errors import ConfigError, LayoutError
from ..layout import KVLayout, config_dtype, dtype_name, kv_fingerprint, kv_identity


def config_geometry(config: Any) -> tuple[int, int, int] | None:
    """``(layers, kv_heads, head_dim)`` a config gives its KV (:meth:`KVLayout.from_config`), or ``None``
    when it lacks the attributes."""
    layout = config_layout(config)
    return None if layout is None else (layout.num_layers, layout.kv_heads, layout.head_dim)


def config_layout(config: Any) -> KVLayout | None:
    """:meth:`KVLayout.from_config` of ``config`` (float32 unless it declares a dtype), or ``None`` when it
    lacks the attributes."""
    try:
        return KVLayout.from_config(config, torch.float32)
    except (LayoutError, TypeError, ValueError, AttributeError):
        return None


def check_config_kv(config: Any, *, kv_heads: int, head_dim: int, dtype: torch.dtype, layers: int | None = None,
                    where: str = "stored KV", head_dim_v: int | None = None) -> None:
    """Check KV about to be loaded into a model against its config: KV heads, the keys' ``head_dim`` and the
    values' ``head_dim_v`` (default: ``head_dim``), the layer count (``layers``, when given) and the dtype
    (when the config declares one).

    Raises
    ------
    LayoutError
        On a mismatch, naming both sides (at load time, not as a shape error inside attention later).
    """
    want = config_layout(config)
    if want is not None:
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        if (kv_heads, head_dim, head_dim_v) != (want.kv_heads, want.head_dim, want.head_dim_v) or \
                (layers is not None and layers != want.num_layers):
            have = f"{layers} layers x " if layers is not None else ""
            raise LayoutError(f"{where} is {have}{kv_heads} KV heads x head_dim {_dims(head_dim, head_dim_v)}; the "
                              f"config ({type(config).__name__}) has {want.num_layers} layers x {want.kv_heads} KV "
                              f"heads x head_dim {_dims(want.head_dim, want.head_dim_v)}")
    declared = config_dtype(config)
    if declared is not None and declared != dtype:
        raise LayoutError(f"{where} is {dtype}, the config declares {declared}")


def _dims(head_dim: int, head_dim_v: int) -> str:
    return str(head_dim) if head_dim == head_dim_v else f"{head_dim} (keys) / {head_dim_v} (values)"


class ModelScope:
    """Mixin of the prefix stores: the namespace of their keys and the model it stands for.

    Attributes
    ----------
    namespace : str
        Mixed into every key.
    fingerprint : str or None
        The model's :func:`~kvstream.layout.kv_fingerprint` when the store is bound to one.
    """

    namespace: str = ""
    fingerprint: str | None = None

    def _init_model(self, namespace: str | None, config: Any, dtype: torch.dtype | None) -> None:
        """Set the namespace from the constructor's arguments (see the module docstring)."""
        if namespace is not None and not isinstance(namespace, str):
            raise ConfigError(f"namespace must be a str or None, got {type(namespace).__name__}")
        if dtype is not None:
            dtype_name(dtype)
        self._model_lock = threading.Lock()
        self._checked: Any = None  # the config object last checked against the binding
        self._explicit = namespace is not None
        self._identity: dict | None = None
        self._kv_dtype: torch.dtype | None = None
        self._geometry: tuple[int, int, int] | None = None
        self.namespace = namespace if namespace is not None else ""
        self.fingerprint = None
        if config is not None:
            self._bind(config, dtype)

    def _bind(self, config: Any, dtype: torch.dtype | None) -> None:
        self._identity = kv_identity(config)
        self._kv_dtype = dtype if dtype is not None else config_dtype(config)
        self._geometry = config_geometry(config)
        self.fingerprint = kv_fingerprint(config, self._kv_dtype)
        if not self._explicit:
            self.namespace = self.fingerprint

    def _on_bind(self, namespace: str) -> None:
        """Hook: the store is about to take ``namespace`` (the radix store checks what it already holds)."""

    def bind_model(self, config: Any, dtype: torch.dtype | None = None) -> None:
        """Tie the store to the model of ``config`` (KV ``dtype`` if known), or check that it already is.

        Does nothing for ``config=None`` or a store with an explicit namespace. The config object that passed
        the check last is not read again when it comes back (a config edited in place after that is not
        seen: build a new config object for another model).

        Raises
        ------
        LayoutError
            If the store is bound to another model, or to another KV dtype.
        """
        if config is None or self._explicit:
            return
        if dtype is None and config is self._checked:  # this config object was checked against the binding
            return
        with self._model_lock:
            if self._identity is None:
                self._on_bind(kv_fingerprint(config, dtype if dtype is not None else config_dtype(config)))
                self._bind(config, dtype)
                return
            if kv_identity(config) != self._identity:
                raise LayoutError(f"{type(self).__name__} holds KV of another model (fingerprint {self.fingerprint}, "
                                  f"{self._identity.get('_name_or_path') or self._identity.get('model_type')!r}): use "
                                  "one store object per model, or give each an explicit namespace")
            dtype = dtype if dtype is not None else config_dtype(config)
            if dtype is not None and self._kv_dtype is not None and dtype != self._kv_dtype:
                raise LayoutError(f"{type(self).__name__} holds {self._kv_dtype} KV of this model, not {dtype}")
            # a planned lookup that recomputes pays this check on its critical path (~0.1 ms of config
            # attribute reads): the same config object, passed again, is not read again
            self._checked = config

    def check_layout(self, layout: KVLayout) -> None:
        """Check KV about to be stored against the model the store is bound to (geometry, dtype if known).

        Raises
        ------
        LayoutError
            On a mismatch.
        """
        if self._geometry is not None:
            got = (layout.num_layers, layout.kv_heads, layout.head_dim)
            if got != self._geometry:
                raise LayoutError(f"{type(self).__name__}: KV of {got[0]} layers x {got[1]} KV heads x head_dim "
                                  f"{got[2]}, the model's config says {self._geometry}")
        if self._kv_dtype is not None and layout.dtype != self._kv_dtype:
            raise LayoutError(f"{type(self).__name__}: KV of dtype {layout.dtype}, the store holds {self._kv_dtype}")

    def expects(self, shape: tuple[int, ...], dtype: torch.dtype, chunk_tokens: int | None = None) -> bool:
        """Whether a stored packed chunk ``[layers, 2, 1, kv_heads, tokens, head_dim]`` fits the bound model
        (``True`` when the store knows no geometry)."""
        if len(shape) != 6 or shape[1] != 2 or shape[2] != 1 or (chunk_tokens is not None and shape[4] != chunk_tokens):
            return False
        if self._geometry is not None and (shape[0], shape[3], shape[5]) != self._geometry:
            return False
        return self._kv_dtype is None or dtype == self._kv_dtype

    def update(self, token_ids: Any, cache: Any) -> int:
        """:meth:`PrefixStore.update <kvstream.stores.base.PrefixStore.update>`, binding the store first to
        the model of ``cache.config`` when the cache carries one (a :class:`~kvstream.StreamingCache`)."""
        config = getattr(cache, "config", None)
        if config is not None:
            layers = getattr(cache, "layers", None) or []
            keys = next((l.keys for l in layers if isinstance(getattr(l, "keys", None), torch.Tensor)), None)
            self.bind_model(config, keys.dtype if keys is not None else None)
        return super().update(token_ids, cache)


__all__ = ["ModelScope", "config_geometry", "config_layout", "check_config_kv"]
