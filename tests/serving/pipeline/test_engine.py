"""The engine in one process (one stage): microbatches joining and leaving, the KV budget, swap ordering."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvstream.errors import ConfigError
from kvstream.serving.pipeline import swap as swap_mod
from kvstream.serving.pipeline.links import Env
from kvstream.serving.pipeline.run import RunConfig, run_stage, validate


def _run(**kw) -> dict:
    cfg = RunConfig(stages=1, **kw)
    validate(cfg)
    return run_stage(cfg, Env(0, 1, 0))


def _steps(doc: dict) -> list[dict]:
    return doc["stages"][0]["steps"]


def test_requests_leave_their_microbatch_and_waiting_groups_join_freed_slots():
    # 10 requests in groups of 2 through 2 slots: rows finish at different lengths and leave (the next
    # step keeps fewer rows); five groups pass through two slots, each joining where one emptied
    doc = _run(batch=2, microbatches=2, requests=10, prompt_tokens=12, output_tokens="uniform:2:9", load_seed=1)
    assert doc["identical"] == doc["requests"] == doc["completed"] == 10
    steps = _steps(doc)
    prefills = [s for s in steps if s["kind"] == "prefill"]
    assert len(prefills) == 5 and {s["slot"] for s in prefills} == {0, 1}
    assert any(s["kind"] == "decode" and s["rows"] == 1 for s in steps)  # a row left, its partner went on
    assert doc["summary"]["output_tokens"] == sum(s["rows"] for s in steps)  # one token per row and step


def test_padded_prompts_of_different_lengths_are_identical(tmp_path):
    lens = tmp_path / "lens.txt"
    lens.write_text("5\n17\n9\n")
    doc = _run(batch=3, microbatches=2, requests=6, prompt_tokens=None, prompt_lengths=str(lens), arch="opt")
    assert doc["identical"] == 6


@pytest.mark.parametrize("budget_mb", [0.06, 0.11])  # holds one microbatch (43 KiB + a layer), two
def test_swapping_keeps_the_counted_kv_within_the_budget(budget_mb):
    doc = _run(microbatches=4, requests=8, prompt_tokens=32, output_tokens="fixed:10", swap="on",
               kv_budget_mb=budget_mb)
    st = doc["stages"][0]
    budget = int(budget_mb * (1 << 20))
    assert doc["identical"] == 8
    assert 0 < st["peak_kv_bytes"] <= budget and st["budget_bytes"] == budget
    assert st["swap_in_bytes"] > 0 and st["swap_out_bytes"] > 0
    assert all(s["resident_bytes"] <= budget for s in _steps(doc))
    # after a prompt went out once, only the newest token crosses to the host per decode step and row
    token_bytes = 4 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x float32
    outs = [s["swap_out_bytes"] for s in _steps(doc) if s["kind"] == "decode" and s["swap_out_bytes"]]
    assert outs and min(outs) == token_bytes


def test_without_swapping_the_budget_limits_the_microbatches_in_flight():
    budget_mb = 0.06  # holds one microbatch of 32 + 10 tokens (43 KiB, and a layer during its update), not two
    doc = _run(microbatches=4, requests=4, prompt_tokens=32, output_tokens="fixed:10", kv_budget_mb=budget_mb)
    st = doc["stages"][0]
    assert doc["identical"] == 4 and st["swap_in_bytes"] == 0
    assert st["peak_kv_bytes"] <= budget_mb * (1 << 20)
    slots_seen = {s["slot"] for s in _steps(doc)}
    assert slots_seen == {0}  # one microbatch at a time


def test_swap_auto_swaps_only_when_the_ratio_says_it_hides():
    common = dict(microbatches=4, requests=4, prompt_tokens=32, output_tokens="fixed:10", swap="auto",
                  kv_budget_mb=0.06)
    slow = _run(pcie_gbps=1e-9, **common)  # K / (B_pcie * t_step) is huge: no microbatch beyond what fits
    fast = _run(pcie_gbps=1e9, **common)   # the ratio is ~0: every microbatch joins and swaps
    assert slow["identical"] == fast["identical"] == 4
    assert slow["stages"][0]["swap_in_bytes"] == 0 and {s["slot"] for s in _steps(slow)} == {0}
    assert fast["stages"][0]["swap_in_bytes"] > 0 and len({s["slot"] for s in _steps(fast)}) > 1


def test_a_microbatch_that_alone_exceeds_the_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot hold one microbatch"):
        validate(RunConfig(stages=1, kv_budget_mb=0.001, swap="on"))
    with pytest.raises(ConfigError, match="--swap needs --kv-budget-mb"):
        validate(RunConfig(stages=1, swap="on"))


class _Delayed:
    """A swap-in copy that lands later, from another thread (as a side stream's copy would)."""

    def __init__(self, log, slot, layer, fill):
        self.log, self.slot, self.layer = log, slot, layer
        self.thread = threading.Thread(target=self._land, args=(fill,))
        self.thread.start()

    def _land(self, fill):
        time.sleep(0.02)  # longer than a step here, so a prefetch issued a step ahead still lands late
        fill()
        self.log.append(("landed", self.slot, self.layer, time.perf_counter()))

    def wait(self):
        self.thread.join()


def _delayed_copies(monkeypatch, log, wait=True):
    original_before = swap_mod.SlotKV.before_update
    original_swap_in = swap_mod.SlotKV.swap_in

    def copy_in(mirror, device, stream):
        k, v = mirror.to_device(device, 0, None)
        real = (k.clone(), v.clone())
        k.fill_(float("nan"))  # what an unlanded copy leaves: garbage
        v.fill_(float("nan"))

        def fill():
            with torch.inference_mode():  # the engine's tensors are inference tensors
                k.copy_(real[0])
                v.copy_(real[1])

        layer = len(copy_in.current)
        done = _Delayed(log, copy_in.slot, layer, fill)
        copy_in.current.append(layer)
        return k, v, done

    def swap_in(self):
        copy_in.slot, copy_in.current = self.slot, []
        log.append(("issued", self.slot, None, time.perf_counter()))
        original_swap_in(self)

    def before_update(self, layer_idx, k, v):
        if wait:
            original_before(self, layer_idx, k, v)
        else:
            self.pending.pop(layer_idx, None)
        log.append(("compute", self.slot, layer_idx, time.perf_counter()))

    monkeypatch.setattr(swap_mod, "copy_in", copy_in)
    monkeypatch.setattr(swap_mod.SlotKV, "swap_in", swap_in)
    monkeypatch.setattr(swap_mod.SlotKV, "before_update", before_update)


def _compute_before_landing(log) -> list:
    """Computes of a (slot, layer) whose latest swap-in had not landed yet."""
    landed, latest, bad = {}, {}, []
    for kind, slot, layer, t in log:
        if kind == "issued":
            latest[slot] = t
        elif kind == "landed":
            landed[(slot, layer)] = t
        elif kind == "compute" and slot in latest:
            if landed.get((slot, layer), -1.0) < latest[slot]:
                bad.append((slot, layer))
    return bad


def test_no_layer_computes_before_its_swap_in_landed(monkeypatch):
    log: list = []
    _delayed_copies(monkeypatch, log)
    doc = _run(microbatches=4, requests=4, prompt_tokens=32, output_tokens="fixed:6", swap="on", kv_budget_mb=0.11)
    assert sum(1 for e in log if e[0] == "landed") > 8
    assert _compute_before_landing(log) == []
    assert doc["identical"] == 4
    assert doc["stages"][0]["stall_s"] > 0  # compute waited on the delayed copies, and the log says so


def test_the_ordering_check_catches_compute_that_does_not_wait(monkeypatch):
    log: list = []
    _delayed_copies(monkeypatch, log, wait=False)
    doc = _run(microbatches=4, requests=4, prompt_tokens=32, output_tokens="fixed:6", swap="on", kv_budget_mb=0.11)
    time.sleep(0.05)  # let the stray copies land
    assert _compute_before_landing(log)
    assert doc["identical"] < 4  # and the tokens show it


@pytest.mark.gpu
def test_gpu_peak_memory_with_swapping_stays_within_one_microbatch_plus_the_budget():
    """On one GPU: the allocator's peak with 4 swapped microbatches exceeds the peak of one resident
    microbatch by at most the budget, and stays below the peak with all 4 resident."""
    import gc

    def peak(**kw):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        doc = run_stage(RunConfig(device="cuda", stages=1, model="llama3-8b", layers=2, dtype="bfloat16", batch=4,
                                  prompt_tokens=2048, output_tokens="fixed:16", check=False, **kw), Env(0, 1, 0))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), doc

    one, _ = peak(microbatches=1, requests=4)
    all4, _ = peak(microbatches=4, requests=16)
    budget_mb = 160  # one microbatch: 4 x 2064 tokens x 2 layers x 4 KiB = 64.5 MiB; the budget holds two
    swapped, doc = peak(microbatches=4, requests=16, swap="on", kv_budget_mb=budget_mb)
    st = doc["stages"][0]
    assert doc["completed"] == 16 and st["swap_in_bytes"] > 0
    assert st["peak_kv_bytes"] <= budget_mb << 20
    assert swapped - one <= budget_mb << 20
    assert swapped < all4


@pytest.mark.gpu
def test_gpu_swapping_one_stage_float32_identical_with_events_and_side_streams():
    """The CUDA path (side streams, one event per layer, timing events): identical tokens in float32."""
    doc = run_stage(RunConfig(device="cuda", stages=1, microbatches=4, requests=8, prompt_tokens=32,
                              output_tokens="fixed:10", swap="on", kv_budget_mb=0.11), Env(0, 1, 0))
    st = doc["stages"][0]
    assert doc["identical"] == 8
    assert st["swap_in_bytes"] > 0 and 0 < st["peak_kv_bytes"] <= 0.11 * (1 << 20)
    assert all(s["compute_s"] > 0 for s in st["steps"])  # the timing events resolved


def test_swapping_an_mla_model_whose_values_have_another_head_dim():
    """DeepSeek-V3 (MLA): K and V of different head dims swap out and back in; outputs equal generate's."""
    doc = _run(arch="deepseek_v3", microbatches=4, requests=4, prompt_tokens=16, output_tokens="fixed:6",
               swap="on", kv_budget_mb=0.02)  # holds about two of its microbatches
    st = doc["stages"][0]
    assert doc["identical"] == 4 and st["swap_in_bytes"] > 0 and st["swap_out_bytes"] > 0
