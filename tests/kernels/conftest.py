"""The ``device`` fixture of the kernel tests.

Every kernel test runs twice: on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py when there is no GPU) and on CUDA (``gpu`` mark, compiled kernels). Shapes stay small:
the interpreter runs each program in Python.
"""

from __future__ import annotations

import pytest
import torch

from kvcases import interpreting


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where the kernels run: the CPU (interpreter) or the GPU (compiled)."""
    if request.param == "cpu" and not interpreting():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (it is off on GPU machines)")
    return torch.device(request.param, 0) if request.param == "cuda" else torch.device("cpu")
