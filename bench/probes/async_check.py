"""Is a HostTransport flush asynchronous? Host time of flushing a 256 MiB chunk (a ~5 ms copy)."""
import time, torch
from kvstream.transports.host import HostTransport
from kvstream.cuda.streams import memcpy_async
big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
for pre in (True, False):
    t = HostTransport(capacity_bytes=2 << 30, preallocate=pre)
    for i in range(4):
        torch.cuda.synchronize(); t0 = time.perf_counter(); h = t.flush(f"k{i}", big); t1 = time.perf_counter(); h.wait(); t2 = time.perf_counter()
        print(f"preallocate={pre}: flush returned after {1e3*(t1-t0):.3f} ms, landed after {1e3*(t2-t0):.3f} ms", flush=True)
    t.close()
pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
for i in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter(); memcpy_async(pinned, big); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"memcpy_async into torch pinned: returned {1e3*(t1-t0):.3f} ms, done {1e3*(t2-t0):.3f} ms", flush=True)
for i in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter(); pinned.copy_(big, non_blocking=True); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"torch copy_ non_blocking: returned {1e3*(t1-t0):.3f} ms, done {1e3*(t2-t0):.3f} ms", flush=True)
