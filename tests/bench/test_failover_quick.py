"""kvstream/bench/failover.py's ``--quick`` CPU mode runs end to end (real processes) and writes every key."""

from __future__ import annotations

import csv
import json

from kvstream.bench import failover

KEYS = ("ft_latency_inflation", "ft_baseline_inflation", "ft_restore_vs_reprefill", "ft_recomputed_tokens",
        "ft_detect_s", "replication_overhead")


def test_quick_run_writes_every_key(tmp_path):
    assert failover.main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(KEYS) <= set(summary)
    for key in KEYS:
        assert summary[key]["quick"] is True and summary[key]["pass"] is None
        assert summary[key]["value"] is not None and summary[key]["value"] == summary[key]["value"]  # not NaN
    assert summary["ft_recomputed_tokens"]["value"] == 0
    assert summary["ft_recomputed_tokens"]["conditions"] == {"all_identical": True}
    assert 0 < summary["ft_detect_s"]["value"] <= 1.5 + 1.0
    # a hit request waited for its stage's death to be detected (a causal bound: a ratio against the
    # failure-free phase is a timing comparison, and on a loaded 2-core machine that phase can run slower)
    assert summary["ft_latency_inflation"]["value"] >= summary["ft_detect_s"]["value"]
    assert summary["ft_latency_inflation"]["ceiling"] > 0
    rows = list(csv.DictReader(open(tmp_path / "failover.csv")))
    assert {r["bench"] for r in rows} == {"failover.latency", "failover.overhead", "failover.restore"}
