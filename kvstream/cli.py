"""The ``kvstream`` command: one subcommand per job, each a module's ``main(argv) -> int``.

    kvstream demo        generate, stream KV to a store, resume in a fresh process, report (make demo)
    kvstream chat-demo   multi-turn conversation with prefix reuse
    kvstream bench T     benchmark topic T (or ``all``), results under bench/results/
    kvstream disagg      prompt/token disaggregation: start workers, check outputs
    kvstream serve       one disaggregation worker (under torchrun)
    kvstream plan        DéjàVu's prompt/token planner
    kvstream pipeline    pipeline-parallel decoding (one process per stage), microbatch swapping
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvstream.demos.generate", "generate, stream KV to a store, resume in a fresh process"),
    "chat-demo": ("kvstream.demos.chat", "multi-turn conversation with prefix reuse"),
    "bench": ("kvstream.benchmarks", "run a benchmark topic (or 'all'); --quick for a CPU smoke run"),
    "disagg": ("kvstream.serving.disagg", "prompt/token disaggregation: start workers and check outputs"),
    "serve": ("kvstream.serving.worker", "one disaggregation worker (prompt or token role)"),
    "plan": ("kvstream.serving.planner", "DéjàVu planner: split D machines into prompt and token workers"),
    "pipeline": ("kvstream.serving.pipeline.cli", "pipeline-parallel decoding with microbatch swapping; checks outputs"),
}


def _usage() -> str:
    lines = ["usage: kvstream <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvstream`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kvstream: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
