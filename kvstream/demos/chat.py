"""``kvstream chat-demo``: a multi-turn conversation where each turn reuses the KV of the turns before it.

Each turn's prompt is the whole conversation so far (every earlier prompt and reply) plus a new user
message, so all but the new message was already computed. Per turn the demo

1. generates with a fresh ``DynamicCache`` (no reuse): full prefill, the reference tokens and TTFT;
2. looks the prompt up in a prefix store (:class:`~kvstream.RadixStore` in host memory, or
   :class:`~kvstream.ChunkFileStore` on disk), pre-fills a cache with the matched prefix
   (:func:`~kvstream.stores.reuse.load_prefix_into`) and generates: only the new tokens are prefilled;
   its TTFT includes the lookup and the load;
3. stores the turn's KV for the next turn (``store.update(out, cache)``);
4. checks the tokens of 1 and 2 are identical.

The time to first token (TTFT) is taken when ``generate`` hands its first new token to a streamer.
Exit status 0 only if every turn's tokens are identical with and without reuse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from typing import Any

import torch


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvstream chat-demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local checkpoint directory (config.json + weights); default: the embedded Llama")
    p.add_argument("--arch", default="llama", help="embedded architecture on the CPU: llama (default), gpt2, opt, "
                   "bloom, qwen2, mistral")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (Llama-3-8B shapes)")
    p.add_argument("--dtype", help="float32 (default: an exact check) or bfloat16")
    p.add_argument("--layers", type=int, help="decoder layers of the embedded model (default: 4 on cpu, 32 on cuda)")
    p.add_argument("--store", choices=("radix", "file", "tiered"), default="radix",
                   help="prefix store (default: radix; tiered: host memory in front of the files)")
    p.add_argument("--plan", action="store_true", help="reuse by measured cost (StreamingCache.from_prefix(model=...):"
                   " load, recompute or both at once) instead of always loading")
    p.add_argument("--root", help="directory of the file store (default: a temporary directory, removed after)")
    p.add_argument("--chunk-tokens", type=int, default=16, help="tokens per file-store chunk (default: 16)")
    p.add_argument("--turns", type=int, default=4, help="conversation turns (default: 4)")
    p.add_argument("--turn-tokens", type=int, help="tokens of each user message (default: 192 on cpu, 1024 on cuda)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per turn (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights")
    p.add_argument("--json", help="also write the per-turn results to this JSON file")
    return p.parse_args(argv)


def _build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from ..models import build_model, llama3_8b_config, load_model, tiny_config

    if args.model:
        return load_model(args.model, device=device, dtype=dtype)
    if device.type == "cuda":
        config = llama3_8b_config(num_layers=args.layers or 32)
    else:
        config = tiny_config(args.arch, num_layers=args.layers or 4)
        if args.arch == "llama":  # a little wider than the test model, so prefill time is visible
            config.hidden_size, config.intermediate_size, config.num_attention_heads = 256, 512, 8
            config.num_key_value_heads, config.head_dim = 4, 32
    return build_model(config, seed=args.seed, device=device, dtype=dtype)


class _FirstToken:
    """A ``generate`` streamer that records when the first new token arrives (the prompt comes first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        """Queue one line of the turn's report."""
        self.calls += 1
        if self.calls == 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        """Print the queued report lines."""
        pass


def _generate(model, ids: torch.Tensor, new_tokens: int, cache, streamer: _FirstToken) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the conversation; one result dict per turn (tokens, matched, TTFTs, identical)."""
    from transformers import DynamicCache

    from ..models import encode_text, prompts
    from ..integrations.hf.cache import StreamingCache
    from ..integrations.hf.prefix import load_prefix_into

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or "float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 check
    turn_tokens = args.turn_tokens or (1024 if device.type == "cuda" else 192)
    model = _build(args, device, dtype)
    namespace = f"chat-demo:{args.model or args.arch}:{args.seed}:{dtype}"
    store, own_root = _make_store(args, namespace)
    texts = prompts()
    results = []
    try:
        warm = torch.tensor([encode_text(texts[0], 32)], device=device)
        _generate(model, warm, 2, DynamicCache(config=model.config), _FirstToken(device))  # not timed
        history: list[int] = []
        for turn in range(args.turns):
            user = encode_text(texts[(turn + 1) % len(texts)], turn_tokens)
            ids = torch.tensor([history + user], device=device)

            streamer = _FirstToken(device)
            t0 = time.perf_counter()
            ref = _generate(model, ids, args.new_tokens, DynamicCache(config=model.config), streamer)
            ttft_full = streamer.at - t0

            streamer = _FirstToken(device)
            t0 = time.perf_counter()
            if args.plan:
                cache = StreamingCache.from_prefix(store, ids, model=model, device=device)
                matched, plan = cache.matched_tokens, cache.reuse_plan.choice
            else:
                cache = DynamicCache(config=model.config)
                matched, plan = load_prefix_into(cache, store, ids, device=device), "load"
            out = _generate(model, ids, args.new_tokens, cache, streamer)
            ttft_reuse = streamer.at - t0

            t0 = time.perf_counter()
            stored = store.update(out, cache)
            update_s = time.perf_counter() - t0
            results.append({"turn": turn + 1, "prompt_tokens": ids.shape[1], "matched_tokens": matched, "plan": plan,
                            "prefilled_tokens": ids.shape[1] - matched, "ttft_full_s": ttft_full,
                            "ttft_reuse_s": ttft_reuse, "store_update_s": update_s, "stored_tokens": stored,
                            "identical": bool(torch.equal(ref, out))})
            history = out[0].tolist()
    finally:
        store.close()
        if own_root:
            shutil.rmtree(own_root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print the per-turn table; 0 only if every turn's output is identical with reuse."""
    from rich.console import Console
    from rich.table import Table

    args = _parse(list(argv or []))
    console = Console(width=max(Console().width, 112))
    with console.status("running the conversation (each turn twice: without and with reuse)"):
        results = run(args)
    dtype = args.dtype or "float32"
    t = Table(title=f"kvstream chat-demo — {args.model or args.arch} on {args.device} ({dtype}), "
                    f"{args.store} store, {args.new_tokens} new tokens per turn")
    for col in ("turn", "prompt tokens", "matched", "plan", "prefilled", "TTFT no reuse", "TTFT reuse", "speed-up",
                "identical", "store update"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["turn"]), str(r["prompt_tokens"]), str(r["matched_tokens"]), r["plan"], str(r["prefilled_tokens"]),
                  f"{r['ttft_full_s'] * 1e3:.1f} ms", f"{r['ttft_reuse_s'] * 1e3:.1f} ms",
                  f"{r['ttft_full_s'] / max(r['ttft_reuse_s'], 1e-9):.2f}x",
                  "[green]yes[/green]" if r["identical"] else "[red]NO[/red]", f"{r['store_update_s'] * 1e3:.1f} ms")
    console.print(t)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["identical"] for r in results)
    if not ok:
        console.print("[red]outputs differ with reuse[/red]")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
