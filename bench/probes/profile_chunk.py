"""Host µs of each piece of the hook's chunk step on the GPU (B1, 32 layers, 16 tokens)."""
import statistics, time, torch
from kvstream.layout import Region
from kvstream.streaming.streamer import KVStreamer
from kvstream.transports.host import HostTransport
from kvstream import kernels
L, B, H, D, T = 32, 1, 8, 128, 16
dt = torch.bfloat16
ks = [torch.randn(B, H, 600, D, device="cuda", dtype=dt) for _ in range(L)]
vs = [torch.randn_like(k) for k in ks]
t = HostTransport(capacity_bytes=1 << 30, preallocate=True)
s = KVStreamer(t, device="cuda")
def timeit(name, fn, n=60):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    xs = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter_ns(); fn(); xs.append((time.perf_counter_ns() - t0) / 1e3)
    print(f"{name:40s} p50 {statistics.median(xs):8.1f} us  min {min(xs):8.1f}", flush=True)
with torch.inference_mode():
    timeit("64 narrow", lambda: [k.narrow(2, 580, T) for k in ks + vs])
    timeit("64 slice [:, :, -T:]", lambda: [k[:, :, -T:] for k in ks + vs])
    parts = [x for kv in zip(ks, vs) for x in kv]
    views = [p.narrow(2, 580, T) for p in parts]
    timeit("torch.stack 64 views", lambda: torch.stack(views))
    out = torch.empty((64, B, H, T, D), device="cuda", dtype=dt)
    timeit("torch.stack 64 views out=", lambda: torch.stack(views, out=out))
    chunk = torch.stack(views).view(L, 2, B, H, T, D)
    i = [0]
    def fl():
        i[0] += 1; s.flush(f"f{i[0] % 50}", chunk).wait()
    timeit("streamer.flush + wait", fl)
    def fl2():
        i[0] += 1; t.flush(f"g{i[0] % 50}", chunk)
    timeit("HostTransport.flush (no wait)", fl2)
    def ss():
        i[0] += 1; s.scatter_step(f"s{i[0] % 50}", [k.narrow(2, 580, T) for k in ks], [v.narrow(2, 580, T) for v in vs])
    timeit("scatter_step incl narrows (no wait)", ss)
    s.wait()
    plan = kernels.plan_newest(ks, vs, num_tokens=T)
    def sp():
        i[0] += 1; s.scatter_planned(f"p{i[0] % 50}", plan, 580)
    timeit("scatter_planned (no wait)", sp)
    s.wait()
    timeit("plan launch only", lambda: plan.run(580))
    s.wait()
    timeit("64 data_ptr", lambda: [p.data_ptr() for p in parts])
    timeit("torch.empty pinned-free device 128KiB", lambda: torch.empty(65536, device="cuda", dtype=dt))
    import cProfile, pstats, io
    pr = cProfile.Profile(); pr.enable()
    for _ in range(200):
        i[0] += 1; s.scatter_step(f"s{i[0] % 50}", [k.narrow(2, 580, T) for k in ks], [v.narrow(2, 580, T) for v in vs])
    pr.disable(); s.wait()
    o = io.StringIO(); pstats.Stats(pr, stream=o).sort_stats("tottime").print_stats(25); print(o.getvalue()[:6000])
    pr = cProfile.Profile(); pr.enable()
    for _ in range(200):
        i[0] += 1; s.scatter_planned(f"p{i[0] % 50}", plan, 580)
    pr.disable(); s.wait()
    o = io.StringIO(); pstats.Stats(pr, stream=o).sort_stats("tottime").print_stats(25); print(o.getvalue()[:6000])
