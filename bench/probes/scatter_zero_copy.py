"""The next step for ``streamer_d2h_small_vs_memcpy``: one-layer chunks packed straight into pinned host memory
(zero-copy, as the decode chunks are: :func:`kvstream.streaming.inplace.positions_in_place`), against
``KVStreamer.scatter`` (pack on the compute stream, copy on the side stream) and a plain ``cudaMemcpyAsync`` of the
same bytes, 32 chunks of 4 MiB (B16 H8 D128 bf16, 64 tokens of each layer), alternating rounds; every stored
chunk checked bit-exactly. Also the compute stream's time per chunk (the zero-copy pack holds it for the PCIe
time; the device pack for a device copy) and the host µs per call.
``PYTHONPATH=$PWD python3 bench/probes/scatter_zero_copy.py [rounds] [device]`` (device ``cuda``, or ``cpu`` to
check the probe itself)."""
import statistics, sys, time, torch
from kvstream.bench.timing import alternating
from kvstream.kernels import reference
from kvstream.layout import Region
from kvstream.streaming.inplace import positions_in_place
from kvstream.streaming.streamer import KVStreamer
from kvstream.transports.host import HostTransport

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
cuda = dev.type == "cuda"
n, B, H, S, T, D = (32, 16, 8, 128, 64, 128) if cuda else (4, 2, 2, 16, 8, 16)
dt = torch.bfloat16 if cuda else torch.float32
g = torch.Generator(device="cpu").manual_seed(0)
keys = [torch.randn(B, H, S, D, generator=g).to(dev, dt) for _ in range(n)]
values = [torch.randn(B, H, S, D, generator=g).to(dev, dt) for _ in range(n)]
chunk_bytes = 2 * B * H * T * D * keys[0].element_size()
t = HostTransport(capacity_bytes=4 * n * chunk_bytes + (1 << 20), preallocate=True)
s = KVStreamer(t, device=dev)
plans: dict = {}
src = [torch.empty(chunk_bytes // 2, device=dev, dtype=torch.bfloat16 if cuda else torch.float16) for _ in range(n)]
dst = [torch.empty_like(x, device="cpu", pin_memory=cuda) for x in src]


def sync():
    if cuda:
        torch.cuda.synchronize(dev)


def memcpy():
    for a, b in zip(dst, src):
        a.copy_(b, non_blocking=True)
    sync()


def scatter():
    for l in range(n):
        s.scatter(f"s{l}", keys, values, Region(layers=(l, l + 1), tokens=(0, T)))
    s.wait()


def zero_copy():
    for l in range(n):
        h = positions_in_place(s, plans, f"z{l}", [keys[l]], [values[l]], 0, T, None)
        if h is None:
            raise RuntimeError("the zero-copy plan does not fit a layer")
    s.wait()


fns = {"memcpy": memcpy, "scatter": scatter, "zero-copy": zero_copy}
for f in fns.values():  # warm-up: plans, pinned slots, kernels
    f()
ms = {k: [] for k in fns}
for _, name in alternating(list(fns), rounds):
    sync()
    t0 = time.perf_counter()
    fns[name]()
    ms[name].append((time.perf_counter() - t0) * 1e3)
total = n * chunk_bytes
gbps = {k: total / 1e9 / (statistics.median(v) / 1e3) for k, v in ms.items()}
for k, v in ms.items():
    print(f"{k:10s} median {statistics.median(v):7.3f} ms  min {min(v):7.3f}  max {max(v):7.3f}  {gbps[k]:6.2f} GB/s  "
          f"over memcpy {gbps[k] / gbps['memcpy']:.3f}")
for l in range(n):  # bit-exact: both ways store the region's packed chunk
    want = reference.pack_tokens([k.cpu() for k in keys[l:l + 1]], [v.cpu() for v in values[l:l + 1]],
                                 Region(layers=(0, 1), tokens=(0, T)))
    for key in (f"s{l}", f"z{l}"):
        got = t.fetch_new(key).view(want.shape)
        if not torch.equal(got, want):
            raise RuntimeError(f"{key}: stored chunk differs from the region")
print("every chunk bit-exact")
for name in ("scatter", "zero-copy"):  # host us per call, not waiting
    sync()
    t0 = time.perf_counter()
    for l in range(n):
        if name == "scatter":
            s.scatter(f"s{l}", keys, values, Region(layers=(l, l + 1), tokens=(0, T)))
        else:
            positions_in_place(s, plans, f"z{l}", [keys[l]], [values[l]], 0, T, None)
    host = (time.perf_counter() - t0) / n * 1e6
    s.wait()
    print(f"{name:10s} host us per call {host:6.1f}")
if cuda:  # the compute stream's time per chunk: what the model would wait for, in order
    for name, one in (("device pack (torch.stack)", lambda l: torch.stack([keys[l][:, :, :T], values[l][:, :, :T]])),
                      ("zero-copy pack", lambda l: positions_in_place(s, plans, f"z{l}", [keys[l]], [values[l]], 0, T, None))):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for l in range(n):
            one(l)
        e1.record()
        e1.synchronize()
        s.wait()
        print(f"{name:26s} compute-stream us per chunk {e0.elapsed_time(e1) / n * 1e3:7.1f}")
