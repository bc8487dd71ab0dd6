"""``kvstream bench``: run the benchmark suite that lives in the repository's ``bench/`` directory.

    kvstream bench all [--quick] [--out DIR] [--topics a,b] [--layers N]   every topic, then the plots
    kvstream bench kernels [--quick] [--out DIR] [topic options]           one topic
    kvstream bench plot [--out DIR]                                        CSVs -> PNGs
    kvstream bench list                                                    the topics

The scripts are not part of the installed package: they sit in ``bench/`` next to the ``kvstream``
package of a source checkout, and are imported as the package ``bench`` from the repository root (so
``bench/`` itself never lands on ``sys.path``). A full run writes CSVs, PNGs and ``summary.json`` under
``bench/results/``; ``--quick`` runs tiny shapes on any device, writes to a temporary directory unless
``--out`` is given, and makes no timing claims.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

USAGE = """usage: kvstream bench <topic>|all|plot|list [--quick] [--out DIR] [options]

  all       every topic in one process (one model shared), then the plots; see --help of bench.run_all
  <topic>   one topic: kernels, transfers, disk, generate, levels (and any other bench/<name>.py with main)
  plot      turn the CSVs of a results directory into PNGs
  list      print the topics
"""


def find_bench_dir() -> Path | None:
    """The ``bench/`` directory next to the ``kvstream`` package (a source checkout), or ``None``."""
    here = Path(__file__).resolve().parent.parent / "bench"
    return here if (here / "harness.py").is_file() and (here / "run_all.py").is_file() else None


def _import_bench(bench_dir: Path):
    """Import the ``bench`` package from ``bench_dir`` (its parent put first on ``sys.path``)."""
    if not os.environ.get("TRITON_INTERPRET"):
        try:
            import torch

            if not torch.cuda.is_available():  # Triton kernels need the interpreter on the CPU, set before import
                os.environ["TRITON_INTERPRET"] = "1"
        except ImportError:
            pass
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    pkg = importlib.import_module("bench")
    found = Path(pkg.__file__).resolve().parent
    if found != bench_dir.resolve():
        raise ImportError(f"'import bench' found {found}, not the suite at {bench_dir}; another package named "
                          "'bench' shadows it on sys.path")
    return importlib.import_module("bench.run_all")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kvstream bench``. Returns the exit code (2 for usage errors or a missing ``bench/``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    bench_dir = find_bench_dir()
    if bench_dir is None:
        print(f"kvstream bench: the benchmark scripts live in the repository's bench/ directory next to the kvstream "
              f"package, and there is none at {Path(__file__).resolve().parent.parent / 'bench'} (with harness.py and "
              f"run_all.py). An installed wheel does not ship them: run from a source checkout (PYTHONPATH=<checkout> "
              f"or pip install -e).", file=sys.stderr)
        return 2
    run_all = _import_bench(bench_dir)
    topic, rest = argv[0], argv[1:]
    if topic == "all":
        return run_all.main(rest)
    if topic == "list":
        print("\n".join(run_all.available_topics()))
        return 0
    if topic == "plot":
        return importlib.import_module("bench.plot").main(rest)
    if topic not in run_all.available_topics():
        print(f"kvstream bench: unknown topic {topic!r}; topics: {', '.join(run_all.available_topics())}, all, plot, list",
              file=sys.stderr)
        return 2
    return run_all.run_topic(topic, rest)


__all__ = ["main", "find_bench_dir"]
