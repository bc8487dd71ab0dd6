"""What a pipeline run prints and draws: the load table, the per-stage table, the verdict line, the PNG."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20


def verdict(doc: dict) -> str:
    """The run's last line: how many requests' tokens equal single-process ``generate``'s."""
    if not doc["config"]["check"]:
        return f"{doc['completed']}/{doc['requests']} requests served; not checked against single-process generate"
    return f"{doc['identical']}/{doc['requests']} requests identical to single-process generate"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.3f}"


def stage_rows(doc: dict) -> list[list[str]]:
    """One row per stage: layers, peak KV, budget, swap bytes, compute, stall on swap-in, the ratio."""
    rows = []
    for st in doc["stages"]:
        compute, stall = st["compute_s"], st["stall_s"]
        share = f"{100 * stall / compute:.1f} %" if compute > 0 else "-"
        ratio = "-" if st["ratio_p50"] is None else f"{st['ratio_p50']:.3g} / {st['ratio_max']:.3g}"
        rows.append([f"{st['stage']}", f"{st['layers'][0]}-{st['layers'][1] - 1}",
                     f"{_mib(st['peak_kv_bytes'])} / {_mib(st['budget_bytes'])}",
                     f"{_mib(st['swap_in_bytes'])} / {_mib(st['swap_out_bytes'])}", f"{compute:.3f}",
                     f"{stall:.4f} ({share})", ratio])
    return rows


def print_report(doc: dict) -> None:
    """Print the load table (:func:`kvstream.serving.loadgen.report`) and the per-stage table."""
    from rich.console import Console
    from rich.table import Table

    from ..loadgen import report

    cfg = doc["config"]
    report(doc["summary"], title=f"kvstream pipeline: {cfg['stages']} stages x {cfg['microbatches']} microbatches of "
                                 f"{cfg['batch']}, {cfg['device']}, {cfg['model']}, swap {cfg['swap']}")
    table = Table(title="per stage: KV in MiB; ratio K/(B_pcie*t_step) p50 / max")
    for name in ("stage", "layers", "peak KV / budget", "swap in / out", "compute s", "swap-in stall s",
                 "ratio"):
        table.add_column(name, justify="right")
    for row in stage_rows(doc):
        table.add_row(*row)
    Console().print(table)
    for st in doc.get("prompt_stages", []):
        total = sum(p["prefill_s"] for p in st["prefills"])
        print(f"prompt stage {st['stage']} (layers {st['layers'][0]}-{st['layers'][1] - 1}): {len(st['prefills'])} "
              f"prefills, {total:.3f} s, KV streamed layer by layer to the token stages")


def plot(doc: dict, path: str | Path) -> Path:
    """A PNG of every decode step's stall on swap-in (ms) against its ratio ``K / (B_pcie * t_step)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for st in doc["stages"]:
        steps = [s for s in st["steps"] if s["kind"] == "decode" and s["compute_s"] > 0]
        ax.scatter([s["ratio"] for s in steps], [1e3 * s["stall_s"] for s in steps], s=10, label=f"stage {st['stage']}")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1, label="K = B_pcie * t_step")
    ax.set_xlabel("K / (B_pcie * t_step)")
    ax.set_ylabel("compute stall on swap-in per step (ms)")
    ax.set_title("swap-in stall against the PCIe model")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["verdict", "stage_rows", "print_report", "plot"]
