"""Where KVStreamer.scatter's host time goes at 4 MiB chunks (32 of them), on the GPU: the bench's loop, cProfile,
then the host us of each piece (scatter_pieces.py). ``PYTHONPATH=$PWD python bench/probes/profile_scatter.py``."""
import cProfile, pstats, time, torch
from kvstream.layout import Region
from kvstream.streaming.streamer import KVStreamer
from kvstream.transports.host import HostTransport
n, T = 32, 1024  # B16 H8 D128 bf16, 1024 tokens of one layer = 64 MiB; 4 MiB = 64 tokens
keys = [torch.randn(16, 8, 128, 128, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
values = [torch.randn_like(k) for k in keys]
regions = [Region(layers=(l, l + 1), tokens=(0, 64)) for l in range(n)]
t = HostTransport(capacity_bytes=2 * n * (4 << 20) + (1 << 20)); s = KVStreamer(t, device="cuda")
print("level", s.level)
def go():
    for l, r in enumerate(regions):
        s.scatter(f"s{l}", keys, values, r)
    s.wait()
for _ in range(3): go()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(10): go()
torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / 10
print(f"us per scatter {dt / n * 1e6:.1f}  GB/s {n * (4 << 20) / dt / 1e9:.1f}")
def host_only():
    for l, r in enumerate(regions):
        s.scatter(f"s{l}", keys, values, r)
torch.cuda.synchronize(); t0 = time.perf_counter(); host_only(); h = time.perf_counter() - t0; s.wait()
print(f"host us per scatter call (not waiting) {h / n * 1e6:.1f}")
pr = cProfile.Profile(); pr.enable()
for _ in range(5): go()
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(25)

from scatter_pieces import pieces, print_rows  # noqa: E402 (beside this script)

print_rows(pieces(torch.device("cuda", torch.cuda.current_device()), big=True),
           "host us per piece on the GPU machine, 4 MiB one-layer chunks")
