"""The static/dynamic hook's chunk step on the GPU: its parts timed inside the hook, with and without an empty GPU queue."""
import statistics, sys, time, torch
from transformers import DynamicCache, StaticCache
from kvstream.integrations.hf import StreamingCache, StreamingStaticCache
from kvstream.models import llama3_8b_config
from kvstream.transports.host import HostTransport
L, H, D, B = 32, 8, 128, 1
cfg = llama3_8b_config(L)
t = HostTransport(capacity_bytes=2 << 30, preallocate=True)
n = 64 + 1200
caches = {"stream": StreamingCache(config=cfg, transport=t, session="p1"), "sstatic": StreamingStaticCache(cfg, n, t, session="p2")}
dt = torch.bfloat16
prompt = [torch.randn(B, H, 64, D, device="cuda", dtype=dt) for _ in range(2)]
new = [torch.randn(B, 1, H, D, device="cuda", dtype=dt).transpose(1, 2) for _ in range(2 * L)]
acc = {}
def wrap(obj, name, label):
    orig = getattr(obj, name)
    def f(*a, **k):
        t0 = time.perf_counter_ns(); r = orig(*a, **k); acc.setdefault(label, []).append((time.perf_counter_ns() - t0) / 1e3); return r
    setattr(obj, name, f)
sync_before = {"on": False}
with torch.inference_mode():
    for c in caches.values():
        for l in range(L):
            c.update(prompt[0], prompt[1], l)
    def step(c):
        for l in range(L):
            if sync_before["on"] and l == L - 1:
                torch.cuda.synchronize()
            c.update(new[2 * l], new[2 * l + 1], l)
    for _ in range(32):
        for c in caches.values():
            step(c)
    torch.cuda.synchronize()
    for name, c in caches.items():
        wrap(c, "_flush_tail", f"{name}._flush_tail")
        wrap(c, "_stream_pending", f"{name}._stream_pending")
        s = c.streamer
        wrap(s, "scatter_planned", f"{name}.scatter_planned")
        wrap(s, "scatter_step", f"{name}.scatter_step")
        wrap(s, "flush", f"{name}.streamer.flush")
        wrap(s, "_pack_and_flush", f"{name}._pack_and_flush")
    wrap(t, "flush", "HostTransport.flush")
    wrap(t, "_store", "HostTransport._store")
    wrap(t, "_header", "HostTransport._header")
    from kvstream.kernels.tokens import NewestPlan
    wrap(NewestPlan, "run", "NewestPlan.run (launch)")
    from kvstream.streaming.inflight import InFlight
    wrap(InFlight, "keep_until_read", "InFlight.keep_until_read")
    wrap(InFlight, "track", "InFlight.track")
    for mode in (False, True, False, True):
        sync_before["on"] = mode
        acc.clear()
        for _ in range(64):
            for c in caches.values():
                torch.cuda.synchronize(); step(c)
        print(f"--- sync before the last layer: {mode}")
        for k, v in sorted(acc.items()):
            print(f"{k:32s} n {len(v):3d} p50 {statistics.median(v):8.1f} us  min {min(v):8.1f} max {max(v):8.1f}")
