"""``kvstream bench``: run the benchmark suite (:mod:`kvstream.bench`).

    kvstream bench all [--quick] [--out DIR] [--topics a,b] [--layers N]   every topic, then the plots
    kvstream bench kernels [--quick] [--out DIR] [topic options]           one topic
    kvstream bench plot [--out DIR]                                        CSVs -> PNGs
    kvstream bench list                                                    the topics

A full run writes CSVs, PNGs and ``summary.json`` under ``bench/results/`` of the source checkout (or
``./bench/results`` for an installed package; ``--out DIR`` elsewhere); ``--quick`` runs tiny shapes on
any device, writes to a temporary directory unless ``--out`` is given, and makes no timing claims.
"""

from __future__ import annotations

import sys
from typing import Sequence

from . import harness, plot, run_all

USAGE = """usage: kvstream bench <topic>|all|plot|list [--quick] [--out DIR] [options]

  all       every topic in one process (one model shared), then the plots; see --help of kvstream.bench.run_all
  <topic>   one topic: kernels, transfers, disk, generate, levels (and any other kvstream/bench/<name>.py with main)
  plot      turn the CSVs of a results directory into PNGs
  list      print the topics
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvstream bench``. Returns the exit code (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    harness.use_interpreter_without_gpu()
    topic, rest = argv[0], argv[1:]
    if topic == "all":
        return run_all.main(rest)
    if topic == "list":
        print("\n".join(run_all.available_topics()))
        return 0
    if topic == "plot":
        return plot.main(rest)
    if topic not in run_all.available_topics():
        print(f"kvstream bench: unknown topic {topic!r}; topics: {', '.join(run_all.available_topics())}, all, plot, list",
              file=sys.stderr)
        return 2
    return run_all.run_topic(topic, rest)


__all__ = ["main"]
