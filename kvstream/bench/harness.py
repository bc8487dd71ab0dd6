"""The run of one topic: its command line, device and results directory, and the rows it records.

Every topic script builds a :class:`Run` from its command line, measures (:mod:`.timing`, against the
ceilings of :mod:`.ceilings`, on inputs from :mod:`.inputs`), and records (:mod:`.records`): one CSV row per
measurement, a markdown table on stdout, headline figures merged into ``summary.json``::

    from kvstream.bench.harness import Run, module_main

    def main(argv=None) -> int:
        run = Run.from_argv("prefix", argv)
        ...
        run.summary("prefix_ttft_speedup", value=7.2, unit="x", ceiling=None, ceiling_of="full prefill",
                    target=">= 5", target_of="value")
        return run.finish()

``--quick`` runs tiny shapes with a few repetitions on whatever device there is (the CPU in CI) and makes
**no timing claims**: its summary entries carry ``"quick": true`` and ``"pass": null``, and it writes to a
temporary directory unless ``--out`` is given, never to ``bench/results``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .records import GB, append_csv, default_results_dir, environment, record_summary, rows_table
from .timing import Stat, time_device, time_host


def use_interpreter_without_gpu() -> None:
    """Run Triton kernels under the interpreter when there is no CUDA GPU.

    ``TRITON_INTERPRET`` is read when kernels are decorated, so this must run before ``kvstream.kernels``
    (or anything that imports triton) is imported; the topic scripts import kvstream lazily for that reason.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def common_parser(topic: str, description: str | None = None) -> argparse.ArgumentParser:
    """The options every topic takes: ``--quick``, ``--out``, ``--device``, ``--layers``, ``--disk-dir``."""
    p = argparse.ArgumentParser(prog=f"kvstream.bench.{topic}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few repetitions, any device; no timing claims; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="results directory (default: bench/results, or a temp dir with --quick)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-3-8B shape (default 32)")
    p.add_argument("--disk-dir", default=os.environ.get("KVSTREAM_BENCH_DISK"),
                   help="directory on the disk to measure (default: $KVSTREAM_BENCH_DISK, else the out dir)")
    return p


#: The workload options several topics share: parameter of :func:`workload_args` -> (flag, help).
WORKLOAD_OPTIONS = {"batch": ("--batch", "batch rows"), "prompt": ("--prompt", "prompt tokens"),
                    "prompt_tokens": ("--prompt-tokens", "prompt length"),
                    "new_tokens": ("--new-tokens", "tokens generated per request"),
                    "reps": ("--reps", "alternating repetitions")}


def workload_args(p: argparse.ArgumentParser, *, batch: int | None = None, prompt: int | None = None,
                  prompt_tokens: int | None = None, new_tokens: int | None = None, reps: int | None = None,
                  helps: dict[str, str] | None = None) -> None:
    """Add the shared workload options whose default is given, in this order, as ints.

    ``batch`` -> ``--batch`` (rows), ``prompt`` -> ``--prompt`` or ``prompt_tokens`` -> ``--prompt-tokens``
    (tokens; topics spell it either way), ``new_tokens`` -> ``--new-tokens`` (tokens), ``reps`` -> ``--reps``.
    Each help is :data:`WORKLOAD_OPTIONS`' text, or the topic's own from ``helps`` (keyed by parameter name)
    where the option means more there, followed by ``(default N)``.
    """
    given = dict(batch=batch, prompt=prompt, prompt_tokens=prompt_tokens, new_tokens=new_tokens, reps=reps)
    for name, default in given.items():
        if default is not None:
            flag, text = WORKLOAD_OPTIONS[name]
            p.add_argument(flag, type=int, default=default, help=f"{(helps or {}).get(name, text)} (default {default})")


class Run:
    """One topic's measurements: options, context columns, rows; writes the CSV, table and summary entries.

    Parameters
    ----------
    topic : str
        File stem of the CSV (``kernels`` -> ``<out>/kernels.csv``).
    args : argparse.Namespace
        From :func:`common_parser` (plus the topic's own options).
    """

    def __init__(self, topic: str, args: argparse.Namespace):
        use_interpreter_without_gpu()
        self.topic = topic
        self.args = args
        self.quick = bool(args.quick)
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"kvstream.bench.{topic}: --device {dev} but torch sees no CUDA GPU")
        if args.out:
            self.out_dir = Path(args.out)
        elif self.quick:
            self.out_dir = Path(tempfile.mkdtemp(prefix="kvstream-bench-"))
        else:
            self.out_dir = default_results_dir()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.env = environment(self.device)
        self.rows: list[dict[str, Any]] = []
        self._written = 0

    @classmethod
    def from_argv(cls, topic: str, argv: Sequence[str] | None, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                  description: str | None = None) -> "Run":
        """Parse ``argv`` with :func:`common_parser` plus ``add_args``' options and build the run."""
        p = common_parser(topic, description)
        if add_args is not None:
            add_args(p)
        args, unknown = p.parse_known_args(list(argv) if argv is not None else None)
        if unknown:  # run_all hands every topic the options meant for any of them
            print(f"kvstream.bench.{topic}: ignoring options it does not take: {unknown}", flush=True)
        return cls(topic, args)

    # -- recording -----------------------------------------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        """Whether the run measures a CUDA device."""
        return self.device.type == "cuda"

    def add(self, bench: str, provider: str, x: Any, metric: str, unit: str, stat: Stat | float) -> Stat:
        """Record one measurement row; returns it as a :class:`Stat`."""
        if not isinstance(stat, Stat):
            stat = Stat.exact(float(stat))
        row = {"bench": bench, "provider": provider, "x": x, "metric": metric, "unit": unit,
               "p50": stat.p50, "p20": stat.p20, "p80": stat.p80, **self.env}
        self.rows.append(row)
        self.write_csv()  # at once: a run cut short (a device time limit) keeps what it measured
        return stat

    def add_time_and_bandwidth(self, bench: str, provider: str, x: Any, ms: Stat, nbytes: int,
                               time_unit: str = "ms", metric: str = "time") -> Stat:
        """Record the time (``ms`` in milliseconds, shown in ``time_unit``, as ``metric``) and ``nbytes`` per
        second in GB/s (as ``bandwidth``).

        Returns the bandwidth in GB/s.
        """
        scale = {"ms": 1.0, "us": 1e3, "s": 1e-3}[time_unit]
        self.add(bench, provider, x, metric, time_unit, ms.scale(scale))
        return self.add(bench, provider, x, "bandwidth", "GB/s", ms.rate(nbytes / GB * 1e3))

    def summary(self, key: str, **kw: Any) -> dict:
        """:func:`record_summary` into this run's out dir with its environment and quick flag."""
        return record_summary(self.out_dir, key, env=self.env, quick=self.quick, **kw)

    def time(self, fn: Callable[[], Any], **kw: Any) -> Stat:
        """:func:`time_device` on this run's device (quick settings in ``--quick``)."""
        return time_device(fn, device=self.device, quick=self.quick, **kw)

    def time_host(self, fn: Callable[[], Any], reps: int, warmup: int = 1,
                  setup: Callable[[], Any] | None = None) -> Stat:
        """:func:`time_host` on this run's device; one repetition in ``--quick``."""
        return time_host(fn, device=self.device, reps=1 if self.quick else reps, warmup=warmup, setup=setup)

    # -- output --------------------------------------------------------------------------------------
    def write_csv(self) -> Path:
        """Append the rows recorded since the last call to ``<out>/<topic>.csv`` (header if new). Returns the path."""
        path = append_csv(self.out_dir / f"{self.topic}.csv", self.rows[self._written:])
        self._written = len(self.rows)
        return path

    def finish(self) -> int:
        """Write the CSV, print the table and where the results are. Returns 0 (the exit code)."""
        path = self.write_csv()
        print()
        print(f"### kvstream.bench.{self.topic} on {self.env['device']} ({self.env['date']}, {self.env['git_sha']})"
              + ("  [--quick: no timing claims]" if self.quick else ""))
        print(rows_table(self.rows))
        print(f"\nrows appended to {path}; summary in {self.out_dir / 'summary.json'}", flush=True)
        return 0

    def disk_dir(self) -> Path:
        """A fresh directory on the disk to measure (``--disk-dir``, else under the out dir); caller removes it."""
        base = Path(self.args.disk_dir) if getattr(self.args, "disk_dir", None) else self.out_dir
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".kvstream-disk-", dir=base))


def module_main(main: Callable[[Sequence[str] | None], int]) -> None:
    """``sys.exit(main(sys.argv[1:]))``: the ``if __name__ == "__main__"`` body of each topic."""
    sys.exit(main(sys.argv[1:]))
