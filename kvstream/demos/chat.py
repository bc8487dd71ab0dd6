"""``kvstream chat-demo``: a multi-turn conversation where each turn reuses the KV of the turns before it.

Each turn's prompt is the whole conversation so far (every earlier prompt and reply) plus a new user
message, so all but the new message was already computed. Per turn the demo

1. generates with a fresh ``DynamicCache`` (no reuse): full prefill, the reference tokens and TTFT;
2. looks the prompt up in a prefix store (:class:`~kvstream.RadixStore` in host memory, or
   :class:`~kvstream.ChunkFileStore` on disk), pre-fills a cache with the matched prefix
   (:func:`~kvstream.integrations.hf.prefix.load_prefix_into`) and generates: only the new tokens are
   prefilled; its TTFT includes the lookup and the load;
3. repeats 1 and 2 alternately (``--repeats``, at least 3 of each, the order flipped every round) and
   reports each side's median TTFT with its spread (min-max); a speed-up is claimed only for a turn that
   reused something, and marked noisy when the two spreads overlap;
4. stores the turn's KV for the next turn (``store.update(out, cache)``);
5. checks that every run's tokens are identical with and without reuse.

The time to first token (TTFT) is taken when ``generate`` hands its first new token to a streamer. With
``--model PATH`` and a tokenizer in that directory, the messages are encoded with it and the replies print
as text (otherwise messages are byte ids). Exit status 0 only if every turn's tokens are identical with and
without reuse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from ..errors import ConfigError
from ..integrations.hf.keywords import cache_kwargs
from . import options

#: Fewest timed runs of each side per turn: a median and a spread need three.
MIN_REPEATS = 3


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvstream chat-demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local checkpoint directory (config.json + weights); default: the embedded Llama")
    p.add_argument("--arch", default="llama", help="embedded architecture on the CPU: llama (default), gpt2, opt, "
                   "bloom, qwen2, mistral")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (Llama-3-8B shapes), or auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="float32 (default: an exact check), bfloat16 or float16")
    p.add_argument("--layers", type=options.positive_int,
                   help="decoder layers of the embedded model (default: 4 on cpu, 32 on cuda)")
    p.add_argument("--store", choices=("radix", "file", "tiered"), default="radix",
                   help="prefix store (default: radix; tiered: host memory in front of the files)")
    p.add_argument("--plan", action="store_true", help="reuse by measured cost (StreamingCache.from_prefix(model=...):"
                   " load, recompute or both at once) instead of always loading")
    p.add_argument("--root", help="directory of the file store (default: a temporary directory, removed after)")
    p.add_argument("--chunk-tokens", type=options.positive_int, default=16,
                   help="tokens per file-store chunk (default: 16)")
    p.add_argument("--turns", type=options.positive_int, default=4, help="conversation turns (default: 4)")
    p.add_argument("--turn-tokens", type=options.positive_int,
                   help="tokens of each user message (default: 192 on cpu, 1024 on cuda)")
    p.add_argument("--new-tokens", type=options.positive_int, default=16,
                   help="tokens generated per turn (default: 16)")
    p.add_argument("--repeats", type=options.positive_int, default=MIN_REPEATS,
                   help=f"timed runs of each side per turn, alternating (default and minimum: {MIN_REPEATS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights")
    p.add_argument("--json", help="also write the per-turn results to this JSON file")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> torch.device:
    """Check the flags before anything slow (``ConfigError`` naming the flag); returns the device."""
    from ..models import check_checkpoint

    if args.repeats < MIN_REPEATS:
        raise ConfigError(f"--repeats {args.repeats}: at least {MIN_REPEATS} (a median and a spread need three runs)")
    if args.model is not None:
        check_checkpoint(args.model)
    if args.root is not None:
        options.writable_dir(args.root, flag="--root")
    return options.device(args.device)


def _check_window(config, args: argparse.Namespace, turn_tokens: int) -> None:
    """Refuse a conversation longer than a sliding window of the model: a prefix store needs every token's
    KV, and a sliding-window layer drops the oldest (``ConfigError`` before the first turn, not after it)."""
    from transformers import DynamicCache

    windows = [w for layer in DynamicCache(config=config).layers
               if isinstance(w := getattr(layer, "sliding_window", None), int) and w > 0]
    total = args.turns * (turn_tokens + args.new_tokens)
    if windows and total > min(windows):
        raise ConfigError(f"chat-demo: {args.model or args.arch} attends through a sliding window of {min(windows)} "
                          f"tokens, and this conversation grows to {total} (--turns {args.turns} x (--turn-tokens "
                          f"{turn_tokens} + --new-tokens {args.new_tokens})): a prefix store needs every token's KV. "
                          f"Use fewer or shorter turns, or a model without sliding windows")


def _config(args: argparse.Namespace, device: torch.device):
    """The model's config (read from ``--model``'s directory, or the embedded model's), before any weights."""
    from transformers import AutoConfig

    from ..models import llama3_8b_config, tiny_config

    if args.model:
        return AutoConfig.from_pretrained(args.model, local_files_only=True)
    if device.type == "cuda":
        return llama3_8b_config(num_layers=args.layers or 32)
    config = tiny_config(args.arch, num_layers=args.layers or 4)
    if args.arch == "llama":  # a little wider than the test model, so prefill time is visible
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 256, 512, 8
        config.num_key_value_heads, config.head_dim = 4, 32
    return config


def _build(args: argparse.Namespace, config, device: torch.device, dtype: torch.dtype):
    from ..models import build_model, load_model

    if args.model:
        return load_model(args.model, device=device, dtype=dtype)
    return build_model(config, seed=args.seed, device=device, dtype=dtype)


class _FirstToken:
    """A ``generate`` streamer that records when the first new token arrives (the prompt comes first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        """Count the calls: the first carries the prompt, the second the first new token (its time is kept)."""
        self.calls += 1
        if self.calls == 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        """Nothing to finish (``generate`` calls it after the last token)."""
        pass


def _generate(model, ids: torch.Tensor, new_tokens: int, cache, streamer: _FirstToken) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, **cache_kwargs(cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0,
                              streamer=streamer)


def _make_store(args: argparse.Namespace, namespace: str):
    from ..stores import ChunkFileStore, RadixStore, TieredStore

    if args.store == "radix":
        return RadixStore(capacity_bytes=8 << 30), None
    root = args.root or tempfile.mkdtemp(prefix="kvstream-chat-")
    files = ChunkFileStore(root, chunk_tokens=args.chunk_tokens, namespace=namespace)
    store = files if args.store == "file" else TieredStore([RadixStore(capacity_bytes=8 << 30), files])
    return store, (None if args.root else root)


def _ttft_full(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Generate with a fresh cache (full prefill): the tokens and the time to the first new one (seconds)."""
    from transformers import DynamicCache

    streamer = _FirstToken(device)
    t0 = time.perf_counter()
    out = _generate(model, ids, new_tokens, DynamicCache(config=model.config), streamer)
    return out, streamer.at - t0


def _ttft_reuse(model, store, ids: torch.Tensor, new_tokens: int, device: torch.device, plan: bool = False):
    """Look the prompt up, fill a fresh cache from the match and generate: tokens, cache, matched tokens, TTFT.

    ``plan``: by measured cost (:meth:`StreamingCache.from_prefix` with ``model=``: load, recompute or both
    at once); otherwise the match is always loaded."""
    from transformers import DynamicCache

    from ..integrations.hf.cache import StreamingCache
    from ..integrations.hf.prefix import load_prefix_into

    streamer = _FirstToken(device)
    t0 = time.perf_counter()
    if plan:
        cache = StreamingCache.from_prefix(store, ids, model=model, device=device)
        matched = cache.matched_tokens
    else:
        cache = DynamicCache(config=model.config)
        matched = load_prefix_into(cache, store, ids, device=device)
    out = _generate(model, ids, new_tokens, cache, streamer)
    return out, cache, matched, streamer.at - t0


def _summary(full_s: list[float], reuse_s: list[float], matched: int) -> dict[str, Any]:
    """Medians, spreads and the speed-up claim of one turn's timed runs (none when nothing was reused;
    ``noisy`` when the min-max ranges of the two sides overlap: the spread exceeds the effect)."""
    full, reuse = statistics.median(full_s), statistics.median(reuse_s)
    return {"ttft_full_s": full, "ttft_reuse_s": reuse, "ttft_full_runs_s": full_s, "ttft_reuse_runs_s": reuse_s,
            "speedup": full / max(reuse, 1e-9) if matched else None,
            "noisy": bool(matched) and max(reuse_s) >= min(full_s) and max(full_s) >= min(reuse_s)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the conversation; one result dict per turn (tokens, matched, TTFT medians and runs, identical).

    Raises
    ------
    ConfigError
        A bad flag, or a conversation longer than the model's sliding window.
    """
    from transformers import DynamicCache

    from ..models import decode_ids, encode_text, load_tokenizer, prompts

    device = _check(args)
    dtype = getattr(torch, args.dtype or "float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 check
    turn_tokens = args.turn_tokens or (1024 if device.type == "cuda" else 192)
    config = _config(args, device)
    _check_window(config, args, turn_tokens)
    model = _build(args, config, device, dtype)
    tokenizer = load_tokenizer(args.model)
    namespace = f"chat-demo:{args.model or args.arch}:{args.seed}:{dtype}"
    store, own_root = _make_store(args, namespace)
    texts = prompts()
    results = []
    try:
        warm = torch.tensor([encode_text(texts[0], 32, tokenizer)], device=device)
        _generate(model, warm, 2, DynamicCache(config=model.config), _FirstToken(device))  # not timed
        history: list[int] = []
        for turn in range(args.turns):
            user = encode_text(texts[(turn + 1) % len(texts)], turn_tokens, tokenizer)
            ids = torch.tensor([history + user], device=device)
            full_s, reuse_s, outs, refs, matched = [], [], [], [], set()
            for r in range(args.repeats):  # alternating, the order flipped every round
                for reuse in ((False, True) if r % 2 == 0 else (True, False)):
                    if reuse:
                        out, cache, m, t = _ttft_reuse(model, store, ids, args.new_tokens, device, args.plan)
                        outs.append(out)
                        reuse_s.append(t)
                        matched.add(m)
                    else:
                        ref, t = _ttft_full(model, ids, args.new_tokens, device)
                        refs.append(ref)
                        full_s.append(t)
            (matched_tokens,) = matched  # the store does not change between the runs of a turn
            t0 = time.perf_counter()
            stored = store.update(out, cache)
            update_s = time.perf_counter() - t0
            reply = out[0, ids.shape[1]:].tolist()
            plan = cache.reuse_plan.choice if getattr(cache, "reuse_plan", None) is not None else "load"
            results.append({"turn": turn + 1, "prompt_tokens": ids.shape[1], "matched_tokens": matched_tokens,
                            "plan": plan,
                            "prefilled_tokens": ids.shape[1] - matched_tokens,
                            **_summary(full_s, reuse_s, matched_tokens),
                            "store_update_s": update_s, "stored_tokens": stored,
                            "reply": decode_ids(reply, tokenizer) if tokenizer is not None else None,
                            "identical": all(torch.equal(refs[0], o) for o in refs + outs)})
            history = out[0].tolist()
    finally:
        store.close()
        if own_root:
            shutil.rmtree(own_root, ignore_errors=True)
    return results


def _ms_spread(median_s: float, runs_s: list[float]) -> str:
    return f"{median_s * 1e3:.1f} ms ({min(runs_s) * 1e3:.1f}-{max(runs_s) * 1e3:.1f})"


def _speedup(r: dict[str, Any]) -> str:
    if r["speedup"] is None:
        return "—"  # nothing was reused: no claim
    return f"{r['speedup']:.2f}x" + (" noisy" if r["noisy"] else "")


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print the per-turn table; 0 only if every turn's output is identical with reuse.

    Raises
    ------
    ConfigError
        A bad flag (see :func:`run`); ``kvstream`` prints it as one line.
    """
    from rich.console import Console
    from rich.table import Table

    args = _parse(list(argv or []))
    console = Console(width=max(Console().width, 132))
    with console.status(f"running the conversation (each turn {2 * args.repeats} times: without and with reuse, "
                        "alternating)"):
        results = run(args)
    dtype = args.dtype or "float32"
    t = Table(title=f"kvstream chat-demo — {args.model or args.arch} on {args.device} ({dtype}), "
                    f"{args.store} store, {args.new_tokens} new tokens per turn",
              caption=f"TTFT: median of {args.repeats} alternating runs of each side (min-max); a speed-up is "
                      "noisy when the two ranges overlap, and none (—) is claimed for a turn that reused nothing")
    for col in ("turn", "prompt tokens", "matched", "plan", "prefilled", "TTFT no reuse", "TTFT reuse", "speed-up",
                "identical", "store update"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["turn"]), str(r["prompt_tokens"]), str(r["matched_tokens"]), r["plan"], str(r["prefilled_tokens"]),
                  _ms_spread(r["ttft_full_s"], r["ttft_full_runs_s"]),
                  _ms_spread(r["ttft_reuse_s"], r["ttft_reuse_runs_s"]), _speedup(r),
                  "[green]yes[/green]" if r["identical"] else "[red]NO[/red]", f"{r['store_update_s'] * 1e3:.1f} ms")
    console.print(t)
    for r in results:
        if r["reply"] is not None:
            console.print(f"turn {r['turn']} reply: {r['reply']!r}", markup=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["identical"] for r in results)
    if not ok:
        console.print("[red]outputs differ with reuse[/red]")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
