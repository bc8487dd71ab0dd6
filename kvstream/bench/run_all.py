"""Run the whole suite in one process: every topic, then the plots, then the summary table.

    PYTHONPATH=$PWD python3 -m kvstream.bench.run_all            # GPU: everything under bench/results/
    PYTHONPATH=$PWD python3 -m kvstream.bench.run_all --quick    # CPU smoke run into a temp dir
    PYTHONPATH=$PWD python3 -m kvstream.bench.run_all --topics kernels,levels --layers 8

One process, so the Llama-3-8B-shaped model is built once and shared by ``generate`` and ``levels``.
A topic that fails is reported (with its traceback) and the others still run; the exit code is 1 then.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from . import harness, inputs, plot, records, timing

#: The core topics, in the order ``all`` runs them (generate before levels: levels reuses its model).
TOPICS: tuple[str, ...] = ("kernels", "transfers", "disk", "hook", "generate", "levels")
#: Other helpers' topics that ``all`` runs when their script exists (nccl_handoff only with two GPUs).
EXTRA_TOPICS: tuple[str, ...] = ("resume", "prefix", "pipeline", "offload", "nccl_handoff")
_NOT_TOPICS = {"__init__", "ceilings", "cli", "harness", "inputs", "plot", "prefix_ttft", "records", "run_all",
               "timing"}


def available_topics() -> list[str]:
    """Every ``kvstream/bench/<name>.py`` that is a topic: the core ones first, then the others found."""
    found = sorted(p.stem for p in records.bench_dir().glob("*.py") if p.stem not in _NOT_TOPICS and not p.stem.startswith("_"))
    return [t for t in TOPICS if t in found] + [t for t in found if t not in TOPICS]


def default_topics() -> list[str]:
    """What ``all`` runs: the core topics plus the extra ones that exist and fit this machine."""
    import torch

    topics = [t for t in TOPICS if t in available_topics()]
    for t in EXTRA_TOPICS:
        if t in available_topics() and (t != "nccl_handoff" or torch.cuda.device_count() >= 2):
            topics.append(t)
    return topics


def run_topic(topic: str, argv: Sequence[str]) -> int:
    """Import ``kvstream.bench.<topic>`` and call its ``main(argv)``; returns its exit code."""
    module = importlib.import_module(f"{__package__}.{topic}")
    if not hasattr(module, "main"):
        raise SystemExit(f"kvstream/bench/{topic}.py has no main(argv)")
    return int(module.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected topics with the shared options, then the plots. Returns 0, or 1 if a topic failed."""
    p = harness.common_parser("run_all", __doc__)
    p.add_argument("--topics", default=None, help="comma-separated topics (default: " + ",".join(TOPICS) + " + extras found)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    args, extra = p.parse_known_args(list(argv) if argv is not None else None)
    topics = args.topics.split(",") if args.topics else default_topics()
    unknown = [t for t in topics if t not in available_topics()]
    if unknown:
        print(f"kvstream.bench.run_all: unknown topics {unknown}; available: {available_topics()}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="kvstream-bench-")) if args.quick
                                           else records.default_results_dir())
    out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(out), "--layers", str(args.layers)]
    common += ["--quick"] if args.quick else []
    common += ["--device", args.device] if args.device else []
    common += ["--disk-dir", args.disk_dir] if args.disk_dir else []
    timing.progress(f"suite: topics {topics} -> {out}" + ("  [--quick]" if args.quick else ""))
    failed: list[str] = []
    t_start = time.perf_counter()
    for topic in topics:
        timing.progress(f"=== {topic} ===")
        t0 = time.perf_counter()
        try:
            rc = run_topic(topic, common + list(extra))
        except Exception:  # noqa: BLE001 - report and go on with the other topics
            traceback.print_exc()
            rc = 1
        inputs.free_memory()
        timing.progress(f"=== {topic}: {'ok' if rc == 0 else f'FAILED (rc {rc})'} in {time.perf_counter() - t0:.1f} s ===")
        if rc != 0:
            failed.append(topic)
    inputs.release_models()
    if not args.no_plot:
        try:
            plot.main(["--out", str(out)])
        except Exception:  # noqa: BLE001 - plots are a convenience; the CSVs are the record
            traceback.print_exc()
            failed.append("plot")
    table = records.summary_table(out / "summary.json")
    (out / "summary.md").write_text(f"<!-- written by kvstream/bench/run_all.py from summary.json -->\n{table}\n")
    print("\n## summary.json\n")
    print(table)
    timing.progress(f"suite done in {time.perf_counter() - t_start:.1f} s; results in {out}"
                    + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    harness.module_main(main)
