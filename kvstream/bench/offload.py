"""Offload within a GPU budget: HF ``generate`` time against the fraction of layers whose KV stays resident,
with HF's offloaded cache and the PCIe floor in the same run.

The model is the Llama-3-8B shape with ``--offload-layers`` decoder layers (default 8, not ``--layers``: the
topic's GPU run stays under about 2 minutes; every layer has Llama-3-8B's shape), bf16, seeded random
weights. Batch ``--batch`` 16, ``--prompt`` 2000 real-text tokens, ``--new-tokens`` 64 greedy tokens.
Providers, ``--reps`` (>= 5) rounds in alternating order after a warm-up:

* ``dynamic`` — transformers' ``DynamicCache`` (the reference: every layer resident);
* ``kvstream-<f>`` — ``StreamingCache(offload=True, gpu_budget_bytes=N)`` for resident fractions ``f`` of
  ``--fractions`` (0, 25, 50, 75, 100 %): ``N`` holds ``round(f * L)`` layers of the final sequence's KV,
  so the other layers are offloaded (spread over the depth);
* ``hf-offload`` — transformers' ``DynamicCache(offloading=True)`` (one layer resident, each copied both ways).

Bytes: one layer's KV at the end is ``B * H * (P + N - 1) * (Dk + Dv) * 2`` = 135 MB (B16, 8 heads of 128,
P2000, N64), so each decode step brings ``m * 135 MB`` back over PCIe for ``m`` offloaded layers.
Prediction, the PCIe floor of fraction ``f``: the dynamic prefill, then per decode step ``i`` the larger of
the dynamic step and ``m_i * (bytes of one layer's history) / B_h2d`` (``m_i``: layers the budget
offloads at that length; ``B_h2d``: pinned host-to-device memcpy measured in the same run). Summary key
``offload_budget``: the time at 50 % resident over dynamic, against that prediction over dynamic
(target: within 10 %, both ways).

Rows (``<out>/offload.csv``): ``offload.e2e`` (x = resident %, kvstream's total_time s and the
``pcie-floor`` prediction), ``offload.ref`` (``dynamic`` and ``hf-offload`` total_time s), ``offload.ceiling``
(the H2D memcpy). Plot: ``offload_budget.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from . import ceilings, harness, inputs, timing
from .generate import GenResult, generate_once
from .harness import Run
from .plot import lines, save, series, title
from .records import GB, MiB
from .timing import Stat


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    harness.workload_args(p, batch=16, prompt=2000, new_tokens=64, reps=5,
                          helps={"new_tokens": "generated tokens", "reps": "alternating repetitions, at least 5"})
    p.add_argument("--offload-layers", type=int, default=8, help="decoder layers of the Llama-3-8B shape (default 8)")
    p.add_argument("--fractions", default="0,25,50,75,100", help="resident fractions in %% (default 0,25,50,75,100)")


def _geometry(run: Run) -> dict:
    a = run.args
    fractions = [int(f) for f in a.fractions.split(",") if f.strip()]
    if run.quick:
        return dict(batch=2, prompt=24, new=4, reps=1, layers=4, fractions=fractions)
    return dict(batch=a.batch, prompt=a.prompt, new=a.new_tokens, reps=max(5, a.reps), layers=a.offload_layers,
                fractions=fractions)


def _layer_bytes(config, dtype: torch.dtype, batch: int, tokens: int) -> int:
    from kvstream.layout import KVLayout

    layout = KVLayout.from_config(config, dtype=dtype)
    return layout.bytes_per_token(batch) // layout.num_layers * tokens


def predict(g: dict, layer_bytes_at, budget: int, prefill_s: float, step_s: float, h2d_Bps: float) -> float:
    """The PCIe floor of one budget (seconds): the prefill, then per decode step the larger of the dynamic
    step and the copy back of every offloaded layer's history (the budget's plan at that length: as
    :class:`~kvstream.integrations.hf.offload.Offloader` makes it, never fewer layers than before)."""
    total, offloaded = prefill_s, 0
    for i in range(1, g["new"]):
        history, after = layer_bytes_at(g["prompt"] + i - 1), layer_bytes_at(g["prompt"] + i)
        offloaded = max(offloaded, g["layers"] - min(g["layers"], budget // after))
        total += max(step_s, offloaded * history / h2d_Bps)
    return total


def main(argv: Sequence[str] | None = None) -> int:
    """Run the offload topic; returns the exit code."""
    from transformers import DynamicCache

    from kvstream.integrations.hf import StreamingCache
    from kvstream.models import batch_of_prompts

    run = Run.from_argv("offload", argv, add_args, __doc__)
    g = _geometry(run)
    h2d = ceilings.ceiling_memcpy(run, 64 * MiB if not run.quick else 1 * MiB, 16 if not run.quick else 2,
                                  direction="h2d", bench="offload.ceiling",
                                  x="64MiBx16" if not run.quick else "1MiBx2").p50 * GB
    model = inputs.shared_model(run, layers=g["layers"])
    cfg, dtype = model.config, next(model.parameters()).dtype
    ids = batch_of_prompts(g["batch"], g["prompt"], device=run.device)
    final = _layer_bytes(cfg, dtype, g["batch"], g["prompt"] + g["new"] - 1)
    budgets = {f: round(f / 100 * g["layers"]) * final for f in g["fractions"]}
    makers = {"dynamic": lambda: DynamicCache(config=cfg), "hf-offload": lambda: DynamicCache(config=cfg, offloading=True)}
    for f, budget in budgets.items():
        makers[f"kvstream-{f}"] = lambda budget=budget: StreamingCache(config=cfg, offload=True, gpu_budget_bytes=budget)
    x = f"B{g['batch']}/P{g['prompt']}/N{g['new']}/L{g['layers']}"
    timing.progress(f"offload: {x}, one layer's KV {final / GB:.3f} GB at the end, budgets for {g['fractions']} %")
    results: dict[str, list[GenResult]] = {p: [] for p in makers}
    errors: dict[str, str] = {}
    for p, make in makers.items():  # warm-up: the dynamic one at full length, the PCIe-bound ones short
        try:
            generate_once(model, ids, make, g["new"] if p == "dynamic" else 2, run.device)
        except Exception as e:  # noqa: BLE001 - a provider that cannot run here is reported, not fatal
            if p == "dynamic":
                raise
            timing.progress(f"offload: {p} cannot run: {type(e).__name__}: {e}")
            errors[p] = f"{type(e).__name__}: {e}"
            results.pop(p)
    for rep, p in timing.alternating(list(results), g["reps"]):
        r = generate_once(model, ids, makers[p], g["new"], run.device)
        results[p].append(r)
        timing.progress(f"offload: {p} rep {rep + 1}: {r.total_s:.3f} s (KV resident {r.kv_resident_bytes / GB:.2f} GB)")
    _summarize(run, g, x, results, errors, budgets, h2d, lambda t: _layer_bytes(cfg, dtype, g["batch"], t))
    return run.finish()


def _summarize(run: Run, g: dict, x: str, results: dict, errors: dict, budgets: dict, h2d: float, layer_bytes_at) -> None:
    dyn = results["dynamic"]
    seconds = {p: [r.total_s for r in rs] for p, rs in results.items()}
    t_dyn = Stat.of(seconds["dynamic"]).p50
    prefill, step = Stat.of([r.prefill_s for r in dyn]).p50, Stat.of([r.per_token_s for r in dyn]).p50
    ref_tokens = dyn[0].tokens
    run.add("offload.ref", "dynamic", x, "total_time", "s", Stat.of(seconds["dynamic"]))
    if "hf-offload" in results:
        run.add("offload.ref", "hf-offload", x, "total_time", "s", Stat.of(seconds["hf-offload"]))
    per_fraction = {}
    for f, budget in budgets.items():
        p = f"kvstream-{f}"
        pred = predict(g, layer_bytes_at, budget, prefill, step, h2d)
        run.add("offload.e2e", "pcie-floor", f, "total_time", "s", pred)
        if p not in results:
            per_fraction[f] = {"error": errors.get(p), "predicted_s": pred}
            continue
        t = Stat.of(seconds[p])
        run.add("offload.e2e", "kvstream", f, "total_time", "s", t)
        per_fraction[f] = {"budget_GB": budget / GB, "predicted_s": pred, "over_dynamic": t.p50 / t_dyn,
                           "predicted_over_dynamic": pred / t_dyn, "over_prediction": t.p50 / pred,
                           "spread": timing.spread(seconds[p]), "comparison": timing.compare(seconds[p], seconds["dynamic"]),
                           "kv_resident_GB": max(r.kv_resident_bytes for r in results[p]) / GB,
                           "tokens_identical": all(torch.equal(r.tokens, ref_tokens) for r in results[p])}
    detail = {"geometry": x, "h2d_GBps": h2d / GB, "dynamic": timing.spread(seconds["dynamic"]),
              "dynamic_prefill_s": prefill, "dynamic_step_s": step, "fractions": per_fraction,
              "dynamic_runs_identical": all(torch.equal(r.tokens, ref_tokens) for r in dyn),
              "hf_offload": (dict(timing.spread(seconds["hf-offload"]), over_dynamic=Stat.of(seconds["hf-offload"]).p50 / t_dyn)
                             if "hf-offload" in results else {"error": errors.get("hf-offload")}),
              "alternating_reps": g["reps"],
              "model": f"Llama-3-8B shape with {g['layers']} decoder layers (the topic's --offload-layers)"}
    half = per_fraction.get(50, {})
    value, ceiling = half.get("over_dynamic"), half.get("predicted_over_dynamic")
    ratio = value / ceiling if value is not None else None
    run.summary("offload_budget", value=value, unit="x", ceiling=ceiling,
                ceiling_of="the PCIe floor's prediction at 50 % resident, over DynamicCache (same run)",
                target="<= 1.10", target_of="ratio", ratio=ratio,
                conditions={"ratio>=0.90": ratio is not None and ratio >= 0.90},
                noisy=bool(half.get("comparison", {}).get("noisy")) and not run.quick,
                provider="StreamingCache(offload=True, gpu_budget_bytes=50 % of the layers)", detail=detail)


def plot(data: dict, plt, out: Path) -> list[Path]:
    """offload_budget.png: total time against the resident fraction, kvstream and the PCIe floor, with
    DynamicCache and HF's offloaded cache as lines."""
    rows = data.get("offload.e2e")
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines(ax, series(rows, "total_time"), dashed=("pcie-floor",))
    styles = {"dynamic": dict(color="green", linestyle="-"), "hf-offload": dict(color="red", linestyle=":")}
    for r in data.get("offload.ref", []):
        ax.axhline(float(r["p50"]), label=f"{r['provider']} ({float(r['p50']):.3g} s)", **styles.get(r["provider"], {}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layers whose KV stays on the GPU (%)")
    ax.set_ylabel("generate total time (s)")
    ax.legend(fontsize=8)
    title(fig, rows, f"Offload within a GPU budget, {data.get('offload.ref', [{'x': ''}])[0]['x']}")
    return [save(fig, plt, out / "offload_budget.png")]


if __name__ == "__main__":
    harness.module_main(main)
