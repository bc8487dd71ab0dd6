"""DéjàVu's planner: hand-computed splits, bounds, and the CLI."""

from __future__ import annotations

import json

import pytest

from kvstream.errors import ConfigError
from kvstream.serving.planner import GiB, MemoryModel, PlanInputs, main, model_bytes, plan, token_machines


@pytest.mark.parametrize("d,y,t,n,m,want_dt", [
    (8, 1.0, 0.05, 100, 1.0, 7),   # 8*5/(1+5) = 6.67 -> 7
    (4, 2.0, 0.01, 200, 1.5, 2),   # 4*2/(3+2) = 1.6 -> 2
    (4, 1.0, 0.01, 100, 1.0, 2),   # 4*1/(1+1) = 2 exactly
    (2, 3.0, 0.1, 30, 1.0, 1),     # 0.1*30 = 3.0000000000000004: 2*3/(3+3) is 1, not 2
    (10, 4.0, 0.02, 50, 1.25, 2),  # 10*1/(5+1) = 1.67 -> 2
    (6, 0.5, 0.1, 50, 2.0, 5),     # 6*5/(1+5) = 5 exactly
])
def test_formula_hand_computed(d, y, t, n, m, want_dt):
    assert token_machines(d, n, t, m, y) == want_dt


def test_plan_uses_the_formula_when_no_bound_applies():
    p = plan(PlanInputs(prompt_time_s=2.0, token_time_s=0.01, tokens=200, machines=4, overhead=1.5))
    assert (p.prompt_machines, p.token_machines, p.formula_token_machines, p.bound) == (2, 2, 2, "formula")
    assert p.prompt_batches_per_s == pytest.approx(2 / 3.0) and p.token_batches_per_s == pytest.approx(2 / 2.0)
    assert p.throughput_batches_per_s == pytest.approx(2 / 3.0)


def test_at_least_one_prompt_machine():
    # 2*100/(0.001+100) rounds up to 2 = D: the prompt side would get none.
    p = plan(PlanInputs(prompt_time_s=0.001, token_time_s=1.0, tokens=100, machines=2))
    assert (p.prompt_machines, p.token_machines, p.formula_token_machines) == (1, 1, 2)
    assert p.bound == "at least one prompt machine"


def _llama_like(machine_gib, batch=8, prompt=1000):
    # W = 16 GiB, k = 128 KiB/token (Llama-3-8B bf16 KV: 32 layers x 2 x 8 heads x 128 x 2 B)
    return MemoryModel(machine_bytes=int(machine_gib * GiB), weight_bytes=16 * GiB, kv_bytes_per_token=131072,
                       batch=batch, prompt_tokens=prompt)


def test_memory_minimum_by_hand():
    mem = _llama_like(10)
    # prompt: KV = 8 x 1000 x 128 KiB = 1000 MiB; 16 GiB / (10 GiB - 1000 MiB) = 16384/9240 = 1.77 -> 2
    assert mem.min_machines(1000, "prompt") == 2
    # with 80 GiB machines one holds the whole model
    assert _llama_like(80).min_machines(1100, "token") == 1


def test_memory_raises_the_prompt_side():
    # formula: 4*5/(1+5) = 3.33 -> 4 token machines; the prompt side needs 2, so 2/2.
    p = plan(PlanInputs(prompt_time_s=1.0, token_time_s=0.05, tokens=100, machines=4), _llama_like(10))
    assert (p.prompt_min, p.token_min) == (2, 2)
    assert (p.prompt_machines, p.token_machines, p.bound) == (2, 2, "prompt memory")


def test_memory_raises_the_token_side():
    # formula: 6*0.1/(5+0.1) = 0.12 -> 1; memory needs 2 token machines
    p = plan(PlanInputs(prompt_time_s=5.0, token_time_s=0.001, tokens=100, machines=6), _llama_like(10))
    assert (p.prompt_machines, p.token_machines, p.bound) == (4, 2, "token memory")


def test_infeasible_configurations_name_the_numbers():
    with pytest.raises(ConfigError, match="3 machines cannot hold both sides: the prompt side needs >= 2 and the token side >= 2"):
        plan(PlanInputs(prompt_time_s=1.0, token_time_s=0.05, tokens=100, machines=3), _llama_like(10))
    with pytest.raises(ConfigError, match=r"does not fit a machine's 0.50 GiB"):
        plan(PlanInputs(prompt_time_s=1.0, token_time_s=0.05, tokens=100, machines=3), _llama_like(0.5))


@pytest.mark.parametrize("kw,match", [
    (dict(machines=1), "machines must be an int >= 2"),
    (dict(tokens=0), "tokens must be a positive int"),
    (dict(prompt_time_s=0.0), "prompt_time_s must be a positive finite number"),
    (dict(overhead=-1.0), "overhead must be"),
])
def test_bad_inputs(kw, match):
    base = dict(prompt_time_s=1.0, token_time_s=0.01, tokens=10, machines=4, overhead=1.0)
    with pytest.raises(ConfigError, match=match):
        PlanInputs(**{**base, **kw})


def test_model_bytes_llama3_8b_shape():
    weight, kv = model_bytes("llama3-8b")
    assert kv == 131072  # 32 layers x 2 x 8 KV heads x 128 x 2 bytes
    assert 8.0e9 * 2 < weight < 8.1e9 * 2  # Llama-3-8B has 8.03 B parameters
    with pytest.raises(ConfigError, match="Unknown model"):
        model_bytes("gpt-5")


def test_cli_flags_json(capsys):
    assert main(["--prompt-time", "1", "--token-time", "0.05", "--tokens", "100", "--machines", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["plan"]["prompt_machines"], doc["plan"]["token_machines"]) == (1, 7)


def test_cli_results_file_with_flag_override_and_memory(tmp_path, capsys):
    path = tmp_path / "disagg.json"
    path.write_text(json.dumps({"planner_inputs": {"prompt_time_s": 1.0, "token_time_s": 0.05, "tokens": 100,
                                                   "overhead": 1.0, "batch": 8, "prompt_tokens": 1000}}))
    assert main(["--results", str(path), "--machines", "4", "--machine-gib", "10", "--weight-gib", "16",
                 "--kv-bytes-per-token", "131072", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["plan"]["prompt_machines"], doc["plan"]["token_machines"], doc["plan"]["bound"]) == (2, 2, "prompt memory")
    assert main(["--results", str(path), "--machines", "4"]) == 0
    assert "token machines Dt" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["--prompt-time", "1", "--tokens", "5", "--machines", "4"]) == 2
    assert "missing planner inputs: token_time_s" in capsys.readouterr().err
    assert main(["--results", str(tmp_path / "none.json")]) == 2
    assert "Cannot read planner inputs" in capsys.readouterr().err


def test_swap_plan_hand_computed():
    from kvstream.serving.planner import swap_plan

    # W = 16 GiB over 4 stages: 36 GiB of room per 40 GiB stage; a 2048-token sequence is 0.25 GiB of KV
    p = swap_plan(machine_bytes=40 * GiB, weight_bytes=16 * GiB, kv_bytes_per_token=128 << 10, stages=4,
                  seq_tokens=2048, token_time_s=0.05, pcie_bytes_per_s=55e9)
    assert (p.batch_without_swap, p.batch_with_swap) == (144, 288)  # D/2 = 2x larger
    assert p.microbatch_kv_bytes == 288 * 2048 * (128 << 10)
    assert p.ratio == pytest.approx(p.microbatch_kv_bytes / (55e9 * 0.05)) and not p.hides
    two = swap_plan(machine_bytes=40 * GiB, weight_bytes=16 * GiB, kv_bytes_per_token=128 << 10, stages=2,
                    seq_tokens=2048)
    assert two.batch_with_swap == two.batch_without_swap  # no gain with D = 2
    small = swap_plan(machine_bytes=17 * GiB, weight_bytes=16 * GiB, kv_bytes_per_token=128 << 10, stages=1,
                      seq_tokens=1024, token_time_s=0.1)
    assert small.hides and small.ratio < 1
    with pytest.raises(ConfigError, match="cannot hold the weights"):
        swap_plan(machine_bytes=3 * GiB, weight_bytes=16 * GiB, kv_bytes_per_token=1, stages=4, seq_tokens=1)


def test_plan_swap_cli(capsys):
    assert main(["--swap", "--machine-gib", "40", "--machines", "4", "--seq-tokens", "2048", "--weight-gib", "16",
                 "--kv-bytes-per-token", str(128 << 10), "--token-time", "0.05", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["batch_without_swap"], doc["batch_with_swap"], doc["hides"]) == (144, 288, False)
    assert main(["--swap", "--machines", "4"]) == 2
    assert "--swap needs --machine-gib" in capsys.readouterr().err
