"""Turn the suite's CSVs into PNGs (matplotlib, Agg backend: no display needed).

    python -m kvstream.bench.plot [--out bench/results] [--png-dir DIR]

Each CSV holds every run appended; a plot uses the latest run of each bench (the rows with the newest
``date``). Pictures, when their CSV is there:

* ``kernels_bandwidth.png`` — pack and unpack GB/s (read + written) vs tokens, kvstream and the torch
  reference, with the device-to-device copy ceiling of the same run;
* ``kernels_decode_step.png`` — the decode step per provider and batch (µs, log), with the 15 µs target;
* ``transfers.png`` — D2H and H2D GB/s vs chunk size: memcpy ceiling, HostTransport, KVStreamer;
* ``disk.png`` — write and read GB/s per provider, raw O_DIRECT first;
* ``generate_overhead.png`` — end-to-end time per cache (ratio to DynamicCache on each bar) and KV resident;
* ``fig2_prompt_vs_token.png`` — the paper's Fig. 2: prompt time and per-token time vs prompt length;
* ``fig25_end_to_end.png`` — the paper's Fig. 25: no streaming vs streaming to host vs to disk;
* ``levels.png`` — the paper's Fig. 7: levels 0-3, decode step and prefill landed time, end to end.

Another topic (``kvstream/bench/<name>.py``) draws its own CSV by defining ``plot(data, plt, out) -> list[Path]``,
where ``data`` is :func:`read_latest` of its CSV; :func:`series`, :func:`lines`, :func:`bars`, :func:`title` and
:func:`save` help.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from . import harness, records

Series = dict[str, list[tuple[str, float, float, float]]]  # provider -> [(x, p50, p20, p80)]


def read_latest(path: Path) -> dict[str, list[dict]]:
    """Rows of ``path`` by bench, keeping for each bench only its newest run (largest ``date``)."""
    by_bench: dict[str, list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_bench[row["bench"]].append(row)
    latest = {}
    for bench, rows in by_bench.items():
        newest = max(r["date"] for r in rows)
        latest[bench] = [r for r in rows if r["date"] == newest]
    return latest


def series(rows: list[dict], metric: str) -> Series:
    """``metric``'s rows as provider -> points, in file order."""
    out: Series = defaultdict(list)
    for r in rows:
        if r["metric"] == metric:
            out[r["provider"]].append((r["x"], float(r["p50"]), float(r["p20"]), float(r["p80"])))
    return dict(out)


def _unit(rows: list[dict], metric: str) -> str:
    return next((r["unit"] for r in rows if r["metric"] == metric), "")


def _num(x: str) -> float:
    return float(x)


def lines(ax, s: Series, *, logx: bool = False, dashed: Sequence[str] = ()) -> None:
    """One line per provider with p20-p80 error bars; providers in ``dashed`` drawn as ceilings."""
    for provider, pts in s.items():
        pts = sorted(pts, key=lambda p: _num(p[0]))
        xs = [_num(p[0]) for p in pts]
        ys = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        style = dict(linestyle="--", color="black") if provider in dashed else dict(marker="o")
        ax.errorbar(xs, ys, yerr=err, label=provider, capsize=3, **style)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def bars(ax, s: Series, *, logy: bool = False, annotate: dict[str, list[str]] | None = None) -> None:
    """Grouped bars: one group per x, one bar per provider, p20-p80 error bars; ``annotate`` labels each bar."""
    xs: list[str] = []
    for pts in s.values():
        for p in pts:
            if p[0] not in xs:
                xs.append(p[0])
    n = max(1, len(s))
    width = 0.8 / n
    for i, (provider, pts) in enumerate(s.items()):
        at = {p[0]: p for p in pts}
        pos = [j + (i - (n - 1) / 2) * width for j, x in enumerate(xs) if x in at]
        vals = [at[x][1] for x in xs if x in at]
        err = [[at[x][1] - at[x][2] for x in xs if x in at], [at[x][3] - at[x][1] for x in xs if x in at]]
        rects = ax.bar(pos, vals, width, yerr=err, capsize=2, label=provider,
                       color=None if n > 1 else [f"C{j}" for j in range(len(vals))])
        if annotate and provider in annotate:
            ax.bar_label(rects, labels=annotate[provider], fontsize=7)
    ax.set_xticks(range(len(xs)), xs)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    if n > 1:
        ax.legend(fontsize=8)


def by_provider(s: Series) -> Series:
    """One series whose x is the provider (for a single point per provider): one full-width bar each."""
    return {"": [(provider, *pts[0][1:]) for provider, pts in s.items() if pts]}


def title(fig, rows: list[dict], what: str) -> None:
    """Set ``fig``'s title to ``what`` over the first row's device, date, torch version and git sha."""
    r = rows[0]
    fig.suptitle(f"{what}\n{r['device']} · {r['date']} · torch {r['torch']} · {r['git_sha']}", fontsize=9)


def plot_kernels(data: dict, plt, out: Path) -> list[Path]:
    """kernels_bandwidth.png and kernels_decode_step.png."""
    made = []
    if "kernels.pack" in data:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        ceiling = series(data.get("kernels.ceiling", []), "bandwidth")
        for ax, bench in zip(axes, ("kernels.pack", "kernels.unpack")):
            s = series(data.get(bench, []), "bandwidth")
            s.update(ceiling)
            lines(ax, s, logx=True, dashed=tuple(ceiling))
            ax.set_title(bench.split(".")[1])
            ax.set_xlabel("tokens in the region")
        axes[0].set_ylabel("GB/s (read + written)")
        title(fig, data["kernels.pack"], "pack/unpack vs device-to-device copy")
        made.append(save(fig, plt, out / "kernels_bandwidth.png"))
    if "kernels.decode_step" in data:
        rows = data["kernels.decode_step"]
        fig, ax = plt.subplots(figsize=(9, 4))
        bars(ax, series(rows, "time"), logy=True)
        ax.axhline(15, color="red", linestyle=":", label="target 15 µs")
        ax.set_xlabel("batch")
        ax.set_ylabel("µs per decode step (all layers, landed in pinned host)")
        ax.legend(fontsize=8)
        title(fig, rows, "decode step")
        made.append(save(fig, plt, out / "kernels_decode_step.png"))
    return made


def plot_transfers(data: dict, plt, out: Path) -> list[Path]:
    """transfers.png."""
    if "transfers.d2h" not in data:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, bench in zip(axes, ("transfers.d2h", "transfers.h2d")):
        lines(ax, series(data.get(bench, []), "bandwidth"), logx=True, dashed=("memcpy",))
        ax.set_title(bench.split(".")[1].upper())
        ax.set_xlabel("chunk MiB")
    axes[0].set_ylabel("GB/s")
    title(fig, data["transfers.d2h"], "packed chunks to/from pinned host vs cudaMemcpyAsync")
    return [save(fig, plt, out / "transfers.png")]


def plot_disk(data: dict, plt, out: Path) -> list[Path]:
    """disk.png."""
    if "disk.write" not in data:
        return []
    fig, ax = plt.subplots(figsize=(9, 4))
    s: Series = {}
    for bench in ("disk.write", "disk.read"):
        for provider, pts in series(data.get(bench, []), "bandwidth").items():
            s.setdefault(provider, []).extend((bench.split(".")[1], *p[1:]) for p in pts)
    bars(ax, s)
    ax.set_ylabel("GB/s")
    title(fig, data["disk.write"], "DiskTransport vs raw O_DIRECT, same disk")
    return [save(fig, plt, out / "disk.png")]


def plot_generate(data: dict, plt, out: Path) -> list[Path]:
    """generate_overhead.png, fig2_prompt_vs_token.png, fig25_end_to_end.png."""
    made = []
    rows = data.get("generate.e2e")
    if rows:
        total = series(rows, "total_time")
        ref = total["dynamic"][0][1] if total.get("dynamic") else None

        def _ratios(sub: Series) -> dict[str, list[str]]:
            return {"": [f"{pts[0][1] / ref:.3f}x" for pts in sub.values()]} if ref else {}

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        bars(axes[0], by_provider(total), annotate=_ratios(total))
        axes[0].set_ylabel("end-to-end s (generate + wait)")
        bars(axes[1], by_provider(series(rows, "kv_resident")))
        axes[1].set_ylabel("GB of KV resident on the GPU (decode)")
        title(fig, rows, f"HF generate {rows[0]['x']}: streaming and offload vs DynamicCache")
        made.append(save(fig, plt, out / "generate_overhead.png"))
        fig25 = {p: v for p, v in total.items() if p in ("dynamic", "stream-host", "stream-disk")}
        if fig25:
            fig, ax = plt.subplots(figsize=(6, 4))
            bars(ax, by_provider(fig25), annotate=_ratios(fig25))
            ax.set_ylabel("end-to-end s")
            title(fig, rows, "Fig. 25: no streaming vs streaming to host vs to disk")
            made.append(save(fig, plt, out / "fig25_end_to_end.png"))
    rows = data.get("generate.fig2")
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        s = series(rows, "prompt_time")
        s.update({"per-token": series(rows, "per_token_time").get("dynamic", [])})
        s = {("prompt (prefill)" if k == "dynamic" else k): v for k, v in s.items()}
        bars(ax, s, logy=True)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms")
        title(fig, rows, "Fig. 2: prompt time vs per-token time")
        made.append(save(fig, plt, out / "fig2_prompt_vs_token.png"))
    return made


def plot_levels(data: dict, plt, out: Path) -> list[Path]:
    """levels.png: decode step landed (µs), prefill landed (ms), end to end (s) per level."""
    panels = [("levels.decode", "landed_time"), ("levels.prefill", "landed_time"), ("levels.e2e", "total_time")]
    panels = [(b, m) for b, m in panels if b in data]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (bench, metric) in zip(axes, panels):
        bars(ax, by_provider(series(data[bench], metric)), logy=bench == "levels.decode")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{bench.split('.')[1]}: {metric}")
        ax.set_ylabel(_unit(data[bench], metric))
    title(fig, data[panels[0][0]], "Fig. 7: DéjàVuLib levels (0 naive, 1 buffered, 2 layer-by-layer, 3 all)")
    return [save(fig, plt, out / "levels.png")]


def _topic_plotter(topic: str):
    """Another topic's own ``plot(data, plt, out) -> list[Path]`` (e.g. ``kvstream/bench/prefix.py``), if it has one."""
    import importlib

    try:
        module = importlib.import_module(f"{__package__}.{topic}")
    except ImportError:
        return None
    return getattr(module, "plot", None)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed); ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, plt, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG at ``dpi``, close it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_panels(fig, plt, axes, path: Path, suptitle: str, dpi: int = 120) -> Path:
    """A grid and a legend on each of ``axes``, ``suptitle`` over them, then :func:`save` at ``dpi``."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(suptitle)
    return save(fig, plt, path, dpi=dpi)


def main(argv: Sequence[str] | None = None) -> int:
    """Plot every CSV found in ``--out``; returns 0, or 1 without matplotlib."""
    p = argparse.ArgumentParser(prog="kvstream.bench.plot", description=__doc__)
    p.add_argument("--out", default=str(records.default_results_dir()), help="directory with the CSVs")
    p.add_argument("--png-dir", default=None, help="where the PNGs go (default: --out)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        plt = pyplot()
    except ImportError:
        print("kvstream.bench.plot: matplotlib is not installed (pip install 'kvstream[bench]'); no PNGs made")
        return 1
    src = Path(args.out)
    dst = Path(args.png_dir) if args.png_dir else src
    dst.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    plotters = {"kernels": plot_kernels, "transfers": plot_transfers, "disk": plot_disk, "generate": plot_generate,
                "levels": plot_levels}
    for path in sorted(src.glob("*.csv")):
        plotter = plotters.get(path.stem) or _topic_plotter(path.stem)
        if plotter is not None:
            made += plotter(read_latest(path), plt, dst)
    print("plots: " + (", ".join(str(m) for m in made) if made else f"none (no CSVs in {src})"), flush=True)
    return 0


if __name__ == "__main__":
    harness.module_main(main)
