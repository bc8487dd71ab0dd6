"""The B1 generate gap, second look: the bench's own generate_once (its per-token probe, its gc.collect), 256 new
tokens, dynamic and stream-host alternating, with the cyclic GC's collections and time during each run counted
(gc.callbacks) and kvstream's tracked allocations per run."""
import gc, time, torch
from transformers import DynamicCache
from kvstream.bench.generate import generate_once
from kvstream.integrations.hf import StreamingCache
from kvstream.models import build_model, llama3_8b_config
from kvstream.transports.host import HostTransport

cfg = llama3_8b_config(32)
m = build_model(cfg, device="cuda", dtype=torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda")
kv = 32 * 2 * 8 * 128 * 2 * (512 + 256)
t = HostTransport(capacity_bytes=int(kv * 1.25) + (64 << 20), preallocate=True)
dev = torch.device("cuda")
stats = {"n": [0, 0, 0], "s": 0.0}
t_start = [0.0]


def cb(phase, info):
    if phase == "start":
        t_start[0] = time.perf_counter()
    else:
        stats["n"][info["generation"]] += 1
        stats["s"] += time.perf_counter() - t_start[0]


gc.callbacks.append(cb)
print("gc thresholds", gc.get_threshold(), "objects tracked", len(gc.get_objects()))
with torch.inference_mode():
    for i in range(5):
        for kind in (("d", "s") if i % 2 == 0 else ("s", "d")):
            make = (lambda: DynamicCache(config=cfg)) if kind == "d" else \
                (lambda i=i: StreamingCache(config=cfg, transport=t, session=f"g{i}"))
            stats["n"], stats["s"] = [0, 0, 0], 0.0
            r = generate_once(m, ids, make, 256 if i else 32, dev)
            print(f"rep {i} {kind}: total {r.total_s:.3f} s prefill {r.prefill_s * 1e3:.1f} ms per token "
                  f"{r.per_token_s * 1e3:.2f} ms  gc collections {stats['n']} in {stats['s'] * 1e3:.1f} ms", flush=True)
            for k in t.keys(f"g{i}/"):
                t.delete(k)
