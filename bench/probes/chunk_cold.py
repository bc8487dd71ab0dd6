"""Why the static chunk step costs 3-7x inside the hook what it costs in a tight loop: the same
``scatter_planned`` call (B16, 16 tokens of 32 layers, 32 MiB) timed in a tight loop and after each of five
interludes: a CPU-cache thrash (Python work over ~16 MiB, no CUDA), a 2 ms sleep, a device synchronize, 64 tiny
kernel launches, and the hook's own 31 static layer updates. ``PYTHONPATH=$PWD python3 bench/probes/chunk_cold.py``."""
import statistics, time, torch
from _chunk_setup import prefilled

reps = 200
with torch.inference_mode():
    c = prefilled("cold", reps * 7)
    L, H, D, B, P, dt, cfg, t, chunk = c.L, c.H, c.D, c.B, c.P, c.dt, c.cfg, c.t, c.chunk
    kp, vp, plan, s, thrash = c.kp, c.vp, c.plan, c.s, c.thrash
    tiny = torch.zeros(16, device="cuda")
    new = [torch.randn(B, 1, H, D, device="cuda", dtype=dt).transpose(1, 2) for _ in range(2)]
    pos = torch.tensor([P], device="cuda")

    def launches():
        for _ in range(64):
            tiny.add_(1)

    from transformers import StaticCache
    other = StaticCache(config=cfg, max_cache_len=P + 512)  # the hook's other work: 31 layer updates of a static cache
    for l in range(L):
        other.update(kp, vp, l, {"cache_position": torch.arange(P, device="cuda")})
    done = [0]

    def updates():
        done[0] += 1
        if done[0] % 400 == 0:  # transformers >= 5.2x counts positions itself: keep inside max_cache_len
            other.reset()
        for l in range(L - 1):
            other.update(new[0], new[1], l, {"cache_position": pos})

    interludes = {"tight": None, "thrash": thrash, "sleep2ms": lambda: time.sleep(0.002),
                  "sync": torch.cuda.synchronize, "64 launches": launches, "31 updates": updates}
    res = {k: [] for k in interludes}
    n = [0]

    def one(before):
        torch.cuda.synchronize()
        if before is not None:
            before()
        t0 = time.perf_counter_ns()
        s.scatter_planned(f"cold/c{n[0]}", plan, P)
        t1 = time.perf_counter_ns()
        n[0] += 1
        return (t1 - t0) / 1e3

    for name, f in interludes.items():  # warm-up
        for _ in range(5):
            one(f)
    s.wait()
    for r in range(reps):
        for name, f in interludes.items():
            res[name].append(one(f))
        if r % 50 == 49:
            s.wait()
            for k in t.keys("cold/"):
                t.delete(k)
    s.wait()
    print(f"B{B}: scatter_planned of a {chunk >> 20} MiB chunk, host us over {reps} calls each (interleaved)")
    for name, v in res.items():
        v.sort()
        print(f"  {name:12s} p50 {statistics.median(v):7.1f}  p10 {v[len(v) // 10]:7.1f}  p90 {v[9 * len(v) // 10]:7.1f}  "
              f"min {v[0]:7.1f}")
