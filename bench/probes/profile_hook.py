"""Where the hook's host time goes on the GPU: per-step (counter) cost and the chunk step, B1, 32 layers."""
import cProfile, io, pstats, sys, time, torch
from transformers import DynamicCache, StaticCache
from kvstream.integrations.hf import StreamingCache, StreamingStaticCache
from kvstream.models import llama3_8b_config
from kvstream.transports.host import HostTransport

L, H, D, B = 32, 8, 128, int(sys.argv[1]) if len(sys.argv) > 1 else 1
cfg = llama3_8b_config(L)
t = HostTransport(capacity_bytes=2 << 30, preallocate=True)
n = 64 + 400
caches = {"dyn": DynamicCache(config=cfg), "stream": StreamingCache(config=cfg, transport=t, session="p1"),
          "static": StaticCache(config=cfg, max_cache_len=n), "sstatic": StreamingStaticCache(cfg, n, t, session="p2")}
dt = torch.bfloat16
prompt = [torch.randn(B, H, 64, D, device="cuda", dtype=dt) for _ in range(2)]
new = [torch.randn(B, 1, H, D, device="cuda", dtype=dt).transpose(1, 2) for _ in range(2 * L)]
with torch.inference_mode():
    for c in caches.values():
        for l in range(L):
            c.update(prompt[0], prompt[1], l)
    def step(c):
        for l in range(L):
            c.update(new[2 * l], new[2 * l + 1], l)
    for _ in range(32):
        for c in caches.values():
            step(c)
    torch.cuda.synchronize()
    # per-step times, all steps, each cache
    for name, c in caches.items():
        ts = []
        for _ in range(64):
            torch.cuda.synchronize(); t0 = time.perf_counter_ns(); step(c); ts.append((time.perf_counter_ns() - t0) / 1e3)
        ts.sort()
        print(f"{name:8s} step us: p50 {ts[32]:.1f} min {ts[0]:.1f} max {ts[-1]:.1f} top4 {[round(x) for x in ts[-4:]]}")
    # the chunk step's parts
    for name in ("stream", "sstatic"):
        c = caches[name]
        orig = c._flush_tail
        acc = []
        def timed(*a, _o=orig, **k):
            t0 = time.perf_counter_ns(); _o(*a, **k); acc.append((time.perf_counter_ns() - t0) / 1e3)
        c._flush_tail = timed
        for _ in range(64):
            torch.cuda.synchronize(); step(c)
        del c._flush_tail
        print(name, "flush_tail us", [round(x) for x in acc])
        pr = cProfile.Profile()
        for _ in range(64):
            torch.cuda.synchronize()
            pr.enable(); step(c); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(40); print(s.getvalue()[:7000])
    c = caches["sstatic"]
    pr = cProfile.Profile()
    for _ in range(15):
        torch.cuda.synchronize(); pr.enable(); step(c); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20); print(s.getvalue()[:5000])
