"""Shared test setup.

* Without a CUDA GPU, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), which must be
  set before ``triton`` is imported anywhere: this file is imported first.
* ``gpu`` tests are skipped without a GPU, ``gpu2`` tests without two.
* ``seed`` seeds torch in a fixture, never at import.
* Every test caches kvstream's measurements (``KVSTREAM_CACHE_DIR``) in its own temporary directory.
"""

from __future__ import annotations

import os


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch missing is a setup error pytest will show anyway
        return 0


_GPUS = _cuda_count()
if _GPUS == 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_gpu2 = pytest.mark.skip(reason="needs two CUDA GPUs")
    for item in items:
        if "gpu2" in item.keywords and _GPUS < 2:
            item.add_marker(skip_gpu2)
        elif "gpu" in item.keywords and _GPUS < 1:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _measurement_cache(tmp_path_factory, monkeypatch):
    """Measured prefill times and copy rates go to a fresh directory, never ~/.cache/kvstream."""
    monkeypatch.setenv("KVSTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("kvstream-cache")))


@pytest.fixture
def seed():
    """Seed torch's generators; returns a ``torch.Generator`` seeded the same way."""
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(1234)
    return g


@pytest.fixture
def cuda_device():
    """The CUDA device for ``gpu`` tests."""
    return torch.device("cuda", 0)
