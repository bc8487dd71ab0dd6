"""Backend choice, launcher helpers and the code the compiler makes of the kernels."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvstream
from kvstream import kernels
from kvstream.errors import ConfigError, LayoutError
from kvstream.kernels import _checks, _launch, _tables, reference
from kvstream.layout import Region

from kvcases import hf_layers


def test_auto_runs_the_torch_twin_for_cpu_tensors(seed, monkeypatch):
    keys, values, _ = hf_layers(seed, seq=[3], batch=1, heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(reference, "pack_tokens", lambda *args: "twin")
    monkeypatch.setattr(reference, "pack_newest", lambda *args, **kw: "twin")
    assert kernels.pack_tokens(keys, values, Region(layers=(0, 1), tokens=(0, 3))) == "twin"
    assert kernels.pack_newest(keys, values) == "twin"


def test_backend_torch_equals_backend_auto_on_cpu(seed):
    keys, values, _ = hf_layers(seed, seq=[5, 5], batch=2, heads=2, head_dim=4, dtype=torch.bfloat16, device="cpu",
                                kind="static")
    region = Region(layers=(0, 2), tokens=(1, 4))
    assert torch.equal(kernels.pack_tokens(keys, values, region, backend="torch"),
                       kernels.pack_tokens(keys, values, region))


def test_unknown_backend_and_missing_layers_raise(seed):
    keys, values, _ = hf_layers(seed, seq=[3], batch=1, heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match=r"Unknown backend 'cuda'"):
        kernels.pack_tokens(keys, values, Region(layers=(0, 1), tokens=(0, 1)), backend="cuda")
    with pytest.raises(LayoutError, match="no per-layer tensors"):
        kernels.pack_newest([], [])
    with pytest.raises(LayoutError, match="No layers selected"):
        kernels.pack_newest(keys, values, layers=[], backend="torch")


def test_check_backend():
    class InterpretedFunction:  # what triton.jit returns under TRITON_INTERPRET=1
        pass

    _checks.check_backend(torch.device("cpu"), InterpretedFunction())
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        _checks.check_backend(torch.device("cpu"), object())
    with pytest.raises(ConfigError, match="unset TRITON_INTERPRET"):
        _checks.check_backend(torch.device("cuda", 0), InterpretedFunction())
    _checks.check_backend(torch.device("cuda", 0), object())


@pytest.mark.parametrize("elsize, byte_values, expected", [
    (2, [16, 32, 2048, 0], 8),   # bf16 rows of 128 in a contiguous cache: 16-byte vectors
    (2, [16, 24], 4),            # an address 24 bytes in: 8-byte vectors
    (4, [16, 32, 384], 4),       # fp32: 4 elements make 16 bytes
    (2, [14, 112], 1),           # head_dim 7: no vectors
    (2, [2, 1 << 40], 1),
    (1, [16, 32], 16),           # fp8
    (8, [16, 32], 2),
    (4, [6], 1),                 # misaligned for the dtype: still 1, never 0
])
def test_vector_elems(elsize, byte_values, expected):
    assert _launch.vector_elems(elsize, byte_values) == expected


def test_block_rows_on_cpu_takes_the_largest_tile():
    assert _launch.block_rows(10_000, 64, 256, torch.device("cpu"), 16384, 4) == 64
    assert _launch.block_rows(3, 64, 256, torch.device("cpu"), 16384, 4) == 4
    assert _launch.block_rows(1, 2, 4, torch.device("cpu"), 16384, 4) == 1


def test_cpu_tables_are_built_not_cached():
    t = _tables.table([1, 2, 3, 4, 5, 6], 3, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.tolist() == [[1, 2, 3], [4, 5, 6]]


# Compiled for an H100 (sm_90) on this machine with the ptxas that ships in the triton wheel: no GPU needed.
_PTX_SCRIPT = textwrap.dedent("""
    import collections, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvstream.kernels import paged, tokens

    def compile_(fn, signature, constexprs):
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}  # the three pointers: 16-byte aligned
        src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                        attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        return dict(collections.Counter(re.findall(r"(?:ld|st)\\.global[\\w.:]*", ptx)))

    out = {}
    for align in (8, 1):
        for across in (False, True):
            for unpack in (False, True):
                out[f"tokens-{align}-{across}-{unpack}"] = compile_(
                    tokens._copy_tokens_kernel,
                    {"table_ptr": "*i64", "chunk_ptr": "*i16", "starts_ptr": "*i64", "rows": "i64", "heads": "i32",
                     "tokens": "i32", "tiles": "i32", "t0": "i64"},
                    {"COLS": 6, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_R": 64, "ALIGN": align,
                     "DEVICE_STARTS": False, "UNPACK": unpack, "ACROSS_ROWS": across, "HEAD_DIM_V": 128,
                     "BLOCK_DV": 128})
        out[f"paged-{align}"] = compile_(
            paged._copy_blocks_kernel,
            {"table_ptr": "*i64", "chunk_ptr": "*i16", "ids_ptr": "*i32", "num_ids": "i32", "tiles": "i32"},
            {"COLS": 5, "BLOCK_SIZE": 16, "HEADS": 8, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_R": 64, "ALIGN": align,
             "UNPACK": False, "HEAD_DIM_V": 128, "BLOCK_DV": 128})
    for unpack in (False, True):  # DeepSeek-V3's latent (512) and rotary key (64): K and V of different head dims
        out[f"split-{unpack}"] = compile_(
            tokens._copy_tokens_kernel,
            {"table_ptr": "*i64", "chunk_ptr": "*i16", "starts_ptr": "*i64", "rows": "i64", "heads": "i32",
             "tokens": "i32", "tiles": "i32", "t0": "i64"},
            {"COLS": 6, "HEAD_DIM": 512, "BLOCK_D": 512, "BLOCK_R": 16, "ALIGN": 8, "DEVICE_STARTS": False,
             "UNPACK": unpack, "ACROSS_ROWS": True, "HEAD_DIM_V": 64, "BLOCK_DV": 64})
    print(json.dumps(out))
""")


def test_kernels_compile_to_16_byte_loads_and_stores():
    """With aligned tables the cache side must use 16-byte vectors (``ld/st.global.v4.b32``); without the
    alignment hints it falls back to 2-byte accesses. Guards the hints against being lost in a refactor."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(kvstream.__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    for across in ("False", "True"):
        for unpack in ("False", "True"):
            ops = got[f"tokens-8-{across}-{unpack}"]
            assert ops.get("ld.global.v4.b32", 0) == 8 and ops.get("st.global.v4.b32", 0) == 8, ops
            assert ops.keys() - {"ld.global.v4.b32", "st.global.v4.b32", "ld.global.b64"} == set(), ops
            unaligned = got[f"tokens-1-{across}-{unpack}"]
            assert unaligned.get("ld.global.b16" if unpack == "False" else "st.global.b16", 0) == 64, unaligned
    assert got["paged-8"].get("ld.global.v4.b32", 0) == 8 and got["paged-8"].get("st.global.v4.b32", 0) == 8
    assert got["paged-1"].get("ld.global.b16", 0) == 64
    for unpack in ("False", "True"):  # both parts of a split row move in 16-byte vectors too
        ops = got[f"split-{unpack}"]
        assert ops.keys() - {"ld.global.v4.b32", "st.global.v4.b32", "ld.global.b64"} == set(), ops


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("head_dim_v", [None, 16], ids=["one-head-dim", "values-16"])
@pytest.mark.parametrize("kind", ["contiguous", "static", "sliced"])
@pytest.mark.parametrize("layers", [(1, 2), (0, 3)], ids=["one-layer", "three-layers"])
def test_pack_resolved_is_pack_tokens_without_the_second_check(seed, where, head_dim_v, kind, layers, monkeypatch):
    keys, values, _ = hf_layers(seed, seq=[9, 7, 9], batch=3, heads=2, head_dim=8, dtype=torch.bfloat16,
                                device=where, kind=kind, head_dim_v=head_dim_v)
    region = kvstream.layout.check_hf_layers(keys, values, Region(layers=layers, tokens=(2, 7), heads=(1, 2)))
    expected = reference.pack_tokens([k.cpu() for k in keys], [v.cpu() for v in values], region)
    calls = []
    real = kvstream.kernels.check_hf_layers
    monkeypatch.setattr(kvstream.kernels, "check_hf_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(reference, "check_hf_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = kernels.pack_resolved(keys, values, region)
    assert got.device == keys[0].device and torch.equal(got.cpu(), expected)
    assert calls == []  # checked once, by the caller
