"""The ``kvstream`` command: one subcommand per job, each a module's ``main(argv) -> int``.

    kvstream demo        generate, stream KV to a store, resume in a fresh process, report (make demo)
    kvstream chat-demo   multi-turn conversation with prefix reuse
    kvstream bench T     benchmark topic T (or ``all``), results under bench/results/
    kvstream disagg      prompt/token disaggregation: start workers, check outputs
    kvstream serve       one disaggregation worker (under torchrun)
    kvstream plan        DéjàVu's prompt/token planner
    kvstream pipeline    pipeline-parallel decoding (one process per stage), microbatch swapping
    kvstream failover    kill pipeline stages, recover from KV replicas, check every output
    kvstream --version   the installed version

User errors end in one line on stderr, ``kvstream: error: <what and the fix>``, and exit status 2: every
:class:`~kvstream.errors.KVStreamError` a subcommand raises (a bad option value, a missing checkpoint, no
GPU for ``--device cuda``) and every bad flag its ``argparse`` parser finds. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import Iterator

from . import __version__
from .errors import ConfigError, KVStreamError

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvstream.demos.generate", "generate, stream KV to a store, resume in a fresh process"),
    "chat-demo": ("kvstream.demos.chat", "multi-turn conversation with prefix reuse"),
    "bench": ("kvstream.bench.cli", "run a benchmark topic (or 'all'); --quick for a CPU smoke run"),
    "disagg": ("kvstream.serving.disagg", "prompt/token disaggregation: start workers and check outputs"),
    "serve": ("kvstream.serving.worker", "one disaggregation worker (prompt or token role)"),
    "plan": ("kvstream.serving.planner", "DéjàVu planner: split D machines into prompt and token workers"),
    "pipeline": ("kvstream.serving.pipeline.cli", "pipeline-parallel decoding with microbatch swapping; checks outputs"),
    "failover": ("kvstream.serving.failover.cli", "kill stages, recover from KV replicas, check every output"),
}


def _usage() -> str:
    lines = ["usage: kvstream <command> [options]   (kvstream <command> --help, kvstream --version)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _flag_error(parser: argparse.ArgumentParser, message: str) -> None:
    """``ArgumentParser.error`` for the subcommands: a ``ConfigError`` (one line) instead of usage and exit."""
    raise ConfigError(f"{parser.prog}: {message} (see {parser.prog} --help)")


@contextlib.contextmanager
def _one_line_flag_errors() -> Iterator[None]:
    """While a subcommand runs, its parsers' errors raise :class:`ConfigError` (``error`` is the method
    argparse documents for overriding); run as ``python -m <module>`` they keep argparse's own output."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _flag_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def _fail(message: str) -> int:
    """Print ``kvstream: error: <message>`` (on one line) to stderr; returns the exit status 2."""
    print(f"kvstream: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvstream`` console script. Returns the process exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"kvstream {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return _fail(f"unknown command {name!r}; commands: {', '.join(COMMANDS)} (see kvstream --help)")
    try:
        with _one_line_flag_errors():
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(rest) or 0)
    except KVStreamError as e:
        return _fail(str(e) or type(e).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
