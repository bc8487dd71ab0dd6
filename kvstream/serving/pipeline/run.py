"""One stage process from start to end: its model, budget and links; the run; the check; the summary.

:func:`run_stage` is what every stage process runs (under ``torchrun``, under ``kvstream pipeline``, or in
the calling process when the pipeline has one stage). Every stage builds the same model from the same
seed (:func:`build_model`) and keeps its part (:class:`~kvstream.serving.pipeline.stages.StageModel`);
stage 0 serves the load (:class:`~kvstream.serving.pipeline.scheduler.Scheduler`), the others follow.
At the end stage 0 gathers every stage's log and, with ``check``, runs single-process ``generate`` of
the whole model on every padded microbatch and compares each request's tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import ConfigError
from ...layout import KVLayout
from ...streaming.placement import split_layers
from ..loadgen import Request, make_requests, microbatches, prompt_lengths, summarize
from ..worker import generate, pad_left
from .engine import StageRuntime, follow
from .links import Env, Links
from .scheduler import Admission, Scheduler
from .stages import StageModel, architecture
from .swap import SwapManager, measure_bandwidth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MiB = 1 << 20


@dataclass
class RunConfig:
    """Everything a stage needs to know about the run; every stage gets the same one.

    ``model`` is ``tiny`` (architecture ``arch``), ``llama3-8b`` or a checkpoint directory; ``swap`` is
    ``off``, ``on`` or ``auto``; ``kv_budget_mb`` bounds each stage's KV (MiB); ``pcie_gbps`` overrides the
    measured ``B_pcie`` (GB/s); ``prompt_stages > 0`` disaggregates (:mod:`.disagg`: that many prompt
    stages before the ``stages`` token stages). Lengths and arrivals as in :mod:`kvstream.serving.loadgen`.
    """

    device: str = "cpu"
    stages: int = 2
    microbatches: int = 2
    batch: int = 1
    requests: int = 8
    rate: float = math.inf
    prompt_tokens: int | None = 32
    prompt_lengths: str | None = None
    output_tokens: str = "uniform:4:12"
    load_seed: int = 0
    model: str = "tiny"
    arch: str = "llama"
    layers: int | None = None
    dtype: str = "float32"
    seed: int = 0
    swap: str = "off"
    kv_budget_mb: float | None = None
    pcie_gbps: float | None = None
    check: bool = True
    warmup: bool = False
    timeout: float = 300.0
    threads: int = 1
    prompt_stages: int = 0

    @property
    def processes(self) -> int:
        """Processes of the job: the token (or only) pipeline's stages plus the prompt pipeline's."""
        return self.stages + self.prompt_stages

    @property
    def budget_bytes(self) -> int | None:
        """The per-stage KV budget in bytes (``None``: unbounded)."""
        return None if self.kv_budget_mb is None else int(self.kv_budget_mb * MiB)

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}


def model_config(cfg: RunConfig) -> Any:
    """The transformers config of the run's model (no weights).

    Raises
    ------
    ConfigError
        For an unknown model name or a directory without ``config.json``.
    """
    from ...models import llama3_8b_config, tiny_config

    if cfg.model == "tiny":
        return tiny_config(cfg.arch, num_layers=cfg.layers or 4)
    if cfg.model == "llama3-8b":
        return llama3_8b_config(cfg.layers or 32)
    if os.path.isfile(os.path.join(cfg.model, "config.json")):
        import transformers as tf

        return tf.AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    raise ConfigError(f"--model must be tiny, llama3-8b or a checkpoint directory with a config.json, got {cfg.model!r}")


def build_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The run's whole model on ``device``: seeded embedded weights (the same in every process) or a checkpoint."""
    from ... import models

    if cfg.model in ("tiny", "llama3-8b"):
        return models.build_model(model_config(cfg), seed=cfg.seed, device=device, dtype=DTYPES[cfg.dtype])
    return models.load_model(cfg.model, device=device, dtype=DTYPES[cfg.dtype])


def stage_token_bytes(config: Any, dtype: str, stages: int) -> list[int]:
    """KV bytes of one token of one row on each stage (its layers, K and V), from the model's layout."""
    layout = KVLayout.from_config(config, dtype=DTYPES[dtype])
    per_layer = layout.bytes_per_token(1) // layout.num_layers
    return [per_layer * len(r) for r in split_layers(layout.num_layers, stages)]


def workload(cfg: RunConfig) -> list[list]:
    """The run's microbatches (groups of ``batch`` requests in arrival order), the same in every process."""
    lens = prompt_lengths(fixed=cfg.prompt_tokens if cfg.prompt_lengths is None else None, path=cfg.prompt_lengths)
    reqs = make_requests(cfg.requests, rate_per_s=cfg.rate, prompt_lens=lens, output_spec=cfg.output_tokens,
                         seed=cfg.load_seed)
    return microbatches(reqs, cfg.batch)


def admission(cfg: RunConfig, config: Any, bandwidth: float) -> Admission:
    """Stage 0's admission rule for the run (the largest stage's per-token bytes and layers)."""
    per_stage = stage_token_bytes(config, cfg.dtype, cfg.stages)
    layers = min(len(r) for r in split_layers(int(config.num_hidden_layers), cfg.stages))
    return Admission(mode=cfg.swap, budget_bytes=cfg.budget_bytes, token_bytes=max(per_stage), layers=layers,
                     bandwidth_bytes_per_s=bandwidth)


def validate(cfg: RunConfig) -> None:
    """Check a run before any process starts (the CLI's one-line errors).

    Raises
    ------
    ConfigError
        Bad sizes, an architecture the stages cannot split, more stages than layers, swapping without a budget, a microbatch whose KV alone does not
        fit the budget, or too few GPUs.
    """
    for name in ("stages", "microbatches", "batch", "requests"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.swap != "off" and cfg.kv_budget_mb is None:
        raise ConfigError("--swap needs --kv-budget-mb N (the device KV budget per stage)")
    if cfg.kv_budget_mb is not None and not cfg.kv_budget_mb > 0:
        raise ConfigError(f"--kv-budget-mb must be > 0, got {cfg.kv_budget_mb}")
    config = model_config(cfg)
    architecture(config)
    split_layers(int(config.num_hidden_layers), cfg.stages)
    if cfg.prompt_stages:
        split_layers(int(config.num_hidden_layers), cfg.prompt_stages)
    if cfg.device == "cuda" and torch.cuda.device_count() < cfg.processes:
        raise ConfigError(f"{cfg.processes} stages on cuda need as many GPUs; {torch.cuda.device_count()} visible")
    if cfg.swap != "off" and (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise ConfigError("--swap supports full-attention layers only; this model has sliding-window layers")
    rule = admission(cfg, config, 1.0)
    if cfg.budget_bytes is not None:
        worst = max(workload(cfg), key=rule.need_bytes)
        if rule.need_bytes(worst) > cfg.budget_bytes:
            raise ConfigError(f"--kv-budget-mb {cfg.kv_budget_mb} cannot hold one microbatch: {len(worst)} requests need "
                              f"{rule.need_bytes(worst) / MiB:.3f} MiB of KV on the largest stage")


def device_for(cfg: RunConfig, env: Env) -> torch.device:
    """This process's device (``cuda:LOCAL_RANK``, made current) or the CPU (``cfg.threads`` threads)."""
    if cfg.device == "cuda":
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
        return dev
    torch.set_num_threads(max(1, cfg.threads))
    return torch.device("cpu")


def check(cfg: RunConfig, groups: list, outputs: dict[int, list[int]], device: torch.device,
          model: torch.nn.Module | None = None) -> list[dict]:
    """Compare every request's tokens with single-process ``generate`` of its padded microbatch."""
    model = model if model is not None else build_model(cfg, device)
    out = []
    for group in groups:
        ids, mask = pad_left(group, device)
        ref = generate(model, ids, mask, max(r.max_new_tokens for r in group)).cpu()
        w = ids.shape[1]
        for i, r in enumerate(group):
            want = ref[i, w:w + r.max_new_tokens].tolist()
            out.append({"request": r.id, "identical": outputs.get(r.id) == want})
    return out


def run_stage(cfg: RunConfig, env: Env, progress: Callable[[int, int], None] | None = None,
              results: str | None = None, model: torch.nn.Module | None = None) -> dict | None:
    """Run this process's stage to the end. Stage 0 returns the run's summary document (others ``None``).

    ``model`` (one stage only: benchmarks) reuses an already built whole model instead of building one.

    The document holds ``config``, ``summary`` (:func:`~kvstream.serving.loadgen.summarize`), ``stages``
    (each stage's :meth:`~kvstream.serving.pipeline.swap.SwapManager.summary`), ``checks`` and
    ``identical`` (requests whose tokens equal ``generate``'s); it is also written to
    ``<results>/summary.json``.

    Raises
    ------
    ConfigError
        An impossible configuration.
    CapacityError
        A stage's KV would pass its budget.
    """
    device = device_for(cfg, env)
    config = model_config(cfg)
    links = Links(env, device, cfg.timeout, cfg.batch)
    try:
        if model is None or env.world > 1:
            model = build_model(cfg, device)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stage = StageModel(model, env.rank, env.world)
        bandwidth = cfg.pcie_gbps * 1e9 if cfg.pcie_gbps else measure_bandwidth(device)
        swap = SwapManager(device, budget_bytes=cfg.budget_bytes, swap=cfg.swap != "off",
                           token_bytes=stage_token_bytes(config, cfg.dtype, env.world)[env.rank],
                           bandwidth_bytes_per_s=bandwidth)
        rt = StageRuntime(stage, swap, eos)
        groups = workload(cfg)
        sched = None
        if env.rank == 0:
            sched = Scheduler(rt, links, slots=cfg.microbatches, admission=admission(cfg, config, bandwidth),
                              progress=progress)
            if cfg.warmup:  # the first microbatch's shape, two tokens, untimed and unlogged
                sched.run([[Request(id=-1 - r.id, arrival_s=0.0, prompt_ids=r.prompt_ids, max_new_tokens=2)
                            for r in groups[0]]], record=False)
            sched.run(groups)
            sched.stop()
        else:
            follow(rt, links)
        doc = {"stage": env.rank, "layers": [stage.layers.start, stage.layers.stop], "device": str(device),
               **swap.summary()}
        docs = links.gather(doc)
    finally:
        links.close()
    if env.rank != 0:
        return None
    checks = []
    if cfg.check:
        keep = model if env.world == 1 else None
        del stage, rt, swap
        checks = check(cfg, groups, sched.outputs, device, keep)
    out = {"config": cfg.to_json(), "summary": summarize(sched.completions), "stages": docs, "checks": checks,
           "requests": cfg.requests, "identical": sum(c["identical"] for c in checks),
           "completed": len(sched.completions)}
    return write_summary(out, results)


def write_summary(doc: dict, results: str | None) -> dict:
    """Write ``doc`` to ``<results>/summary.json`` (when ``results`` is given) and return it."""
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        (Path(results) / "summary.json").write_text(json.dumps(doc, indent=1))
    return doc


__all__ = ["RunConfig", "DTYPES", "model_config", "build_model", "stage_token_bytes", "workload", "admission",
           "validate", "check", "run_stage", "device_for", "write_summary"]
