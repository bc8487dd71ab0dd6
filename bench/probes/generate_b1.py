"""Why StreamingCache -> HostTransport ran +24 % over DynamicCache at B1 (Llama-3-8B shape, P512) in generate:
alternating timings, a cProfile of each (top functions by own time), and the synchronizing CUDA calls each makes
(torch.cuda.set_sync_debug_mode), counted by the Python line that made them."""
import collections, cProfile, pstats, sys, time, warnings
import torch
from transformers import DynamicCache
from kvstream.integrations.hf import StreamingCache
from kvstream.models import build_model, llama3_8b_config
from kvstream.transports.host import HostTransport

cfg = llama3_8b_config(32)
m = build_model(cfg, device="cuda", dtype=torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda")
mask = torch.ones_like(ids)
t = HostTransport(capacity_bytes=2 << 30, preallocate=True)


def gen(kind, i, n=64):
    c = DynamicCache(config=cfg) if kind == "d" else StreamingCache(config=cfg, transport=t, session=f"p{i}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.generate(ids, attention_mask=mask, past_key_values=c, max_new_tokens=n, min_new_tokens=n, do_sample=False,
               pad_token_id=0)
    if kind == "s":
        c.wait()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if kind == "s":
        for k in t.keys(f"p{i}/"):
            t.delete(k)
    return dt


with torch.inference_mode():
    gen("d", 0); gen("s", 0)
    for i in range(3):
        print(f"rep {i}: dynamic {gen('d', i):.3f} s  stream {gen('s', i + 1):.3f} s", flush=True)
    for kind in "ds":
        pr = cProfile.Profile(); pr.enable(); gen(kind, 50); pr.disable()
        print(f"\n--- cProfile {kind}")
        pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(22)
    for kind in "ds":
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            gen(kind, 60, n=16)
            torch.cuda.set_sync_debug_mode(0)
        where = collections.Counter(f"{w.filename}:{w.lineno}" for w in ws if "synchroniz" in str(w.message))
        print(f"\n--- synchronizing calls, {kind}: {sum(where.values())}")
        for k, v in where.most_common(15):
            print(f"{v:5d} {k}")
