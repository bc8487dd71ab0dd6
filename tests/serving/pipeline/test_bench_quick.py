"""kvstream/bench/pipeline.py's ``--quick`` CPU mode runs end to end and writes well-formed results (no timing claims)."""

from __future__ import annotations

import csv
import json

from kvstream.bench import pipeline


def test_quick_run_writes_csv_summary_and_png(tmp_path):
    assert pipeline.main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"swap_stall_fraction", "capacity_mode", "pipeline_overhead"} <= set(summary)
    summary = {k: summary[k] for k in ("swap_stall_fraction", "capacity_mode", "pipeline_overhead")}
    for entry in summary.values():
        assert entry["pass"] is None and entry["quick"] is True and entry["value"] == entry["value"]  # not NaN
    points = summary["swap_stall_fraction"]["detail"]["points"]
    assert [p["context"] for p in points] == [16, 32, 64] and all(p["swap_in_mib"] > 0 for p in points)
    assert summary["capacity_mode"]["detail"]["sessions_kv_over_budget"] >= 4
    rows = list(csv.DictReader(open(tmp_path / "pipeline.csv")))
    assert {r["bench"] for r in rows} == set(summary) and all(r["value"] for r in rows)
    assert (tmp_path / "swap_overlap.png").stat().st_size > 1000
