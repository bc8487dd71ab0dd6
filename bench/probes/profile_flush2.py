"""HostTransport.flush inside the hook vs standalone: callees (cProfile) on the GPU."""
import cProfile, io, pstats, statistics, time, torch
from kvstream.transports.host import HostTransport
t = HostTransport(capacity_bytes=2 << 30, preallocate=True)
chunk = torch.randn(32, 2, 1, 8, 16, 128, device="cuda").to(torch.bfloat16)
meta = {"session": "x", "run": "abc", "model": "m"}
def run(label, keys, n=200, prof=False):
    xs = []
    pr = cProfile.Profile() if prof else None
    for i in range(n):
        torch.cuda.synchronize()
        if pr: pr.enable()
        t0 = time.perf_counter_ns(); t.flush(keys(i), chunk, meta=meta); xs.append((time.perf_counter_ns() - t0) / 1e3)
        if pr: pr.disable()
    print(f"{label:40s} p50 {statistics.median(xs):7.1f} min {min(xs):7.1f} max {max(xs):7.1f} (stored {len(t.keys(''))})", flush=True)
    if pr:
        o = io.StringIO(); st = pstats.Stats(pr, stream=o); st.sort_stats("tottime").print_stats(18); print(o.getvalue()[:4000])
run("reused keys (50)", lambda i: f"r/{i % 50}")
run("new keys", lambda i: f"n/{i}")
run("new keys", lambda i: f"m/{i}")
run("reused keys (50)", lambda i: f"r/{i % 50}")
run("new keys, profiled", lambda i: f"p/{i}", prof=True)
run("reused keys, profiled", lambda i: f"r/{i % 50}", prof=True)
