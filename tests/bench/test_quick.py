"""The benchmark suite's ``--quick`` CPU mode: it runs end to end and writes well-formed results.

No timing claims: these tests check that every topic produces CSV rows with every column, a
``summary.json`` with every key and field (``pass`` null in quick mode), the PNGs, and that nothing lands
in ``bench/results``. The pure helpers of records, timing and ceilings are checked directly.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstream.bench import ceilings, records, timing
from kvstream.bench.run_all import TOPICS, available_topics

ROOT = Path(__file__).resolve().parents[2]

#: summary.json keys the core topics write.
CORE_KEYS = ("pack_vs_copy", "pack_vs_torch", "decode_step_us", "d2h_vs_memcpy", "h2d_vs_memcpy", "disk_write_vs_raw",
             "disk_read_vs_raw", "stream_overhead", "offload_vs_dynamic", "hf_offload_vs_dynamic", "levels",
             "resume_host_vs_memcpy", "hook_step_host_us", "static_hook_step_host_us", "streamer_d2h_small_vs_memcpy")
ENTRY_FIELDS = ("value", "unit", "ceiling", "ceiling_of", "ratio", "target", "target_of", "pass", "device", "date",
                "quick", "detail")


def _results_listing() -> set[str]:
    d = ROOT / "bench" / "results"
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``kvstream bench all --quick`` in a subprocess, into a temp dir; returns (out dir, completed process)."""
    out = tmp_path_factory.mktemp("bench-quick")
    before = _results_listing()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "kvstream.cli", "bench", "all", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert _results_listing() == before, "a --quick run must not write into bench/results"
    return out, proc


@pytest.mark.slow
def test_quick_suite_exits_zero(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "## summary.json" in proc.stdout
    table = (out / "summary.md").read_text()
    assert "| pack_vs_copy |" in table and "| levels |" in table


@pytest.mark.slow
@pytest.mark.parametrize("topic", TOPICS)
def test_quick_topic_csv_rows_have_every_column(quick_run, topic):
    out, _ = quick_run
    path = out / f"{topic}.csv"
    assert path.exists(), f"{topic} wrote no CSV"
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert tuple(header) == records.COLUMNS
    assert rows, f"{topic}.csv has no rows"
    for row in rows:
        assert len(row) == len(records.COLUMNS)
        rec = dict(zip(header, row))
        assert all(rec[c] != "" for c in records.COLUMNS), rec
        p50, p20, p80 = float(rec["p50"]), float(rec["p20"]), float(rec["p80"])
        assert not any(math.isnan(v) for v in (p50, p20, p80)), rec
        assert p20 <= p50 <= p80, rec
        assert rec["bench"].startswith(topic + "."), rec


@pytest.mark.slow
def test_quick_summary_has_every_key_and_field(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "summary.json").read_text())
    assert doc["device"] and doc["date"]
    for key in CORE_KEYS:
        assert key in doc, f"summary.json lacks {key}"
        entry = doc[key]
        for field in ENTRY_FIELDS:
            assert field in entry, f"{key} lacks {field}"
        assert entry["quick"] is True and entry["pass"] is None, f"{key}: --quick makes no claims"
    # Every core entry but the HF peer (which needs CUDA) measured something on the CPU.
    for key in CORE_KEYS:
        if key != "hf_offload_vs_dynamic":
            assert doc[key]["value"] is not None, key
    assert doc["stream_overhead"]["conditions"]["tokens_identical"] is True
    assert doc["offload_vs_dynamic"]["conditions"]["tokens_identical"] is True


@pytest.mark.slow
def test_quick_prefix_topic_writes_the_reuse_keys(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "summary.json").read_text())
    for key in ("prefix_ttft_speedup", "file_store_read_vs_raw", "file_store_ttft_vs_prefill", "tiered_ttft_speedup",
                "reuse_plan_error"):
        assert doc[key]["value"] is not None and doc[key]["pass"] is None, key
    assert doc["file_store_ttft_vs_prefill"]["detail"]["plan"]["choice"] in ("load", "split", "recompute")
    assert doc["file_store_read_vs_raw"]["detail"]["raw"].startswith("raw-")


@pytest.mark.slow
def test_quick_offload_topic_writes_its_key_and_plot(quick_run):
    out, _ = quick_run
    entry = json.loads((out / "summary.json").read_text())["offload_budget"]
    assert entry["value"] is not None and entry["ceiling"] is not None and entry["pass"] is None
    fractions = entry["detail"]["fractions"]
    assert sorted(fractions, key=int) == ["0", "25", "50", "75", "100"]
    assert all(f["tokens_identical"] for f in fractions.values())
    with open(out / "offload.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["bench"], r["provider"]) for r in rows} >= {("offload.e2e", "kvstream"), ("offload.e2e", "pcie-floor"),
                                                           ("offload.ref", "dynamic")}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "offload_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_suite_draws_the_plots(quick_run):
    pytest.importorskip("matplotlib")
    out, _ = quick_run
    for name in ("kernels_bandwidth", "kernels_decode_step", "transfers", "disk", "generate_overhead",
                 "fig2_prompt_vs_token", "fig25_end_to_end", "levels"):
        png = out / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_default_results_dir_is_the_checkouts_bench_results(monkeypatch, tmp_path):
    """From a source checkout: <repo root>/bench/results wherever the run starts; installed: ./bench/results."""
    monkeypatch.chdir(tmp_path)
    assert records.repo_root() == ROOT
    assert records.default_results_dir() == ROOT / "bench" / "results"
    monkeypatch.setattr(records, "repo_root", lambda: None)
    assert records.default_results_dir() == tmp_path / "bench" / "results"


def test_topics_are_the_topic_modules_only():
    topics = available_topics()
    assert list(TOPICS) == topics[:len(TOPICS)]
    assert not set(topics) & {"cli", "harness", "plot", "run_all"}


def test_bench_cli_rejects_unknown_topic(capsys):
    from kvstream.bench import cli

    assert cli.main(["no-such-topic"]) == 2
    assert "unknown topic" in capsys.readouterr().err


def test_check_target():
    assert records.check_target(">= 0.90", 0.95) is True
    assert records.check_target(">= 0.90", 0.89) is False
    assert records.check_target("<= 15", 15.0) is True
    assert records.check_target("<= 0.02", 0.03) is False
    assert records.check_target("reported", 3.0) is None
    assert records.check_target(">= 1", None) is None
    with pytest.raises(ValueError, match="Unparsable target"):
        records.check_target("about 3", 1.0)


def test_alternating_reverses_every_other_round():
    assert list(timing.alternating(["a", "b", "c"], 3)) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]
    assert list(timing.alternating(["a"], 0)) == []


def test_compare_marks_a_spread_larger_than_the_effect_noisy():
    clear = timing.compare([1.01, 1.011, 1.012, 1.01, 1.011], [1.0, 1.001, 1.0, 1.002, 1.001])
    assert clear["noisy"] is False and clear["effect"] == pytest.approx(0.0105, abs=1e-3)
    assert clear["ours"]["min"] == 1.01 and clear["base"]["max"] == 1.002 and clear["reps"] == 5
    noisy = timing.compare([1.0, 1.3, 1.02, 1.01, 1.0], [1.0, 1.01, 1.0, 1.02, 1.0])
    assert noisy["noisy"] is True


def test_noisy_comparison_is_not_met(tmp_path):
    e = records.record_summary(tmp_path, "x", value=0.01, unit="fraction", ceiling=1.0, ceiling_of="base",
                               target="<= 0.02", target_of="value", noisy=True)
    assert e["noisy"] is True and e["pass"] is False


def test_stat_rate_keeps_quantiles_ordered():
    ms = timing.Stat.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ms.p20 <= ms.p50 <= ms.p80
    bw = ms.rate(1000.0)
    assert bw.p20 <= bw.p50 <= bw.p80
    assert bw.p50 == pytest.approx(1000.0 / ms.p50)


def test_record_summary_merges_and_decides_pass(tmp_path):
    env = {"device": "dev", "date": "2026-01-01T00:00:00Z"}
    records.record_summary(tmp_path, "a", value=9.0, unit="GB/s", ceiling=10.0, ceiling_of="copy", target=">= 0.95",
                           env=env)
    records.record_summary(tmp_path, "b", value=3.0, unit="x", ceiling=95.0, ceiling_of="paper", target="reported",
                           target_of="value", conditions={"level3_best": True}, detail={0: {"k": 1}}, env=env)
    records.record_summary(tmp_path, "c", value=1.0, unit="x", ceiling=1.0, ceiling_of="peer", target=">= 0.5",
                           env=env, quick=True)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert set(doc) == {"a", "b", "c", "device", "date"}
    assert doc["a"]["ratio"] == pytest.approx(0.9) and doc["a"]["pass"] is False
    assert doc["b"]["pass"] is True and doc["b"]["detail"] == {"0": {"k": 1}}
    assert doc["c"]["pass"] is None
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))


def test_raw_disk_round_trip(tmp_path):
    """raw_write writes its buffer's first block again and again (like dd); raw_read reads the file to its end."""
    buf = ceilings.aligned_buffer(2 * 4096)
    direct = ceilings.supports_direct_io(tmp_path)
    ceilings.raw_write(tmp_path / "f.bin", 3 * 4096, buf, direct=direct, block_bytes=4096)
    assert (tmp_path / "f.bin").read_bytes() == bytes(buf)[:4096] * 3
    out = ceilings.aligned_buffer(4096)
    out[:] = b"\xa5" * 4096
    assert ceilings.raw_read(tmp_path / "f.bin", out, direct=direct, block_bytes=4096) == 3 * 4096
    assert bytes(out) == bytes(buf)[:4096]
    with pytest.raises(ValueError, match="multiple of 4096"):
        ceilings.ceiling_disk(None, tmp_path, 1000, 1, bench="disk", x=0)


@pytest.mark.gpu
def test_quick_suite_on_the_gpu(tmp_path):
    """The GPU code paths (events, zero-copy, CUDA graph, HF offload) with tiny shapes: every topic runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "kvstream.bench.run_all", "--quick", "--device", "cuda", "--out", str(tmp_path),
                           "--no-plot"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    for key in CORE_KEYS:
        assert doc[key]["value"] is not None, (key, doc[key]["detail"].get("error"))
    import torch

    assert doc["device"] == torch.cuda.get_device_name(0)


def test_compare_pairs_cancel_a_drift_common_to_both_sides():
    # ours is 1 % slower in every pair; the machine slows down 30 % after two rounds: noisy by the medians'
    # spread, and each pair still reads 1 %
    drift = [1.0, 1.0, 1.3, 1.3, 1.3]
    c = timing.compare([1.01 * m for m in drift], drift)
    assert c["noisy"] is True and c["pairs"]["n"] == 5
    for q in ("median", "min", "max"):
        assert c["pairs"][q] == pytest.approx(0.01)


@pytest.mark.slow
def test_generate_with_the_a_a_control_records_the_noise_floor(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "kvstream.bench.generate", "--quick", "--fig2-prompts", "",
                           "--providers", "dynamic-again,stream-host", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    detail = json.loads((tmp_path / "summary.json").read_text())["stream_overhead"]["detail"]
    control, cmp = detail["control"], detail["comparison"]
    assert control["reps"] == cmp["reps"] >= 1 and set(control["pairs"]) == {"median", "min", "max", "n"}
    assert control["base"] == cmp["base"]  # both against the same DynamicCache runs
    doc = json.loads((tmp_path / "summary.json").read_text())["stream_overhead"]
    assert doc["conditions"]["kv_resident <= DynamicCache's + HOLD_BYTES"] is True  # CPU: nothing on a GPU
    assert detail["kv_resident_GB"] == detail["dynamic_kv_resident_GB"] == 0
    cpu, cpu_control = detail["cpu_comparison"], detail["cpu_control"]  # the process's CPU seconds, same runs
    assert cpu["base"] == cpu_control["base"] and cpu["base"]["min"] > 0 and cpu["reps"] == cmp["reps"]
    rows = list(csv.DictReader((tmp_path / "generate.csv").open()))
    providers = {r["provider"] for r in rows if r["bench"] == "generate.e2e"}
    assert providers == {"dynamic", "dynamic-again", "stream-host"}
    assert {r["provider"] for r in rows if r["metric"] == "cpu_time"} == providers


def test_disk_ceiling_measures_blocks_and_whole_files_at_every_depth(tmp_path):
    class _Run:  # the Run method ceiling_disk uses: timings become rows
        def __init__(self):
            self.rows = []

        def add_time_and_bandwidth(self, bench, provider, x, ms, nbytes, time_unit):
            self.rows.append((bench, provider))
            return ms.rate(nbytes)

    run = _Run()
    file_bytes = ceilings.RAW_DISK_BLOCK_BYTES + 4096  # larger than a block: both I/O sizes
    w, r, label = ceilings.ceiling_disk(run, tmp_path, file_bytes, 2, bench="disk", x=0, reps=1, queue_depths=(1, 2))
    if ceilings.supports_direct_io(tmp_path):  # O_DIRECT in both sizes, and buffered in blocks
        providers = [f"raw-odirect-qd{q}{s}" for q in (1, 2) for s in ("", "-whole")] + ["raw-buffered-qd1", "raw-buffered-qd2"]
    else:
        providers = [f"raw-buffered-qd{q}{s}" for q in (1, 2) for s in ("", "-whole")]
    assert run.rows == [(f"disk.{op}", p) for p in providers for op in ("write", "read")]
    assert w.p50 > 0 and r.p50 > 0 and "whole files" in label and not list(tmp_path.glob("raw*.bin"))


def test_raw_disk_writes_each_file_from_its_own_source_in_every_case(tmp_path):
    file_bytes = 3 * 4096
    srcs = [torch.randint(0, 256, (file_bytes,), dtype=torch.uint8).numpy() for _ in range(2)]
    raw = ceilings.RawDisk(tmp_path, file_bytes, 2, queue_depths=(1, 2), sources=srcs)
    try:
        for name, case in raw.cases.items():
            for p in raw.paths:
                p.write_bytes(b"\0" * file_bytes)
            case.write()
            for p, src in zip(raw.paths, srcs):
                assert p.read_bytes() == src.tobytes(), name
            case.read()
    finally:
        raw.close()
    assert not list(tmp_path.glob("raw*.bin"))
    with pytest.raises(ValueError, match="one buffer per file|buffers for 2 files"):
        ceilings.RawDisk(tmp_path, file_bytes, 2, sources=srcs[:1])


def test_disk_cases_alternate_and_each_turn_writes_then_reads():
    log = []
    cases = {n: ceilings.DiskCase(lambda n=n: log.append((n, "w")), lambda n=n: log.append((n, "r")),
                                  (lambda n=n: log.append((n, "evict"))) if n == "b" else None) for n in ("a", "b")}
    samples = ceilings.time_disk_cases(cases, reps=2)
    assert log == [("a", "w"), ("a", "r"), ("b", "w"), ("b", "evict"), ("b", "r"),
                   ("b", "w"), ("b", "evict"), ("b", "r"), ("a", "w"), ("a", "r")]
    assert all(len(samples[n][op]) == 2 for n in cases for op in ("write", "read"))