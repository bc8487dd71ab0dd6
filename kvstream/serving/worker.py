"""``kvstream serve``: one worker of prompt/token disaggregation (DéjàVu), or a colocated baseline worker.

Roles (DéjàVu §3-4; msr-fiddle/dejavu ``ParallelGptDVFT.cc``):

* **prompt** — waits for a microbatch's requests to arrive, prefills it with
  ``model.generate(ids, max_new_tokens=1, cache=StreamingCache(link, session="mb000007"))``, so
  each layer's KV streams to the token worker that owns the microbatch *while* later layers compute;
  ``cache.wait()`` writes the session manifest; then the first generated token and the ids go out as
  ``mb000007/meta``.
* **token** — for each microbatch it owns, in order: reads ``meta`` (waiting for it),
  ``StreamingCache.load`` (the manifest, then the layers: decoding starts once the last layer landed),
  drops the session's chunks from the link, and continues ``generate`` for the remaining tokens. With
  ``--check`` it also runs single-process ``generate`` of the same microbatch and compares the tokens.
* **both** — a colocated worker (the baseline): claims the next microbatch through the store, waits for
  it to arrive, and runs prefill and decode itself.

Microbatch ``j`` is prefilled by prompt rank ``j % P`` and decoded by token rank ``P + j % T`` (ranks
``0..P-1`` are prompt workers, the rest token workers). Links are point-to-point transports, one per
(prompt, token) pair: :class:`~kvstream.transports.remote.RemoteHostTransport` (gloo, host memory; the CPU
default) or :class:`~kvstream.transports.nccl.NcclTransport` (GPU to GPU; the CUDA default).

Launch: every rank gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (as
``torchrun`` sets them); the rendezvous store is hosted by rank 0, or by the launcher when
``TORCHELASTIC_USE_AGENT_STORE=True`` (torchrun's agent, or ``kvstream disagg``). Every worker builds the
same workload from the same arguments (:mod:`kvstream.serving.loadgen`); times are seconds after a start
time ``t0`` shared through the store (one host's clock: cross-host runs need synchronized clocks).
Each rank writes ``<results>/rank<r>.json``.

Example (two processes on one host, under torchrun)::

    torchrun --nproc-per-node 2 -m kvstream.cli serve --device cuda --requests 32 --rate 2 --results out/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, KVStreamError, PeerError
from ..integrations.hf.keywords import cache_kwargs
from .launch import guarded
from .loadgen import Completion, Request, add_load_args, make_requests, microbatches, prompt_lengths

#: Store keys of the run live under this prefix (plus torchrun's run id and restart count when set, so
#: that a restarted or second run on the same agent store starts from fresh counters).
PREFIX = "kvstream/serve"


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The options every worker (and ``kvstream disagg``) shares: model, workload, links."""
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--model", default=None,
                   help="tiny, llama3-8b, or a checkpoint directory (default: tiny on cpu, llama3-8b on cuda)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the embedded model (fewer = faster)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and KV (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--seed", type=int, default=0, help="model weight seed (every worker must use the same)")
    p.add_argument("--transport", choices=("remote", "nccl"), default=None,
                   help="prompt->token links: remote (gloo, host memory) or nccl (default: nccl on cuda)")
    p.add_argument("--level", default=None, help="streaming level 0-3 (default KVSTREAM_LEVEL or 3)")
    p.add_argument("--prompt-workers", type=int, default=1, help="ranks 0..P-1 are prompt workers (default 1)")
    add_load_args(p, requests=4, prompt_default="64 cpu, 1024 cuda", output_default="fixed:16 cpu, fixed:128 cuda")
    p.add_argument("--microbatch", type=int, default=1, help="requests per microbatch (default 1)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="token workers compare with single-process generate (default on)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker on cpu (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a peer or a chunk, s (default 600)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstream serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("auto", "prompt", "token", "both"), default="auto",
                   help="auto: rank < --prompt-workers is a prompt worker, the rest token workers; "
                        "both: colocated prefill+decode (the baseline)")
    p.add_argument("--results", required=True, help="directory for rank<r>.json")
    add_workload_args(p)
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill device-dependent defaults in place (device, model, dtype, transport, lengths) and return ``args``."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.model = args.model or ("llama3-8b" if cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.transport = args.transport or ("nccl" if cuda else "remote")
    if args.prompt_tokens is None and args.prompt_lengths is None:
        args.prompt_tokens = 1024 if cuda else 64
    args.output_tokens = args.output_tokens or ("fixed:128" if cuda else "fixed:16")
    return args


def workload(args: argparse.Namespace) -> list[list[Request]]:
    """The run's microbatches, identical in every process given the same arguments."""
    lens = prompt_lengths(fixed=args.prompt_tokens if args.prompt_lengths is None else None, path=args.prompt_lengths)
    reqs = make_requests(args.requests, rate_per_s=args.rate, prompt_lens=lens, output_spec=args.output_tokens,
                         seed=args.load_seed)
    return microbatches(reqs, args.microbatch)


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model every worker runs: an embedded config with seeded weights, or a local checkpoint."""
    from ..models import build_model, llama3_8b_config, load_model, tiny_config

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model == "tiny":
        return build_model(tiny_config(num_layers=args.layers or 4), seed=args.seed, device=device, dtype=dtype)
    if args.model == "llama3-8b":
        return build_model(llama3_8b_config(args.layers or 32), seed=args.seed, device=device, dtype=dtype)
    if os.path.isdir(args.model):
        return load_model(args.model, device=device, dtype=dtype)
    raise ConfigError(f"--model must be tiny, llama3-8b or a checkpoint directory, got {args.model!r}")


def fingerprint(model) -> list[float]:
    """A cheap fingerprint of the weights (sum and absolute sum of three parameters, as float64), so that a
    token worker can tell that its prompt worker built the same model (same seed, same device type)."""
    params = list(model.parameters())
    picks = [params[0], params[len(params) // 2], params[-1]]
    with torch.no_grad():
        return [float(v) for p in picks for v in (p.double().sum(), p.double().abs().sum())]


def pad_left(mb: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both ``[len(mb), max prompt]`` int64 on ``device``, left-padded with id 0."""
    width = max(r.prompt_tokens for r in mb)
    ids = [[0] * (width - r.prompt_tokens) + list(r.prompt_ids) for r in mb]
    mask = [[0] * (width - r.prompt_tokens) + [1] * r.prompt_tokens for r in mb]
    return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device))


def generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, cache=None, streamer=None) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (EOS suppressed by ``min_new_tokens``)."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)


class _FirstToken:
    """A transformers streamer that notes when the first generated token came out (time to first token)."""

    def __init__(self, device: torch.device):
        self.device, self.calls, self.at = device, 0, None

    def put(self, value) -> None:
        """Queue one line of the report."""
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first put is the prompt
            self.at = time.time()

    def end(self) -> None:
        """Print the queued report lines."""
        pass


class Context:
    """One worker's process state: rank, device, store, the shared start time."""

    def __init__(self, args: argparse.Namespace):
        from ..transports.peer import store_from_env

        try:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            self.host, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"kvstream serve needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (as torchrun "
                              f"sets them): {e}") from None
        self.args = args
        if args.device == "cuda":
            if torch.cuda.device_count() <= self.local_rank:
                raise ConfigError(f"rank {self.rank} needs cuda:{self.local_rank}, but {torch.cuda.device_count()} "
                                  f"GPUs are visible")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, args.threads))
        self.store = store_from_env(timeout_s=args.timeout)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        self.prefix = PREFIX if not run_id else f"{PREFIX}/{run_id}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        self.t0 = 0.0

    def client(self):
        """A new connection to the rendezvous store (one per transport endpoint)."""
        from ..transports.peer import rendezvous_store

        return rendezvous_store(self.host, self.port, is_server=False, timeout_s=self.args.timeout)

    def barrier(self, name: str) -> None:
        """Wait until every rank reached ``name`` (bounded by ``--timeout``; ``PeerError`` after it)."""
        from ..transports.peer import poll

        key = f"{self.prefix}/barrier/{name}"
        self.store.add(key, 1)
        if not poll(lambda: int(self.store.add(key, 0)) >= self.world, time.monotonic() + self.args.timeout,
                    lambda: None):
            raise PeerError(f"barrier {name!r}: only {int(self.store.add(key, 0))} of {self.world} ranks arrived "
                            f"within {self.args.timeout} s")

    def start_clock(self) -> None:
        """Agree on ``t0`` (rank 0 sets it just after the barrier); wall-clock seconds."""
        self.barrier("ready")
        if self.rank == 0:
            self.store.set(f"{self.prefix}/t0", repr(time.time() + 0.2))
        self.store.wait([f"{self.prefix}/t0"])
        self.t0 = float(self.store.get(f"{self.prefix}/t0").decode())

    def now(self) -> float:
        """Seconds since ``t0``, after the device finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time() - self.t0

    def wait_until(self, at_s: float) -> None:
        """Sleep until ``at_s`` seconds after ``t0``."""
        delay = self.t0 + at_s - time.time()
        if delay > 0:
            time.sleep(delay)


def _links(ctx: Context, role: str, prompt_ranks: range, token_ranks: range) -> dict[int, Any]:
    """This rank's point-to-point links, built in one global (prompt, token) order so that nobody deadlocks."""
    from ..transports.nccl import NcclTransport
    from ..transports.remote import RemoteHostTransport

    args, links = ctx.args, {}
    pairs = [(p, t) for p in prompt_ranks for t in token_ranks if ctx.rank in (p, t)]
    for p, t in pairs:
        peer = t if role == "prompt" else p
        if args.transport == "nccl":
            links[peer] = NcclTransport(ctx.client(), ctx.rank, peer, role="send" if role == "prompt" else "recv",
                                        device=ctx.device, namespace=f"{ctx.prefix}/nccl", timeout_s=min(args.timeout, 120),
                                        fetch_timeout_s=args.timeout)
        else:
            links[peer] = RemoteHostTransport(ctx.client(), ctx.rank, peer, namespace=f"{ctx.prefix}/remote",
                                              timeout_s=min(args.timeout, 120), fetch_timeout_s=args.timeout)
    return links


def _json_chunk(doc: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(doc, separators=(",", ":")).encode()), dtype=torch.uint8)


def _session(j: int) -> str:
    return f"mb{j:06d}"


def run_prompt(ctx: Context, model, mbs: list[list[Request]], links: dict[int, Any], P: int, T: int) -> dict:
    """Prefill this rank's microbatches and stream each to its token worker (see the module docstring)."""
    from ..integrations.hf import StreamingCache

    timings = {"prefill_s": [], "stream_wait_s": []}
    weights = fingerprint(model)
    for j, mb in enumerate(mbs):
        if j % P != ctx.rank:
            continue
        link = links[P + j % T]
        ctx.wait_until(mb[-1].arrival_s)
        start = ctx.now()
        ids, mask = pad_left(mb, ctx.device)
        cache = StreamingCache(config=model.config, transport=link, session=_session(j), level=ctx.args.level)
        out = generate(model, ids, mask, 1, cache=cache)
        first = ctx.now()
        cache.wait()
        done = ctx.now()
        link.flush(f"{_session(j)}/meta", _json_chunk({
            "mb": j, "ids": out.tolist(), "mask": mask.tolist(), "requests": [r.id for r in mb],
            "start_s": start, "first_token_s": first, "weights": weights})).wait()
        timings["prefill_s"].append(first - start)
        timings["stream_wait_s"].append(done - first)
    return timings


def _compare(model, mb, ids, mask, out, n_max) -> list[dict]:
    ref = generate(model, ids, mask, n_max)
    width = ids.shape[1]
    return [{"request": r.id, "identical": bool(torch.equal(out[i, width:width + r.max_new_tokens],
                                                             ref[i, width:width + r.max_new_tokens]))}
            for i, r in enumerate(mb)]


def run_token(ctx: Context, model, mbs: list[list[Request]], links: dict[int, Any], P: int, T: int
              ) -> tuple[list[Completion], list[dict], dict]:
    """Load and decode this rank's microbatches in order (see the module docstring)."""
    from ..integrations.hf import StreamingCache

    completions, checks, timings = [], [], {"load_s": [], "decode_step_s": []}
    me, weights = ctx.rank - P, fingerprint(model)
    for j, mb in enumerate(mbs):
        if j % T != me:
            continue
        link = links[j % P]
        meta = json.loads(bytes(link.fetch_new(f"{_session(j)}/meta", "cpu").numpy()))
        if meta["weights"] != weights:
            raise ConfigError(f"prompt rank {j % P} built other weights than token rank {ctx.rank} "
                              f"(fingerprints {meta['weights']} vs {weights}): same --model, --seed, --dtype?")
        got = ctx.now()
        cache = StreamingCache.load(link, _session(j), config=model.config, device=ctx.device, stream=False)
        loaded = ctx.now()
        for key in link.keys(f"{_session(j)}/"):
            link.delete(key)
        seq = torch.tensor(meta["ids"], dtype=torch.long, device=ctx.device)
        mask = torch.tensor(meta["mask"], dtype=torch.long, device=ctx.device)
        mask1 = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=ctx.device)], dim=1)
        n_max = max(r.max_new_tokens for r in mb)
        out = generate(model, seq, mask1, n_max - 1, cache=cache)
        finish = ctx.now()
        timings["load_s"].append(loaded - got)
        timings["decode_step_s"].append((finish - loaded) / max(1, n_max - 1))
        completions += [Completion(id=r.id, arrival_s=r.arrival_s, start_s=meta["start_s"],
                                   first_token_s=meta["first_token_s"], finish_s=finish,
                                   prompt_tokens=r.prompt_tokens, output_tokens=r.max_new_tokens) for r in mb]
        if ctx.args.check:
            ids, mask0 = pad_left(mb, ctx.device)
            checks += [dict(c, mb=j) for c in _compare(model, mb, ids, mask0, out, n_max)]
    return completions, checks, timings


def run_both(ctx: Context, model, mbs: list[list[Request]]) -> tuple[list[Completion], dict]:
    """Colocated baseline: claim microbatches through the store; prefill and decode each here."""
    completions, timings = [], {"generate_s": []}
    while True:
        j = int(ctx.store.add(f"{ctx.prefix}/next_mb", 1)) - 1
        if j >= len(mbs):
            break
        mb = mbs[j]
        ctx.wait_until(mb[-1].arrival_s)
        start = ctx.now()
        ids, mask = pad_left(mb, ctx.device)
        first = _FirstToken(ctx.device)
        generate(model, ids, mask, max(r.max_new_tokens for r in mb), streamer=first)
        finish = ctx.now()
        timings["generate_s"].append(finish - start)
        ttft = (first.at - ctx.t0) if first.at is not None else finish
        completions += [Completion(id=r.id, arrival_s=r.arrival_s, start_s=start, first_token_s=ttft,
                                   finish_s=finish, prompt_tokens=r.prompt_tokens, output_tokens=r.max_new_tokens)
                        for r in mb]
    return completions, timings


def _warm_up(ctx: Context, model, mbs: list[list[Request]], role: str) -> dict:
    """Compile kernels before the clock starts; the prompt side also times a plain prefill (the planner's Y)."""
    from ..integrations.hf import StreamingCache
    from ..transports.host import HostTransport

    ids, mask = pad_left(mbs[0], ctx.device)
    out: dict = {}
    if role in ("prompt", "both"):
        generate(model, ids, mask, 1)
        t = time.perf_counter()
        generate(model, ids, mask, 1)
        ctx.now()
        out["plain_prefill_s"] = time.perf_counter() - t
        if role == "prompt":  # the streaming path (pack kernels, side stream) once, into local host memory
            with HostTransport(capacity_bytes=1 << 34) as local:
                cache = StreamingCache(config=model.config, transport=local, session="warmup", level=ctx.args.level)
                generate(model, ids, mask, 1, cache=cache)
                cache.wait()
    if role in ("token", "both"):
        t = time.perf_counter()
        generate(model, ids, mask, 3)
        ctx.now()
        out["warmup_generate_s"] = time.perf_counter() - t
    return out


def serve(args: argparse.Namespace) -> dict:
    """Run one worker to completion; returns what it writes to ``<results>/rank<r>.json``."""
    resolve_defaults(args)
    ctx = Context(args)
    P = args.prompt_workers
    if args.role == "both":
        role = "both"
    else:
        if not 1 <= P < ctx.world:
            raise ConfigError(f"--prompt-workers {P} must leave at least one token worker among {ctx.world} ranks")
        role = args.role if args.role != "auto" else ("prompt" if ctx.rank < P else "token")
        if (role == "prompt") != (ctx.rank < P):
            raise ConfigError(f"rank {ctx.rank} cannot be a {role} worker: ranks 0..{P - 1} prompt, the rest token")
    T = ctx.world - P
    mbs = workload(args)
    model = build(args, ctx.device)
    warm = _warm_up(ctx, model, mbs, role)
    links = {} if role == "both" else _links(ctx, role, range(P), range(P, ctx.world))
    ctx.start_clock()
    doc: dict = {"rank": ctx.rank, "role": role, "device": str(ctx.device), "warmup": warm,
                 "args": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in vars(args).items()}}
    try:
        if role == "prompt":
            doc["timings"] = run_prompt(ctx, model, mbs, links, P, T)
        elif role == "token":
            completions, checks, doc["timings"] = run_token(ctx, model, mbs, links, P, T)
            doc["completions"], doc["checks"] = [c.as_dict() for c in completions], checks
        else:
            completions, doc["timings"] = run_both(ctx, model, mbs)
            doc["completions"] = [c.as_dict() for c in completions]
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / f"rank{ctx.rank}.json").write_text(json.dumps(doc, indent=1))
        ctx.barrier("finished")  # rank 0 may host the store: nobody leaves before everyone is done
    finally:
        for link in links.values():
            link.close()
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``kvstream serve``: run one worker. Returns 0, 2 for bad arguments, 3 when a peer failed."""
    args = _parser().parse_args(argv)
    code, _ = guarded("kvstream serve", lambda: serve(args), failures=KVStreamError, failed_code=3,
                      failed_prog=f"kvstream serve (rank {os.environ.get('RANK')})")
    return 0 if code is None else code


__all__ = ["add_workload_args", "resolve_defaults", "workload", "build", "pad_left", "generate", "serve", "main",
           "run_prompt", "run_token", "run_both", "Context", "fingerprint"]
