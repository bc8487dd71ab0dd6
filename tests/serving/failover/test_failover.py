"""Failures injected into real stage processes over gloo (CPU): each session of processes runs several
phases (one workload each, its own failures), in a subprocess bounded by a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("failover_driver.py")
#: Fast heartbeats (the default 1 s / 3 s is the CLI's), with room for a loaded 2-core machine.
BASE = dict(device="cpu", stages=2, microbatches=2, batch=1, requests=4, prompt_tokens=12, output_tokens="fixed:12",
            heartbeat_s=0.25, deadline_s=1.5, recovery_timeout_s=30.0, exit_watch=False)


def _session(tmp_path: Path, phases: list[dict], timeout_s: float, **cfg) -> tuple[dict, dict]:
    spec = {"config": {**BASE, **cfg}, "phases": phases}
    proc = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout_s, cwd=tmp_path,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {d["name"]: d for d in lines[:-1]}, lines[-1]["workers"]


def _exact(s: dict) -> None:
    """Every request identical to generate, no acked token computed again, no replica left behind."""
    assert s["identical"] == s["requests"] == s["completed"] == 4, s
    assert s["recomputed_tokens"] == 0, s
    assert s["unfired"] == [], s
    assert s["replica_end_bytes"] == 0, s


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    phases = [{"name": "decode", "kills": ["1@8"]}, {"name": "prompt", "kills": ["0@p1"]},
              {"name": "stop", "kills": ["1@5:stop"]}, {"name": "twice", "kills": ["0@3", "1@9"]}]
    return _session(tmp_path_factory.mktemp("ring"), phases, 150.0, replica="ring")


def test_stage_killed_at_decode_step(ring):
    s = ring[0]["decode"]
    _exact(s)
    (e,) = [e for e in s["events"] if e["spec"]]
    assert e["role"] == "stage 1" and e["how"] == "heartbeat" and e["spec"] == "1@8"
    assert 0 < s["detect_s"] <= BASE["deadline_s"] + 2 * BASE["heartbeat_s"] + 0.5
    assert s["restored_microbatches"] == 2 and s["restore_bytes"] > 0  # both in-flight microbatches came back
    assert sorted(s["hit"]) == [0, 1]


def test_stage_killed_during_the_prompt(ring):
    s = ring[0]["prompt"]
    _exact(s)
    assert [e["spec"] for e in s["events"] if e["spec"]] == ["0@p1"]


def test_sigstop_detected_like_death(ring):
    s = ring[0]["stop"]
    _exact(s)
    (e,) = [e for e in s["events"] if e["spec"]]
    assert e["how"] == "heartbeat" and e["spec"] == "1@5:stop"
    assert s["detect_s"] <= BASE["deadline_s"] + 2 * BASE["heartbeat_s"] + 0.5
    assert s["restored_microbatches"] == 2


def test_two_failures_in_a_row(ring):
    s = ring[0]["twice"]
    _exact(s)
    assert sorted(e["spec"] for e in s["events"] if e["spec"]) == ["0@3", "1@9"]


def test_ring_holds_nothing_after_the_requests(ring):
    for s in ring[0].values():
        assert s["replicas"]["end_bytes"] == 0 and s["replicas"]["peak_bytes"] > 0


def test_second_failure_during_recovery_disk(tmp_path):
    """Stage 1 dies; while stage 1's replacement restores, stage 0 dies too: both come back from the disk
    replicas, nothing acknowledged is computed again; the replica files of finished requests are deleted."""
    phases = [{"name": "recover", "kills": ["1@5", "0@recover"]}]
    got, _ = _session(tmp_path, phases, 90.0, replica="disk", replica_dir=str(tmp_path / "replicas"))
    s = got["recover"]
    _exact(s)
    assert sorted(e["spec"] for e in s["events"] if e["spec"]) == ["0@recover", "1@5"]
    assert s["restored_microbatches"] >= 2
    assert [f for f in s["disk_files"] if "/.tmp/" not in f] == []  # (a write cut by SIGKILL leaves a temp file)


def test_replica_holder_killed_host(tmp_path):
    """--replica host: stage 1 dies and its standby, which holds its replica, takes over locally; then stage
    0's replica holder dies: stage 0 keeps serving (reported unprotected) and every output stays exact."""
    phases = [{"name": "stage", "kills": ["1@6"]}, {"name": "holder", "kills": ["r0@5"]}]
    got, workers = _session(tmp_path, phases, 120.0, replica="host")
    t = got["stage"]
    _exact(t)
    assert t["restored_microbatches"] == 2
    s = got["holder"]
    _exact(s)
    (e,) = [e for e in s["events"] if e["spec"]]
    assert e["role"] == "holder 0" and e["spec"] == "r0@5"
    primary = [w for w in workers.values() if w.get("stage") == 0 and w.get("replication")]
    assert any(w["replication"]["dropped"] > 0 or w["replication"]["rebuilds"] > 0 for w in primary)


def test_cli_kill_at_decode_step(capsys):
    """``kvstream failover`` end to end (fast heartbeats, no baseline): the report's last two lines."""
    from kvstream.cli import main

    code = main(["failover", "--device", "cpu", "--stages", "2", "--requests", "4", "--kill", "1@6", "--no-baseline",
                 "--heartbeat-s", "0.25", "--deadline-s", "1.5", "--output-tokens", "fixed:10", "--timeout", "30"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    assert lines[-2:] == ["recomputed tokens: 0", "4/4 requests identical to an uninterrupted run"]
    assert any(line.startswith("failure: stage 1") and "detected by heartbeat" for line in lines)
    assert any(line.startswith("restore: 2 microbatch(es)") for line in lines)


@pytest.mark.parametrize("argv", [["--kill", "5@3"], ["--kill", "1@x"], ["--replica", "ring", "--stages", "1"],
                                  ["--kill", "r1@3"], ["--heartbeat-s", "3", "--deadline-s", "1"]])
def test_cli_user_error_is_one_line(capsys, argv):
    from kvstream.cli import main

    assert main(["failover", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failover" in err[0]
