"""kernels._launch.launch: the compiled-kernel cache's logic, with a fake ``@triton.jit`` function (the real
launches, through Triton and direct, are compared bit-exactly in test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kvstream.kernels import _launch

CUDA = torch.device("cuda", 0)


class FakeCompiled:
    """A compiled kernel: ``[grid](*args, stream=...)`` records the call (or raises, as another calling
    convention's launcher does)."""

    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            if self.refuse:
                raise TypeError("function takes exactly 12 arguments (14 given)")
            self.log.append(("direct", grid, args, stream))
        return runner


class FakeJit:
    """A ``@triton.jit`` function of parameters ``a, n, X, Y``: ``[grid](...)`` records the call and returns
    its compiled kernel, as ``JITFunction.run`` does."""

    arg_names = ["a", "n", "X", "Y"]

    def __init__(self, refuse=False):
        self.log, self.refuse = [], refuse

    def __getitem__(self, grid):
        def run(*args, num_warps, **consts):
            self.log.append(("jit", grid, args, consts, num_warps))
            return FakeCompiled(self.log, self.refuse)
        return run


@pytest.fixture
def fake_stream(monkeypatch):
    monkeypatch.setattr(_launch, "current_stream_handle", lambda device: 1234)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_no_direct", set())


def test_the_second_launch_of_a_specialization_goes_to_the_compiled_kernel(fake_stream):
    k, t = FakeJit(), torch.empty(8, dtype=torch.int64)
    _launch.launch(k, (4, 2), (t, 5), {"Y": 2, "X": 1}, 4, CUDA)
    _launch.launch(k, (4, 2), (t, 7), {"Y": 2, "X": 1}, 4, CUDA)
    assert [c[0] for c in k.log] == ["jit", "direct"]
    assert k.log[0][2:] == ((t, 5), {"Y": 2, "X": 1}, 4)
    # the constexprs follow the runtime arguments in the kernel's parameter order; the grid is 3-D
    assert k.log[1] == ("direct", (4, 2, 1), (t, 7, 1, 2), 1234)


@pytest.mark.parametrize("first, second", [
    ((5,), (1,)),  # Triton folds an int of 1
    ((5,), (32,)),  # and marks a multiple of 16
    ((5,), (2**40,)),  # a 64-bit int is another signature
    ((5, "X"), (5, "X2")),  # another constexpr
])
def test_what_triton_specializes_on_is_launched_through_triton_again(fake_stream, first, second):
    k, t = FakeJit(), torch.empty(8, dtype=torch.int64)

    def go(n, x="X"):
        _launch.launch(k, (1,), (t, n), {"X": x, "Y": 0}, 4, CUDA)

    go(*first)
    go(*second)
    assert [c[0] for c in k.log] == ["jit", "jit"]


def test_a_tensor_of_another_dtype_or_alignment_is_launched_through_triton_again(fake_stream):
    k = FakeJit()
    base = torch.empty(64, dtype=torch.int16)
    for t in (base[:8], base[:8].view(torch.bfloat16), base[1:9]):  # the same, another dtype, 2-byte aligned
        _launch.launch(k, (1,), (t, 5), {"X": 0, "Y": 0}, 4, CUDA)
    assert [c[0] for c in k.log] == ["jit", "jit", "jit"]
    _launch.launch(k, (1,), (base[:8], 5), {"X": 0, "Y": 0}, 8, CUDA)  # another num_warps
    assert k.log[-1][0] == "jit"


def test_a_launcher_that_refuses_the_arguments_leaves_the_kernel_to_triton(fake_stream):
    k, t = FakeJit(refuse=True), torch.empty(8, dtype=torch.int64)
    for _ in range(3):
        _launch.launch(k, (1,), (t, 5), {"X": 0, "Y": 0}, 4, CUDA)
    assert [c[0] for c in k.log] == ["jit", "jit", "jit"]  # the refused one ran through Triton, none was lost
    assert k in _launch._no_direct


def test_missing_constexprs_are_not_cached(fake_stream):
    k, t = FakeJit(), torch.empty(8, dtype=torch.int64)
    for _ in range(2):
        _launch.launch(k, (1,), (t, 5), {"X": 0}, 4, CUDA)  # Y left to its default: the order is not known
    assert [c[0] for c in k.log] == ["jit", "jit"]


def test_the_cpu_always_goes_through_triton(fake_stream):
    k, t = FakeJit(), torch.empty(8, dtype=torch.int64)
    for _ in range(2):
        _launch.launch(k, (1,), (t, 5), {"X": 0, "Y": 0}, 4, torch.device("cpu"))
    assert [c[0] for c in k.log] == ["jit", "jit"]
    assert not _launch._compiled
