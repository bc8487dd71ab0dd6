"""The multi-GPU topics' ``--quick`` CPU modes (issue 11) run end to end over gloo with real processes and write
well-formed results; no timing claims (``pass`` null)."""

from __future__ import annotations

import csv
import json

from kvstream.bench import swap_throughput


def _entry(out, key):
    entry = json.loads((out / "summary.json").read_text())[key]
    assert entry["quick"] is True and entry["pass"] is None
    return entry


def test_swap_throughput_quick_swaps_under_a_budget_that_binds(tmp_path):
    assert swap_throughput.main(["--quick", "--out", str(tmp_path), "--timeout", "60"]) == 0
    entry = _entry(tmp_path, "swap_throughput_gain")
    assert entry["value"] > 0 and entry["ceiling"] > 0 and entry["ratio"] == entry["value"] / entry["ceiling"]
    detail = entry["detail"]
    budget = detail["budget"]
    assert "smaller GPU" in budget["emulates"] and "smaller GPU" in detail["cap"]
    # the budget holds exactly the no-swap side's M microbatches, or two of the swap side's D/2-larger ones
    assert budget["no_swap_fits_microbatches"] == budget["microbatches"] == 4
    assert budget["swap_microbatch_rows"] == 2 * budget["no_swap_microbatch_rows"]
    assert detail["checked"] is True  # both sides' tokens equal single-process generate (run_once raises otherwise)
    stages = detail["stall_fraction_per_stage"]
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["swap_in_mib"] > 0 and 0 <= s["stall_fraction"] <= 1 for s in stages)
    assert all(s["peak_kv_mib"] <= budget["kv_budget_mib_per_stage"] for s in stages + detail["no_swap_per_stage"])
    assert all(s["swap_in_mib"] == 0 for s in detail["no_swap_per_stage"])
    rows = list(csv.DictReader(open(tmp_path / "swap_throughput.csv")))
    assert {(r["bench"], r["provider"]) for r in rows} >= {("swap_throughput.throughput", "swap"),
                                                           ("swap_throughput.throughput", "no-swap"),
                                                           ("swap_throughput.stall", "swap/stage1")}
    assert (tmp_path / "swap_throughput.png").stat().st_size > 1000


def test_sustained_rate_is_the_highest_rate_within_the_factor_of_the_lowest():
    from kvstream.bench.disagg import sustained_rate

    assert sustained_rate({1.0: 0.01, 2.0: 0.012, 4.0: 0.019, 8.0: 0.05}, 2.0) == 4.0
    assert sustained_rate({1.0: 0.01, 2.0: 0.03}, 2.0) == 1.0  # the lowest rate always counts
    assert sustained_rate({4.0: 0.01, 2.0: 0.01}, 2.0) == 4.0  # order of the keys does not matter


def test_disagg_quick_pipeline_engine_reports_latency_against_rate(tmp_path):
    from kvstream.bench import disagg

    assert disagg.main(["--quick", "--engine", "pipeline", "--out", str(tmp_path), "--timeout", "60"]) == 0
    entry = _entry(tmp_path, "disagg_vs_colocated")
    detail = entry["detail"]
    assert entry["unit"] == "s/token" and entry["target"] == ">= 1.3"
    assert entry["ratio"] == entry["ceiling"] / entry["value"]  # colocated s/token over disaggregated s/token
    assert detail["engine"] == "pipeline" and detail["sustained_rate_req_per_s"] in (25.0, 50.0)
    assert entry["conditions"] == {"rates >= 4": False}  # --quick runs two rates
    curves = detail["normalized_latency_vs_rate"]
    assert set(curves) == {"disaggregated", "colocated"} and all(set(c) == {"25", "50"} for c in curves.values())
    assert detail["peak_throughput_ratio"] > 0
    rows = list(csv.DictReader(open(tmp_path / "disagg.csv")))
    assert {r["metric"] for r in rows} >= {"normalized_latency_mean", "throughput"}
    assert (tmp_path / "disagg.png").stat().st_size > 1000


def test_nccl_handoff_quick_by_chunk_size_reports_the_worst_size(tmp_path):
    from kvstream.bench import nccl_handoff

    argv = ["--quick", "--out", str(tmp_path), "--reps", "1", "--chunk-mib", "4,8,16,32", "--total-mib", "128"]
    assert nccl_handoff.main(argv) == 0
    entry = _entry(tmp_path, "nccl_handoff_vs_raw")
    detail = entry["detail"]
    # --quick reads the sizes as KiB: 128 KiB in 32, 16, 8 and 4 chunks
    assert set(detail["ratio_per_size"]) == {"4KiBx32", "8KiBx16", "16KiBx8", "32KiBx4"}
    assert detail["worst_size"] == min(detail["ratio_per_size"], key=detail["ratio_per_size"].get)
    assert entry["ratio"] == detail["ratio_per_size"][detail["worst_size"]]
    assert detail["largest_size"] == "32KiBx4" and detail["handoff_bytes"] == 128 * 1024
    for size in detail["ratio_per_size"]:
        assert all(detail[f"{size}/{p}"]["identical"] for p in nccl_handoff.PROVIDERS)
    assert detail["4KiBx32/raw"]["chunks"] == 32 and detail["4KiBx32/raw"]["chunk_bytes"] == 4096
    rows = list(csv.DictReader(open(tmp_path / "nccl_handoff.csv")))
    assert {r["x"] for r in rows} == set(detail["ratio_per_size"])


def test_x2_script_runs_its_parts_bounded_and_writes_a_manifest(tmp_path):
    """bench/multi_gpu/x2.sh with MG_QUICK=1 (each topic's --quick): the nccl part, failover guarded."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHON=sys.executable, MG_QUICK="1", KVSTREAM_GIT_SHA="0123abc")
    proc = subprocess.run(["bash", str(root / "bench/multi_gpu/x2.sh"), str(tmp_path), "nccl", "failover"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest-x2.json").read_text())
    assert manifest["git_sha"] == "0123abc" and manifest["topics"]["nccl_handoff"]["exit"] == 0
    assert "disagg" not in manifest["topics"]  # only the parts asked for
    if not (root / "kvstream/bench/failover.py").exists():
        assert "failover: kvstream/bench/failover.py is not in this tree" in proc.stdout
    entry = _entry(tmp_path, "nccl_handoff_vs_raw")
    assert entry["git_sha"] == "0123abc" and set(entry["detail"]["ratio_per_size"]) == {
        "4KiBx4", "8KiBx4", "16KiBx4", "32KiBx4"}
    with tarfile.open(tmp_path / "x2-runs.tar.gz") as tar:
        assert "logs-x2/nccl_handoff.log" in tar.getnames()
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back from $OUT
