"""A load generator for serving experiments: Poisson arrivals, prompt and output lengths, and the metrics.

As in DéjàVu's evaluation (and Orca's and vLLM's before it): requests arrive as a Poisson process at a
given rate (exponential inter-arrival times); the report gives **throughput** (requests and generated
tokens per second over the run) and **normalized latency**, a request's end-to-end latency divided by
the tokens it generated (seconds per token), averaged over requests.

Prompts are the real text shipped with kvstream (:func:`kvstream.models.prompts`) turned into byte-level
ids of the chosen length, so no tokenizer or network is needed and every process that builds the same
workload (same arguments and seed) gets the same requests.

Lengths
-------
* prompt lengths: one fixed length, or a file of lengths (one integer per line, ``#`` comments allowed,
  or a JSON list), cycled over the requests;
* output lengths: ``fixed:N``, ``uniform:A:B`` (integers, inclusive), or ``exp:MEAN`` (exponential,
  rounded, at least ``MIN_OUTPUT_TOKENS``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError

#: Shortest output a request may ask for: one token from the prompt worker plus one decode step.
MIN_OUTPUT_TOKENS = 2


@dataclass(frozen=True)
class Request:
    """One request: its id, arrival time (seconds after the start), prompt ids and output length."""

    id: int
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Completion:
    """What happened to one request (times in seconds after the start of the run)."""

    id: int
    arrival_s: float
    start_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def latency_s(self) -> float:
        """End-to-end latency: finish minus arrival."""
        return self.finish_s - self.arrival_s

    @property
    def normalized_latency_s(self) -> float:
        """Latency per generated token (DéjàVu's normalized latency), seconds per token."""
        return self.latency_s / self.output_tokens

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def add_load_args(p: argparse.ArgumentParser, *, requests: int, prompt_default: str, output_default: str) -> None:
    """The load generator's options, for a launcher's parser: ``--requests`` (default ``requests``), ``--rate``,
    ``--prompt-tokens``, ``--prompt-lengths``, ``--output-tokens``, ``--load-seed``.

    ``--prompt-tokens`` and ``--output-tokens`` default to ``None`` (the launcher resolves them by device);
    ``prompt_default`` and ``output_default`` say in their help what that resolves to (``"64 cpu, 1024 cuda"``).
    """
    p.add_argument("--requests", type=int, default=requests, help=f"number of requests R (default {requests})")
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrival rate, requests/s (default: all at once)")
    p.add_argument("--prompt-tokens", type=int, default=None, help=f"fixed prompt length (default {prompt_default})")
    p.add_argument("--prompt-lengths", default=None, help="file of prompt lengths (one per line or a JSON list)")
    p.add_argument("--output-tokens", default=None,
                   help=f"output lengths: fixed:N, uniform:A:B or exp:MEAN (default {output_default})")
    p.add_argument("--load-seed", type=int, default=0, help="seed of arrivals and output lengths")


def poisson_arrivals(rate_per_s: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds, first at 0) of ``n`` requests of a Poisson process of ``rate_per_s``.

    ``rate_per_s = inf`` makes every request arrive at once (a closed batch).

    Raises
    ------
    ConfigError
        For a non-positive rate or count.
    """
    if not rate_per_s > 0:
        raise ConfigError(f"arrival rate must be > 0 requests/s, got {rate_per_s}")
    if n <= 0:
        raise ConfigError(f"number of requests must be > 0, got {n}")
    if math.isinf(rate_per_s):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, [0.0]
    for _ in range(n - 1):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def output_lengths(spec: str, n: int, seed: int = 0) -> list[int]:
    """``n`` output lengths from ``spec``: ``fixed:N``, ``uniform:A:B`` or ``exp:MEAN`` (see the module docstring).

    Raises
    ------
    ConfigError
        For a malformed spec or lengths below :data:`MIN_OUTPUT_TOKENS`.
    """
    rng = random.Random(seed + 1)
    kind, _, rest = str(spec).partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
        if kind == "fixed" and len(args) == 1:
            out = [int(args[0])] * n
        elif kind == "uniform" and len(args) == 2 and args[0] <= args[1]:
            out = [rng.randint(int(args[0]), int(args[1])) for _ in range(n)]
        elif kind == "exp" and len(args) == 1 and args[0] > 0:
            out = [max(MIN_OUTPUT_TOKENS, round(rng.expovariate(1.0 / args[0]))) for _ in range(n)]
        else:
            raise ValueError(spec)
    except ValueError:
        raise ConfigError(f"Bad output length spec {spec!r}: use fixed:N, uniform:A:B or exp:MEAN") from None
    if min(out) < MIN_OUTPUT_TOKENS:
        raise ConfigError(f"output lengths must be >= {MIN_OUTPUT_TOKENS} tokens, {spec!r} gives {min(out)}")
    return out


def prompt_lengths(fixed: int | None = None, path: str | Path | None = None) -> list[int]:
    """Prompt lengths: ``[fixed]`` or those listed in ``path`` (cycled by :func:`make_requests`).

    Raises
    ------
    ConfigError
        If neither or both are given, the file is unreadable or a length is not a positive int.
    """
    if (fixed is None) == (path is None):
        raise ConfigError("give either a fixed prompt length or a file of prompt lengths")
    if fixed is not None:
        values = [fixed]
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"Cannot read prompt lengths from {path}: {e}") from None
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else [
                int(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()]
        except ValueError as e:
            raise ConfigError(f"{path}: prompt lengths must be integers, one per line or a JSON list: {e}") from None
    if not values or any(not isinstance(v, int) or v <= 0 for v in values):
        raise ConfigError(f"prompt lengths must be positive ints, got {values[:10]!r}")
    return values


def make_requests(n: int, *, rate_per_s: float, prompt_lens: Sequence[int], output_spec: str,
                  seed: int = 0) -> list[Request]:
    """The workload: ``n`` requests with Poisson arrivals, prompt ids of the given lengths and output lengths.

    Request ``i`` gets shipped prompt ``i mod len(prompts)`` as byte-level ids, cut or repeated to
    ``prompt_lens[i mod len(prompt_lens)]`` tokens. Deterministic in its arguments.
    """
    from ..models import encode_text, prompts

    texts = prompts()
    arrivals = poisson_arrivals(rate_per_s, n, seed)
    outs = output_lengths(output_spec, n, seed)
    return [Request(id=i, arrival_s=arrivals[i],
                    prompt_ids=tuple(encode_text(texts[i % len(texts)], prompt_lens[i % len(prompt_lens)])),
                    max_new_tokens=outs[i]) for i in range(n)]


def microbatches(requests: Sequence[Request], size: int) -> list[list[Request]]:
    """Consecutive groups of ``size`` requests in arrival order; a group is ready when its last one arrived.

    Raises
    ------
    ConfigError
        For a size below 1.
    """
    if size < 1:
        raise ConfigError(f"microbatch size must be >= 1, got {size}")
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(completions: Iterable[Completion]) -> dict:
    """Throughput and latency of a run.

    Returns
    -------
    dict
        ``requests``, ``makespan_s`` (first arrival to last finish), ``throughput_req_per_s``,
        ``throughput_tokens_per_s`` (generated tokens), ``normalized_latency_s_per_token`` (mean, p50, p90),
        ``latency_s`` (mean, p50, p90), ``ttft_s`` (mean time to first token).

    Raises
    ------
    ConfigError
        If there are no completions.
    """
    done = list(completions)
    if not done:
        raise ConfigError("no completed requests to summarize")
    start = min(c.arrival_s for c in done)
    span = max(c.finish_s for c in done) - start
    norm = [c.normalized_latency_s for c in done]
    lat = [c.latency_s for c in done]
    tokens = sum(c.output_tokens for c in done)
    return {
        "requests": len(done),
        "output_tokens": tokens,
        "makespan_s": span,
        "throughput_req_per_s": len(done) / span if span > 0 else float("inf"),
        "throughput_tokens_per_s": tokens / span if span > 0 else float("inf"),
        "normalized_latency_s_per_token": {"mean": sum(norm) / len(norm), "p50": _quantile(norm, 0.5),
                                           "p90": _quantile(norm, 0.9)},
        "latency_s": {"mean": sum(lat) / len(lat), "p50": _quantile(lat, 0.5), "p90": _quantile(lat, 0.9)},
        "ttft_s": sum(c.first_token_s - c.arrival_s for c in done) / len(done),
    }


def report(summary: dict, title: str = "load") -> None:
    """Print a summary (from :func:`summarize`) as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    nl, lat = summary["normalized_latency_s_per_token"], summary["latency_s"]
    for k, v in [("requests", f"{summary['requests']}"), ("generated tokens", f"{summary['output_tokens']}"),
                 ("makespan", f"{summary['makespan_s']:.3f} s"),
                 ("throughput", f"{summary['throughput_req_per_s']:.3f} req/s, "
                                f"{summary['throughput_tokens_per_s']:.1f} tokens/s"),
                 ("normalized latency (mean / p50 / p90)", f"{nl['mean']:.4f} / {nl['p50']:.4f} / {nl['p90']:.4f} s/token"),
                 ("latency (mean / p50 / p90)", f"{lat['mean']:.3f} / {lat['p50']:.3f} / {lat['p90']:.3f} s"),
                 ("time to first token (mean)", f"{summary['ttft_s']:.3f} s")]:
        table.add_row(k, v)
    Console().print(table)


__all__ = ["Request", "Completion", "poisson_arrivals", "output_lengths", "prompt_lengths", "make_requests",
           "microbatches", "summarize", "report", "MIN_OUTPUT_TOKENS"]
