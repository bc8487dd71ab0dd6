"""``kvstream demo`` (``make demo``): generate, stream the KV cache to a disk store, resume in a fresh process.

Steps, each timed:

1. build the embedded model (a transformers Llama from config with seeded weights: tiny on the CPU,
   Llama-3-8B-shaped on a GPU) or load ``--model PATH`` (with its tokenizer, when the directory has one:
   the prompts are encoded with it and the continuation prints as text; otherwise they are byte ids);
2. generate from the shipped text prompts with a plain ``DynamicCache`` (no streaming): the reference
   time and tokens, and an uninterrupted run of twice the new tokens for the continuation check;
3. generate again with :class:`~kvstream.StreamingCache` streaming every layer's KV to a
   :class:`~kvstream.DiskTransport` while the model runs; check that the tokens are identical;
4. drop model and cache, start a **fresh process** that rebuilds the model, loads the cache from the
   store (:meth:`~kvstream.StreamingCache.load`) and continues generating; also times recomputing the
   prompt's KV from scratch, the alternative to resuming;
5. check the continuation equals the uninterrupted run, print the report, exit 0 only if it does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from ..integrations.hf.keywords import cache_kwargs
from . import options


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvstream demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local checkpoint directory (config.json + weights); default: the embedded Llama")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when a GPU is present)")
    p.add_argument("--store", help="directory of the disk store (default: a temporary directory, removed after)")
    p.add_argument("--batch", type=options.positive_int, help="requests in the batch (default: 4)")
    p.add_argument("--prompt-tokens", type=options.positive_int,
                   help="prompt length in tokens (default: 256 on cpu, 1024 on cuda)")
    p.add_argument("--new-tokens", type=options.positive_int,
                   help="tokens generated before and after the resume (default: 32 / 64)")
    p.add_argument("--layers", type=options.positive_int,
                   help="decoder layers of the embedded model (default: 8 on cpu, 32 on cuda)")
    p.add_argument("--level", default=None, help="DéjàVuLib streaming level 0-3 (default: KVSTREAM_LEVEL or 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights")
    p.add_argument("--resume-from", help=argparse.SUPPRESS)  # internal: the fresh process's job file
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from the flags, each checked (``ConfigError`` naming the flag) before anything slow."""
    from ..models import check_checkpoint
    from ..streaming.levels import resolve_level

    if args.model is not None:
        check_checkpoint(args.model)
    device = str(options.device(args.device))
    gpu = device.startswith("cuda")
    if args.store is not None:
        options.writable_dir(args.store, flag="--store")
    return {
        "model": args.model, "device": device, "seed": args.seed, "level": resolve_level(args.level, name="--level"),
        "batch": args.batch or 4,
        "prompt_tokens": args.prompt_tokens or (1024 if gpu else 256),
        "new_tokens": args.new_tokens or (64 if gpu else 32),
        "layers": args.layers or (32 if gpu else 8),
        "dtype": "bfloat16" if gpu else "float32",
    }


def _build(settings: dict[str, Any]):
    from ..models import INIT_STD, build_model, llama3_8b_config, load_model

    device = torch.device(settings["device"])
    dtype = getattr(torch, settings["dtype"])
    if settings["model"]:
        return load_model(settings["model"], device=device, dtype=dtype)
    if device.type == "cuda":
        config = llama3_8b_config(num_layers=settings["layers"])
    else:
        import transformers as tf

        config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=settings["layers"],
                                num_attention_heads=8, num_key_value_heads=4, vocab_size=320,
                                max_position_embeddings=4096, initializer_range=INIT_STD)
    return build_model(config, seed=settings["seed"], device=device, dtype=dtype)


def _generate(model, ids: torch.Tensor, new_tokens: int, cache=None) -> torch.Tensor:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    if cache is not None:
        kwargs.update(cache_kwargs(cache))
    with torch.inference_mode():
        return model.generate(ids, **kwargs)


def _timed(device: torch.device, fn):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _resume_job(job_path: str) -> int:
    """The fresh process: rebuild the model, load the cache from the store, continue; write results."""
    import kvstream

    with open(job_path) as f:
        job = json.load(f)
    settings = job["settings"]
    device = torch.device(settings["device"])
    model = _build(settings)
    ids = torch.tensor(job["sequence"], dtype=torch.long, device=device)
    transport = kvstream.DiskTransport(job["store"])
    # warm-up so that neither timing below pays for kernel compilation or allocator growth
    _generate(model, ids[:, :-1], 2)
    cache, t_load = _timed(device, lambda: kvstream.StreamingCache.load(
        transport, session=job["session"], config=model.config, device=device, stream=False))
    loaded_tokens = cache.get_seq_length()
    out, t_gen = _timed(device, lambda: _generate(model, ids, settings["new_tokens"], cache))

    # the alternative to resuming: recompute the prompt's KV (prefill of everything but the last token)
    def recompute():
        """Prefill every token but the last from scratch (the alternative to resuming)."""
        with torch.inference_mode():
            return model(ids[:, :-1], use_cache=True)

    _, t_recompute = _timed(device, recompute)
    result = {"continuation": out.tolist(), "load_s": t_load, "resume_generate_s": t_gen,
              "recompute_s": t_recompute, "loaded_tokens": loaded_tokens}
    with open(job["result"], "w") as f:
        json.dump(result, f)
    transport.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 only if streaming left tokens unchanged and the resumed continuation is identical."""
    args = _parse(list(argv or []))
    if args.resume_from:
        return _resume_job(args.resume_from)

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import kvstream
    from ..models import batch_of_prompts, decode_ids, load_tokenizer

    console = Console()
    settings = _settings(args)
    device = torch.device(settings["device"])
    own_store = args.store is None
    store = args.store or tempfile.mkdtemp(prefix="kvstream-demo-")
    session = "demo"
    b, p, n = settings["batch"], settings["prompt_tokens"], settings["new_tokens"]
    ok = False
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=False) as progress:
            task = progress.add_task("building the model", total=None)
            model = _build(settings)
            progress.update(task, description=f"model built: {type(model).__name__}, "
                            f"{model.config.num_hidden_layers} layers, {settings['dtype']} on {device}")
            progress.stop_task(task)
            tokenizer = load_tokenizer(settings["model"])
            ids = batch_of_prompts(b, p, device=device, tokenizer=tokenizer)

            task = progress.add_task("warm-up (full-size generate, not timed)", total=None)
            _generate(model, ids, 4)
            progress.stop_task(task)


            task = progress.add_task(f"generate {2 * n} tokens uninterrupted (the continuation to match)", total=None)
            full = _generate(model, ids, 2 * n)
            progress.stop_task(task)

            transport = kvstream.DiskTransport(os.path.join(store, "kv"))

            def stream_run(session_name):
                """Generate with a StreamingCache to the disk store and wait for every chunk."""
                cache = kvstream.StreamingCache(config=model.config, transport=transport, session=session_name,
                                                level=settings["level"])
                out = _generate(model, ids, n, cache)
                cache.wait()
                return out, cache

            # two rounds in alternating order, best of each: neither side pays for warming the other up
            t_plain = t_stream = float("inf")
            for r in range(2):
                task = progress.add_task(f"round {r + 1}/2: generate {n} tokens, DynamicCache (no streaming)",
                                         total=None)
                ref, t = _timed(device, lambda: _generate(model, ids, n))
                t_plain = min(t_plain, t)
                progress.stop_task(task)
                task = progress.add_task(f"round {r + 1}/2: generate {n} tokens, StreamingCache -> "
                                         f"DiskTransport({store})", total=None)
                (out, cache), t = _timed(device, lambda: stream_run(session if r == 1 else "warm-up"))
                t_stream = min(t_stream, t)
                progress.stop_task(task)
            stats = cache.stats
            same_tokens = torch.equal(out, ref)

            del cache, model
            transport.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()

            task = progress.add_task("fresh process: rebuild the model, load the cache from the store, resume",
                                     total=None)
            job = {"settings": settings, "store": os.path.join(store, "kv"), "session": session,
                   "sequence": out.tolist(), "result": os.path.join(store, "result.json")}
            job_path = os.path.join(store, "job.json")
            with open(job_path, "w") as f:
                json.dump(job, f)
            proc = subprocess.run([sys.executable, "-m", "kvstream.cli", "demo", "--resume-from", job_path],
                                  capture_output=True, text=True)
            progress.stop_task(task)
        if proc.returncode != 0:
            console.print(f"[red]the resume process failed (exit {proc.returncode}):[/red]\n{proc.stderr[-4000:]}")
            return 1
        with open(job["result"]) as f:
            res = json.load(f)
        cont = torch.tensor(res["continuation"])
        same_continuation = torch.equal(cont, full.cpu())
        ok = same_tokens and same_continuation

        gb = stats["bytes_out"] / 1e9
        t = Table(title=f"kvstream demo — {settings['dtype']} on {device}, batch {b}, prompt {p}, {n}+{n} new tokens")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_row("KV streamed to disk", f"{gb:.3f} GB in {stats['chunks_out']} chunks")
        t.add_row("generate without streaming", f"{t_plain:.3f} s")
        t.add_row("generate with streaming (incl. wait for disk)", f"{t_stream:.3f} s  ({t_stream / t_plain:.2f}x)")
        t.add_row("streaming throughput over the run", f"{gb / t_stream:.2f} GB/s")
        t.add_row("resume: load the cache from the store", f"{res['load_s']:.3f} s  "
                  f"({stats['bytes_out'] / 1e9 / max(res['load_s'], 1e-9):.2f} GB/s, {res['loaded_tokens']} tokens)")
        t.add_row("alternative: recompute the prompt's KV", f"{res['recompute_s']:.3f} s")
        t.add_row("tokens identical with streaming", "[green]yes[/green]" if same_tokens else "[red]NO[/red]")
        t.add_row("continuation identical after resume", "[green]yes[/green]" if same_continuation else "[red]NO[/red]")
        console.print(t)
        tail = cont[0, p + n:].tolist()
        if tokenizer is not None:
            console.print(f"continuation of request 0 after the resume: {decode_ids(tail, tokenizer)!r}",
                          markup=False)
        else:
            console.print(f"continuation of request 0 after the resume (byte-id prompts; the model's ids, not "
                          f"text): {tail[:16]} ... ({len(set(tail))} distinct ids in {len(tail)})")
        return 0 if ok else 1
    finally:
        if own_store:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
