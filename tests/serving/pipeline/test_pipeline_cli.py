"""``kvstream pipeline`` and ``torchrun -m kvstream.serving.pipeline``: real stage processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvstream.serving.pipeline.cli import main

TIMEOUT_S = 120


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning"))


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


def _launch(capsys, argv: list[str], disaggregate: bool = False) -> subprocess.CompletedProcess:
    """The launcher in this process (saves an interpreter start); the stages are real processes."""
    code = main(argv, disaggregate=disaggregate)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def test_two_stages_four_microbatches_eight_requests_identical(tmp_path, capsys):
    proc = _launch(capsys, ["--device", "cpu", "--stages", "2", "--microbatches", "4",
                "--requests", "8", "--results", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "8/8 requests identical to single-process generate"
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [s["layers"] for s in doc["stages"]] == [[0, 2], [2, 4]]
    assert doc["summary"]["requests"] == 8 and "throughput" in proc.stdout and "peak KV" in proc.stdout


def test_two_stages_swapping_under_a_small_budget_identical_and_within_it(tmp_path, capsys):
    png = tmp_path / "stall.png"
    proc = _launch(capsys, ["--device", "cpu", "--stages", "2", "--microbatches", "4",
                "--requests", "8", "--arch", "gpt2", "--swap", "--kv-budget-mb", "0.12",
                "--results", str(tmp_path), "--plot", str(png)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "8/8 requests identical to single-process generate"
    doc = json.loads((tmp_path / "summary.json").read_text())
    for st in doc["stages"]:
        assert st["swap_in_bytes"] > 0 and 0 < st["peak_kv_bytes"] <= 0.12 * (1 << 20)
    assert png.stat().st_size > 1000


def test_torchrun_launches_the_stages(tmp_path):
    proc = _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "kvstream.serving.pipeline", "--device", "cpu", "--requests", "4", "--batch", "2",
                "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "4/4 requests identical to single-process generate"
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["config"]["stages"] == 2 and len(doc["stages"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--stages", "9"], "exceeds num_layers"),
    (["--swap"], "--swap needs --kv-budget-mb"),
    (["--stages", "1", "--kv-budget-mb", "0.001"], "cannot hold one microbatch"),
    (["--swap", "sometimes"], "invalid choice"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(["--device", "cpu", *argv])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_one_stage_runs_in_process_with_the_identical_line(capsys):
    assert main(["--device", "cpu", "--stages", "1", "--requests", "3", "--arch", "qwen2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3/3 requests identical to single-process generate"


@pytest.mark.gpu2
def test_two_gpu_stages_over_nccl_float32_identical(tmp_path):
    proc = _run("-m", "kvstream.cli", "pipeline", "--device", "cuda", "--stages", "2", "--microbatches", "4",
                "--requests", "8", "--model", "tiny", "--dtype", "float32", "--prompt-tokens", "32",
                "--output-tokens", "uniform:4:12", "--swap", "--kv-budget-mb", "0.06", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "8/8 requests identical to single-process generate"


def test_disagg_on_pipelines_two_prompt_stages_stream_to_one_token_stage_that_swaps(tmp_path, capsys):
    """``kvstream disagg --stages 1 --prompt-stages 2``: each prompt stage streams its layers' KV to the one
    token stage (placement: two sources), which decodes four microbatches under a budget that holds two."""
    proc = _launch(capsys, ["--device", "cpu", "--stages", "1", "--prompt-stages", "2",
                            "--microbatches", "4", "--requests", "6", "--arch", "opt", "--output-tokens", "fixed:30",
                            "--swap", "--kv-budget-mb", "0.3", "--results", str(tmp_path)], disaggregate=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "6/6 requests identical to single-process generate"
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [p["layers"] for p in doc["prompt_stages"]] == [[0, 2], [2, 4]]
    assert all(len(p["prefills"]) == 6 for p in doc["prompt_stages"])
    (token,) = doc["stages"]
    assert token["layers"] == [0, 4] and token["swap_in_bytes"] > 0 and token["peak_kv_bytes"] <= 0.3 * (1 << 20)
    assert {s["kind"] for s in token["steps"]} == {"join", "decode"}  # no prefill on the token side


@pytest.mark.gpu2
def test_two_gpu_disagg_on_pipelines_float32_identical(tmp_path):
    proc = _run("-m", "kvstream.cli", "disagg", "--device", "cuda", "--stages", "1", "--prompt-stages", "1",
                "--microbatches", "2", "--requests", "6", "--model", "tiny", "--dtype", "float32", "--prompt-tokens",
                "32", "--output-tokens", "uniform:4:12", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _last_line(proc) == "6/6 requests identical to single-process generate"
