"""DéjàVu's planner: how many of D machines should run prefill (prompt) and how many decode (token).

Source: DéjàVu (Strati et al., ICML 2024, §4.1; msr-fiddle/dejavu ``scripts/planner.py``). A prompt
pipeline of ``Dp`` machines finishes a batch's prefill every ``m·Y / Dp`` seconds (``Y``: prefill time of
one batch on the whole model, ``m >= 1``: the slowdown from streaming the prompt's KV out layer by
layer); a token pipeline of ``Dt`` machines finishes a batch's ``N`` tokens every ``N·t / Dt`` seconds
(``t``: time of one decode step of a batch on the whole model). Neither side waits for the other when the
two rates match, ``Dp / (m·Y) = Dt / (N·t)``, which with ``Dp + Dt = D`` gives::

    Dt = ceil(D·N·t / (m·Y + N·t)),    Dp = D − Dt

Rounding up favours the token side, which holds each batch ``N`` times longer.

Memory bound (documented choice)
--------------------------------
A pipeline of ``D'`` machines keeps ``D'`` microbatches in flight (one per stage, as FasterTransformer
and DéjàVu schedule them), and each stage holds the KV of its ``L/D'`` layers for all of them: per
machine ``W/D' + B·S·k`` bytes, where ``W`` is the weight bytes, ``B`` the microbatch size, ``S`` the
tokens a sequence holds (the prompt ``P`` on the prompt side, ``P + N`` on the token side) and ``k`` the KV
bytes per token of all layers. Fitting in ``M`` bytes per machine needs::

    D' >= ceil(W / (M − B·S·k))          (and M > B·S·k)

The planner raises the formula's split to these minima (each side at least 1), and reports an infeasible
configuration with the numbers.

Float rounding: the ratio is rounded up after subtracting 1e-9, so that ``2.0000000000000004`` (from
``0.1 * 30``) counts as 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError

#: Tolerance of the ceiling against float rounding (see the module docstring).
CEIL_EPS = 1e-9
GiB = 1 << 30


def _ceil(x: float) -> int:
    return math.ceil(x - CEIL_EPS)


@dataclass(frozen=True)
class PlanInputs:
    """The measured inputs of the planner.

    Parameters
    ----------
    prompt_time_s : float
        ``Y``: prefill time of one batch on the whole model (seconds).
    token_time_s : float
        ``t``: one decode step of one batch on the whole model (seconds).
    tokens : int
        ``N``: tokens generated per request.
    machines : int
        ``D``: machines (GPUs or pipeline-parallel workers) to split, at least 2.
    overhead : float
        ``m``: prefill time with layer-by-layer KV streaming over prefill time without (>= 1 in practice).

    Raises
    ------
    ConfigError
        For a non-positive time, token count or overhead, or fewer than 2 machines.
    """

    prompt_time_s: float
    token_time_s: float
    tokens: int
    machines: int
    overhead: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prompt_time_s", "token_time_s", "overhead"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise ConfigError(f"PlanInputs.{name} must be a positive finite number, got {v!r}")
        if not isinstance(self.tokens, int) or self.tokens <= 0:
            raise ConfigError(f"PlanInputs.tokens must be a positive int, got {self.tokens!r}")
        if not isinstance(self.machines, int) or self.machines < 2:
            raise ConfigError(f"PlanInputs.machines must be an int >= 2 (one prompt and one token machine), "
                              f"got {self.machines!r}")


@dataclass(frozen=True)
class MemoryModel:
    """What one machine must hold (see the module docstring's memory bound).

    Parameters
    ----------
    machine_bytes : int
        ``M``: usable memory per machine in bytes.
    weight_bytes : int
        ``W``: bytes of the model's weights.
    kv_bytes_per_token : int
        ``k``: KV bytes per token of all layers (:meth:`kvstream.layout.KVLayout.bytes_per_token`).
    batch : int
        ``B``: sequences per microbatch.
    prompt_tokens : int
        ``P``: prompt length in tokens.
    """

    machine_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    batch: int
    prompt_tokens: int

    def __post_init__(self) -> None:
        for name in ("machine_bytes", "weight_bytes", "kv_bytes_per_token", "batch", "prompt_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"MemoryModel.{name} must be a positive int, got {v!r}")

    def min_machines(self, seq_tokens: int, side: str) -> int:
        """Fewest machines of a pipeline whose sequences hold ``seq_tokens`` tokens each.

        Raises
        ------
        ConfigError
            If one microbatch's KV alone does not fit a machine.
        """
        kv = self.batch * seq_tokens * self.kv_bytes_per_token
        room = self.machine_bytes - kv
        if room <= 0:
            raise ConfigError(f"{side} side: the KV of one microbatch ({self.batch} x {seq_tokens} tokens x "
                              f"{self.kv_bytes_per_token} B = {kv / GiB:.2f} GiB) does not fit a machine's "
                              f"{self.machine_bytes / GiB:.2f} GiB")
        return max(1, _ceil(self.weight_bytes / room))


@dataclass(frozen=True)
class Plan:
    """A prompt/token split and what it predicts.

    ``formula_token_machines`` is the formula's ``Dt`` before the bounds; ``*_min`` are the memory minima
    (1 without a memory model); rates are batches per second of each side (``Dp/(m·Y)``, ``Dt/(N·t)``) and
    ``throughput_batches_per_s`` their minimum.
    """

    prompt_machines: int
    token_machines: int
    formula_token_machines: int
    prompt_min: int
    token_min: int
    prompt_batches_per_s: float
    token_batches_per_s: float
    throughput_batches_per_s: float
    bound: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def token_machines(machines: int, tokens: int, token_time_s: float, overhead: float, prompt_time_s: float) -> int:
    """DéjàVu's formula, unbounded: ``ceil(D·N·t / (m·Y + N·t))``.

    Examples
    --------
    >>> token_machines(8, 100, 0.05, 1.0, 1.0)   # 8·5 / (1 + 5) = 6.67
    7
    """
    decode = tokens * token_time_s
    return _ceil(machines * decode / (overhead * prompt_time_s + decode))


def plan(inputs: PlanInputs, memory: MemoryModel | None = None) -> Plan:
    """Split ``inputs.machines`` into prompt and token machines (module docstring: formula and bounds).

    Raises
    ------
    ConfigError
        If the memory minima of both sides exceed the machines available, or a microbatch's KV does not fit.

    Examples
    --------
    >>> p = plan(PlanInputs(prompt_time_s=2.0, token_time_s=0.01, tokens=200, machines=4, overhead=1.5))
    >>> (p.prompt_machines, p.token_machines)
    (2, 2)
    """
    d = inputs.machines
    formula = token_machines(d, inputs.tokens, inputs.token_time_s, inputs.overhead, inputs.prompt_time_s)
    p_min = t_min = 1
    if memory is not None:
        p_min = memory.min_machines(memory.prompt_tokens, "prompt")
        t_min = memory.min_machines(memory.prompt_tokens + inputs.tokens, "token")
    if p_min + t_min > d:
        raise ConfigError(f"{d} machines cannot hold both sides: the prompt side needs >= {p_min} and the token "
                          f"side >= {t_min} machines for weights + KV")
    dt = min(max(formula, t_min), d - p_min)
    bound = "formula"
    if dt != formula:
        bound = "token memory" if dt == t_min and formula < t_min else (
            "prompt memory" if p_min > 1 else "at least one prompt machine")
    dp = d - dt
    prompt_rate = dp / (inputs.overhead * inputs.prompt_time_s)
    token_rate = dt / (inputs.tokens * inputs.token_time_s)
    return Plan(prompt_machines=dp, token_machines=dt, formula_token_machines=formula, prompt_min=p_min,
                token_min=t_min, prompt_batches_per_s=prompt_rate, token_batches_per_s=token_rate,
                throughput_batches_per_s=min(prompt_rate, token_rate), bound=bound)


@dataclass(frozen=True)
class SwapPlan:
    """The largest microbatch a pipeline holds with and without DéjàVu's swapping, and whether it hides.

    Without swapping every stage holds the KV of all ``D`` microbatches in flight for its ``L/D`` layers:
    ``B·S·k`` bytes per stage, so ``B_off = floor((M − W/D) / (S·k))``. With two slots per stage (DéjàVu
    §4.2) a stage holds ``2·B·S·k/D``: ``B_on = floor(D·(M − W/D) / (2·S·k))``, at most ``D/2`` times
    larger (no gain for ``D <= 2``). The prefetch hides when ``K <= B_pcie·t`` with ``K = B_on·S·k`` one
    microbatch's KV and ``t`` its decode step on the whole model (given, or the HBM roofline
    ``(W + K)/B_hbm``); ``ratio = K/(B_pcie·t)``. Sizes in bytes, times in seconds, rates in bytes/s.
    """

    batch_without_swap: int
    batch_with_swap: int
    microbatch_kv_bytes: int
    token_time_s: float
    ratio: float
    hides: bool

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def swap_plan(*, machine_bytes: int, weight_bytes: int, kv_bytes_per_token: int, stages: int, seq_tokens: int,
              token_time_s: float | None = None, pcie_bytes_per_s: float = 55e9, hbm_bytes_per_s: float = 4e12) -> SwapPlan:
    """:class:`SwapPlan` for ``stages`` machines of ``machine_bytes`` each (see its docstring for the formulas).

    Raises
    ------
    ConfigError
        If a stage's share of the weights leaves no room, or a size is not positive.

    Examples
    --------
    >>> p = swap_plan(machine_bytes=40 * GiB, weight_bytes=16 * GiB, kv_bytes_per_token=128 << 10, stages=4,
    ...               seq_tokens=2048)
    >>> (p.batch_without_swap, p.batch_with_swap)
    (144, 288)
    """
    if min(machine_bytes, weight_bytes, kv_bytes_per_token, stages, seq_tokens) <= 0:
        raise ConfigError("swap_plan: every size must be positive")
    room = machine_bytes - weight_bytes / stages
    if room <= 0:
        raise ConfigError(f"{stages} machines of {machine_bytes / GiB:.2f} GiB cannot hold the weights "
                          f"({weight_bytes / GiB:.2f} GiB) with room for KV")
    seq_bytes = seq_tokens * kv_bytes_per_token
    off, on = int(room // seq_bytes), int(stages * room // (2 * seq_bytes))
    kv = on * seq_bytes
    t = token_time_s if token_time_s else (weight_bytes + kv) / hbm_bytes_per_s
    ratio = kv / (pcie_bytes_per_s * t)
    return SwapPlan(batch_without_swap=off, batch_with_swap=on, microbatch_kv_bytes=kv, token_time_s=t, ratio=ratio,
                    hides=ratio <= 1.0)


def model_bytes(name: str, num_layers: int | None = None, dtype_bytes: int = 2) -> tuple[int, int]:
    """``(weight bytes, KV bytes per token)`` of an embedded model: ``llama3-8b`` or ``tiny``.

    Parameters are counted on the ``meta`` device (no memory); ``dtype_bytes`` per weight and KV element.

    Raises
    ------
    ConfigError
        For an unknown name.
    """
    import torch
    import transformers as tf

    from ..layout import KVLayout
    from ..models import llama3_8b_config, tiny_config

    if name == "llama3-8b":
        config = llama3_8b_config(num_layers or 32)
    elif name == "tiny":
        config = tiny_config(num_layers=num_layers or 4)
    else:
        raise ConfigError(f"Unknown model {name!r}; known: llama3-8b, tiny (or give --weight-gib and --kv-bytes-per-token)")
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layout = KVLayout.from_config(config, dtype=torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    kv = layout.num_layers * 2 * layout.kv_heads * layout.head_dim * dtype_bytes
    return params * dtype_bytes, kv


#: Flag name -> PlanInputs field, for flags and results files alike.
_INPUT_FIELDS = {"prompt_time_s": "prompt_time_s", "token_time_s": "token_time_s", "tokens": "tokens",
                 "machines": "machines", "overhead": "overhead"}


def load_results(path: str | Path) -> dict[str, Any]:
    """Planner inputs from a benchmark results file (``bench/disagg.py`` writes one).

    The file is a JSON object holding the inputs directly or under ``"planner_inputs"``: ``prompt_time_s``,
    ``token_time_s``, ``tokens``, ``overhead`` and optionally ``machines``, ``batch``, ``prompt_tokens``.

    Raises
    ------
    ConfigError
        If the file is missing or is not such a JSON object.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read planner inputs from {path}: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("planner_inputs"), dict):
        doc = doc["planner_inputs"]
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object with planner inputs, got {type(doc).__name__}")
    return doc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstream plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Dt = ceil(D*N*t / (m*Y + N*t)), Dp = D - Dt; each side >= its memory minimum.")
    p.add_argument("--results", help="a benchmark results JSON with the measured inputs (flags override it)")
    p.add_argument("--prompt-time", dest="prompt_time_s", type=float, help="Y: prefill time of a batch (s)")
    p.add_argument("--token-time", dest="token_time_s", type=float, help="t: one decode step of a batch (s)")
    p.add_argument("--tokens", type=int, help="N: tokens generated per request")
    p.add_argument("--machines", type=int, help="D: machines to split")
    p.add_argument("--overhead", type=float, help="m: prefill slowdown from streaming KV out (default 1.0)")
    mem = p.add_argument_group("memory bound (all optional; give --machine-gib to enable it)")
    mem.add_argument("--machine-gib", type=float, help="M: usable memory per machine (GiB)")
    mem.add_argument("--model", default="llama3-8b", help="embedded model for W and k: llama3-8b or tiny")
    mem.add_argument("--layers", type=int, help="decoder layers of the embedded model")
    mem.add_argument("--weight-gib", type=float, help="W: weight size (GiB), instead of the model's")
    mem.add_argument("--kv-bytes-per-token", type=int, help="k: KV bytes per token of all layers")
    mem.add_argument("--batch", type=int, help="B: sequences per microbatch (default 1)")
    mem.add_argument("--prompt-tokens", type=int, help="P: prompt length (default 1024)")
    sw = p.add_argument_group("swapping (DéjàVu §4.2; with --swap: --machine-gib, --machines as D, --seq-tokens)")
    sw.add_argument("--swap", action="store_true", help="plan microbatch swapping instead of the prompt/token split")
    sw.add_argument("--seq-tokens", type=int, help="S: tokens a sequence holds at its longest (prompt + output)")
    sw.add_argument("--pcie-gbps", type=float, default=55.0, help="B_pcie, GB/s per direction (default 55: H200)")
    sw.add_argument("--hbm-gbps", type=float, default=4000.0, help="B_hbm for the roofline step time (default 4000)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON only")
    return p


def _swap_main(args: argparse.Namespace) -> int:
    if args.machine_gib is None or args.machines is None or args.seq_tokens is None:
        raise ConfigError("--swap needs --machine-gib, --machines (the pipeline depth D) and --seq-tokens")
    weight, kv = (None, None) if args.weight_gib and args.kv_bytes_per_token else model_bytes(args.model, args.layers)
    p = swap_plan(machine_bytes=int(args.machine_gib * GiB), stages=args.machines, seq_tokens=args.seq_tokens,
                  weight_bytes=int(args.weight_gib * GiB) if args.weight_gib else weight,
                  kv_bytes_per_token=args.kv_bytes_per_token or kv, token_time_s=args.token_time_s,
                  pcie_bytes_per_s=args.pcie_gbps * 1e9, hbm_bytes_per_s=args.hbm_gbps * 1e9)
    if args.json:
        print(json.dumps(p.as_dict(), indent=2))
        return 0
    _rows_table("DéjàVu swapping: largest microbatch per pipeline", [
        ("pipeline depth D", f"{args.machines}"), ("largest microbatch without swap", f"{p.batch_without_swap}"),
        ("largest microbatch with swap (2 slots)", f"{p.batch_with_swap}"),
        ("microbatch KV K", f"{p.microbatch_kv_bytes / GiB:.3f} GiB"),
        ("decode step t" + ("" if args.token_time_s else " (HBM roofline)"), f"{p.token_time_s:.4g} s"),
        ("K / (B_pcie * t)", f"{p.ratio:.3g}"), ("swap-in hides", "yes" if p.hides else "no")])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstream plan``: print the prompt/token split. Returns 0, or 2 for bad or infeasible inputs."""
    args = _parser().parse_args(argv)
    if args.swap:
        try:
            return _swap_main(args)
        except ConfigError as e:
            print(f"kvstream plan: {e}", file=sys.stderr)
            return 2
    try:
        values: dict[str, Any] = load_results(args.results) if args.results else {}
        for name in _INPUT_FIELDS:
            if getattr(args, name) is not None:
                values[name] = getattr(args, name)
        values.setdefault("overhead", 1.0)
        missing = [n for n in ("prompt_time_s", "token_time_s", "tokens", "machines") if n not in values]
        if missing:
            raise ConfigError(f"missing planner inputs: {', '.join(missing)} (flags or --results)")
        inputs = PlanInputs(prompt_time_s=float(values["prompt_time_s"]), token_time_s=float(values["token_time_s"]),
                            tokens=int(values["tokens"]), machines=int(values["machines"]),
                            overhead=float(values["overhead"]))
        memory = None
        if args.machine_gib is not None:
            weight, kv = (None, None)
            if args.weight_gib is None or args.kv_bytes_per_token is None:
                weight, kv = model_bytes(args.model, args.layers)
            memory = MemoryModel(machine_bytes=int(args.machine_gib * GiB),
                                 weight_bytes=int(args.weight_gib * GiB) if args.weight_gib is not None else weight,
                                 kv_bytes_per_token=args.kv_bytes_per_token or kv,
                                 batch=int(args.batch or values.get("batch", 1)),
                                 prompt_tokens=int(args.prompt_tokens or values.get("prompt_tokens", 1024)))
        result = plan(inputs, memory)
    except ConfigError as e:
        print(f"kvstream plan: {e}", file=sys.stderr)
        return 2
    doc = {"inputs": asdict(inputs), "memory": None if memory is None else asdict(memory), "plan": result.as_dict()}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print_table(inputs, memory, result)
    return 0


def _rows_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _print_table(inputs: PlanInputs, memory: MemoryModel | None, result: Plan) -> None:
    rows = [
        ("machines D", f"{inputs.machines}"),
        ("prompt time Y", f"{inputs.prompt_time_s:.4g} s"),
        ("token time t", f"{inputs.token_time_s:.4g} s"),
        ("tokens N", f"{inputs.tokens}"),
        ("streaming overhead m", f"{inputs.overhead:.3f}"),
        ("formula Dt = ceil(D·N·t/(m·Y+N·t))", f"{result.formula_token_machines}"),
        ("memory minimum prompt / token", f"{result.prompt_min} / {result.token_min}"
                                           + ("" if memory else " (no memory model)")),
        ("prompt machines Dp", f"{result.prompt_machines}"),
        ("token machines Dt", f"{result.token_machines}"),
        ("bound by", result.bound),
        ("prompt side rate", f"{result.prompt_batches_per_s:.4g} batches/s"),
        ("token side rate", f"{result.token_batches_per_s:.4g} batches/s"),
        ("predicted throughput", f"{result.throughput_batches_per_s:.4g} batches/s"),
    ]
    _rows_table("DéjàVu planner: prompt / token split", rows)


__all__ = ["PlanInputs", "MemoryModel", "Plan", "plan", "SwapPlan", "swap_plan", "token_machines", "model_bytes", "load_results", "main"]
