"""Prompt/token disaggregation on pipelines (DéjàVu §3): a prompt pipeline prefills, a token pipeline decodes.

One job of ``P + T`` processes: ranks ``0..P-1`` are the prompt pipeline's stages, ranks ``P..P+T-1`` the
token pipeline's (``P`` and ``T`` may differ; layers by :func:`~kvstream.streaming.placement.split_layers`
on each side).

* The prompt pipeline takes the microbatches in arrival order and prefills each through its stages. Each
  prompt stage streams **every layer's KV as soon as the layer's update produced it** (the cache hook
  after the layer) to the token stage that owns that layer — :class:`~kvstream.streaming.placement.Placement`
  maps the layers when the depths differ, so a token stage may receive from two prompt stages. The last
  prompt stage samples the first token and announces it to token stage 0 through the job's store (times,
  first tokens), which token stage 0 polls between decode steps.
* Token stage 0 runs the :class:`~kvstream.serving.pipeline.scheduler.Scheduler`: a free slot takes the
  next prefilled microbatch (``JOIN``: every token stage installs the streamed KV of its layers as if it
  had prefilled them), then decodes it round-robin with the others, requests leaving as they finish.

Times are seconds after a start shared by broadcast (one host's clock). Token stage 0 gathers the logs,
checks every request against single-process ``generate`` and writes the summary.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import Any

import torch

from ...errors import ConfigError
from ...layout import KVLayout
from ...streaming.placement import Placement, PipelineConfig
from ...transports.peer import rendezvous_store
from ..loadgen import summarize
from ..worker import pad_left
from .engine import StageRuntime, follow
from .links import JOIN, PREFILL, STOP, Env, Header, Links
from .run import admission, build_model, check, device_for, model_config, stage_token_bytes, workload, write_summary
from .scheduler import Microbatch, Scheduler
from .stages import StageModel, greedy, positions_from_mask
from .swap import SwapManager, measure_bandwidth



class _StreamOut:
    """Cache hooks of a prompt stage: after each layer's update, send its KV to the token stage owning it."""

    def __init__(self, links: Links, owner: dict[int, int]):
        self.links, self.owner, self.cache = links, owner, None

    def before_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to wait for on the prompt side."""

    def after_update(self, layer_idx: int, old_bytes: int) -> None:
        """Stream the layer's whole prompt KV (keys, then values) while later layers compute."""
        layer = self.cache.layers[layer_idx]
        self.links.send_tensor(layer.keys, self.owner[layer_idx])
        self.links.send_tensor(layer.values, self.owner[layer_idx])


def _placement(config: Any, prompt: int, token: int) -> Placement:
    layout = KVLayout.from_config(config)
    return Placement(PipelineConfig(pp_depth=prompt), PipelineConfig(pp_depth=token), num_layers=layout.num_layers,
                     kv_heads=layout.kv_heads)


def prompt_stage(stage: StageModel, links: Links, groups: list, place: Placement, token_first: int,
                 clock, eos: Any, ready: "_Ready | None") -> list[dict]:
    """Run one prompt stage to the end; returns its per-microbatch log (prefill seconds). The last prompt
    stage publishes each microbatch's first tokens and times in ``ready``."""
    owner = {}
    for t in place.outgoing(stage.stage, tokens=(0, 1)):
        owner.update({l: token_first + t.dst for l in t.region.layers})
    log = []

    def _prefill(h: Header, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        hooks = _StreamOut(links, owner)
        cache = hooks.cache = stage.new_cache(hooks)
        dev_mask = None if mask is None else mask.to(stage.device)
        pos = positions_from_mask(dev_mask if dev_mask is not None else
                                  torch.ones(h.rows, h.tokens, dtype=torch.long, device=stage.device))
        t = time.perf_counter()
        out = stage.forward(x, dev_mask, pos, cache)
        if stage.last:
            first = greedy(out, eos).to("cpu").tolist()
            ready.set(f"{ready.prefix}/{h.group}", json.dumps([h.start_us, int(clock() * 1e6), first]))
        else:
            links.send_next(h, mask, None, out)
        log.append({"group": h.group, "prefill_s": time.perf_counter() - t})

    if stage.first:
        for j, group in enumerate(groups):
            delay = group[-1].arrival_s - clock()
            if delay > 0:
                time.sleep(delay)
            ids, mask = pad_left(group, torch.device("cpu"))
            mask = None if bool((mask == 1).all()) else mask
            h = Header(PREFILL, seq=j, rows=len(group), tokens=ids.shape[1], has_mask=int(mask is not None),
                       group=j, start_us=int(clock() * 1e6))
            _prefill(h, ids.to(stage.device), mask)
        if not stage.last:
            links.send_next(Header(STOP))
        return log
    while True:
        h, mask, _, hidden = links.recv_prev(stage.dtype, stage.hidden_size)
        if h.kind == STOP:
            if not stage.last:
                links.send_next(h)
            return log
        _prefill(h, hidden, mask)


class _Ready:
    """Prefilled microbatches announced in the job's store (``<prefix>/<group>``: start, first-token time,
    first tokens): token stage 0 polls it without blocking, which gloo's point-to-point receives cannot do."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix

    def set(self, key: str, value: str) -> None:
        """Publish one microbatch."""
        self.store.set(key, value)

    def get(self, group: int, block: bool) -> list | None:
        """Microbatch ``group``'s announcement, or ``None`` if not yet there and ``block`` is false."""
        key = f"{self.prefix}/{group}"
        if block:
            self.store.wait([key])
        elif not self.store.check([key]):
            return None
        value = json.loads(self.store.get(key).decode())
        self.store.delete_key(key)
        return value


class JoinScheduler(Scheduler):
    """Token stage 0: microbatches join from the prompt pipeline instead of being prefilled here."""

    def __init__(self, rt: StageRuntime, links: Links, receive, ready: _Ready, **kw: Any):
        super().__init__(rt, links, **kw)
        self.receive, self.ready = receive, ready
        self._next = 0
        self._note: list | None = None

    def _ready(self, group) -> bool:
        """Whether the prompt pipeline announced the next group (kept for :meth:`_start`)."""
        if self._note is None:
            self._note = self.ready.get(self._next, block=False)
        return self._note is not None

    def _start(self, slot: int, group: list) -> None:
        note, self._note = self._note, None
        self._join(slot, group, self._next, note)
        self._next += 1

    def _join(self, slot: int, group: list, j: int, note: list) -> None:
        ids, mask = pad_left(group, torch.device("cpu"))
        mask = None if bool((mask == 1).all()) else mask
        start_us, first_us, first = note
        mb = self.slots[slot] = Microbatch(group, ids, mask, active=list(range(len(group))),
                                           tokens={r.id: [] for r in group}, start_s=start_us / 1e6,
                                           first_s=first_us / 1e6)
        self._seq += 1
        h = Header(JOIN, slot=slot, seq=self._seq, rows=len(group), tokens=mb.width, has_mask=int(mask is not None),
                   cap_tokens=mb.cap_tokens, group=j)
        self.rt.join(h, mask, self.receive)
        if not self.single:
            self.links.send_next(h, mask)
        self._append(slot, first)

    def _idle(self, pending: deque) -> None:
        """Nothing to decode: wait for the prompt pipeline's next microbatch."""
        self.ready.store.wait([f"{self.ready.prefix}/{self._next}"])


def run_disagg_stage(cfg, env: Env, progress=None, results: str | None = None) -> dict | None:
    """One process of a disaggregated run (``cfg.prompt_stages`` prompt stages, then ``cfg.stages`` token
    stages). Token stage 0 returns the summary document (:func:`~kvstream.serving.pipeline.run.run_stage`'s
    keys, plus ``prompt_stages``); the others return ``None``."""
    P, T = cfg.prompt_stages, cfg.stages
    if env.world != P + T:
        raise ConfigError(f"a disaggregated run of {P} prompt and {T} token stages needs {P + T} processes, "
                          f"got WORLD_SIZE {env.world}")
    device = device_for(cfg, env)
    config = model_config(cfg)
    prompt = env.rank < P
    links = Links(env, device, cfg.timeout, cfg.batch, ranks=range(0, P) if prompt else range(P, P + T))
    place = _placement(config, P, T)
    groups = workload(cfg)
    try:
        model = build_model(cfg, device)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stage = StageModel(model, env.rank if prompt else env.rank - P, P if prompt else T)
        t0 = links.broadcast(time.time() + 0.2)
        ready = None
        if env.rank in (P - 1, P):  # the last prompt stage announces, token stage 0 polls
            store = rendezvous_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_server=False,
                                     timeout_s=cfg.timeout)
            ready = _Ready(store, f"kvstream/pipeline-disagg/{t0!r}/ready")

        def _clock() -> float:
            return time.time() - t0

        if prompt:
            doc: dict = {"role": "prompt", "stage": env.rank, "layers": [stage.layers.start, stage.layers.stop],
                         "prefills": prompt_stage(stage, links, groups, place, P, _clock, eos, ready)}
            sched = None
        else:
            kv = KVLayout.from_config(config)
            src = {}
            for t in place.incoming(env.rank - P, tokens=(0, 1)):
                src.update({l: t.src for l in t.region.layers})

            def _receive(h: Header, layer: int) -> tuple:
                shape = (h.rows, kv.kv_heads, h.tokens, kv.head_dim)
                return links.recv_tensor(shape, stage.dtype, src[layer]), links.recv_tensor(shape, stage.dtype, src[layer])

            swap = SwapManager(device, budget_bytes=cfg.budget_bytes, swap=cfg.swap != "off",
                               token_bytes=stage_token_bytes(config, cfg.dtype, T)[env.rank - P],
                               bandwidth_bytes_per_s=cfg.pcie_gbps * 1e9 if cfg.pcie_gbps else measure_bandwidth(device))
            rt = StageRuntime(stage, swap, eos)
            sched = None
            if env.rank == P:
                sched = JoinScheduler(rt, links, _receive, ready, slots=cfg.microbatches, progress=progress,
                                      admission=admission(cfg, config, swap.bandwidth), clock=_clock)
                sched.run(groups)
                sched.stop()
            else:
                follow(rt, links, _receive)
            doc = {"role": "token", "stage": env.rank - P, "layers": [stage.layers.start, stage.layers.stop],
                   "device": str(device), **swap.summary()}
        docs = links.gather(doc, dst=P)
    finally:
        links.close()
    if env.rank != P:
        return None
    checks = check(cfg, groups, sched.outputs, device) if cfg.check else []
    out = {"config": cfg.to_json(), "summary": summarize(sched.completions), "checks": checks,
           "stages": [d for d in docs if d["role"] == "token"], "prompt_stages": [d for d in docs if d["role"] == "prompt"],
           "requests": cfg.requests, "identical": sum(c["identical"] for c in checks), "completed": len(sched.completions)}
    return write_summary(out, results)


__all__ = ["JoinScheduler", "prompt_stage", "run_disagg_stage"]
