"""The static chunk step's pieces, each timed cold (after a ~16 MiB Python thrash, as inside a model's forward)
and hot (tight), B16 (32 MiB chunk): which host calls the cold chunk step pays for, and the zero-copy chunk
(the plan's pack straight into the transport's pinned buffer) against pack + copy.
``PYTHONPATH=$PWD python3 bench/probes/chunk_pieces.py [batch]``."""
import statistics, time, torch
from kvstream.cuda import Event, current_stream_handle, memcpy_async
from kvstream.cuda import streams as _streams
from kvstream.chunk import NO_CHECKSUM, chunk_header
from _chunk_setup import prefilled

reps = 60
dev = torch.device("cuda")
with torch.inference_mode():
    c = prefilled("pieces", 40)
    B, P, dt, t, chunk, plan, s, thrash = c.B, c.P, c.dt, c.t, c.chunk, c.plan, c.s, c.thrash
    devchunk = plan.run(P)
    ev = Event(dev)
    rt = _streams._cudart()
    header = chunk_header(devchunk, None, None, NO_CHECKSUM)
    n = [0]

    def key():
        n[0] += 1
        return f"pieces/k{n[0]}"

    def zero_copy():
        def copy_in(buf):
            plan.run(P, out=buf.view(dt).view(plan.shape))
            return Event(dev).record(current_stream_handle(dev))
        return t._store(key(), header, copy_in)

    def with_side():
        with s.side:
            pass

    bufs = []
    pieces = {
        "nothing": lambda: None,
        "cudaEventRecord (cuda-python)": lambda: rt.cudaEventRecord(ev._raw, current_stream_handle(dev)),
        "kvstream Event()": lambda: Event(dev),
        "torch.cuda.Event().record()": lambda: torch.cuda.Event().record(),
        "torch.empty 32 MiB cuda": lambda: torch.empty(plan.shape, dtype=dt, device=dev),
        "arena alloc": lambda: bufs.append(t._alloc(chunk)),
        "memcpy_async D2H": lambda: memcpy_async(bufs[-1] if bufs else t._alloc(chunk), devchunk, current_stream_handle(dev)),
        "with side: pass": with_side,
        "plan.run (device out)": lambda: plan.run(P),
        "plan.run (pinned out, zero-copy)": lambda: plan.run(P, out=t._alloc(chunk).view(dt).view(plan.shape)),
        "HostTransport.flush": lambda: t.flush(key(), devchunk),
        "scatter_planned (zero-copy)": lambda: s.scatter_planned(key(), plan, P),
        "pack + side-stream copy (before)": lambda: s._pack_and_flush(key(), lambda: plan.run(P), None, None, True),
        "plan.run_into (raw pointers)": lambda: plan.run_into(P, bufs[-1] if bufs else t._alloc(chunk)),
        "zero-copy _store": zero_copy,
    }

    res = {(k, m): [] for k in pieces for m in ("cold", "hot")}
    for r in range(reps + 3):
        for name, f in pieces.items():
            for mode in ("cold", "hot"):
                torch.cuda.synchronize()
                if mode == "cold":
                    thrash()
                t0 = time.perf_counter_ns()
                f()
                t1 = time.perf_counter_ns()
                if r >= 3:
                    res[(name, mode)].append((t1 - t0) / 1e3)
            if len(bufs) > 4:
                bufs.clear()
        torch.cuda.synchronize()
        s.wait()
        for k in t.keys("pieces/"):
            t.delete(k)
    print(f"B{B}, {chunk >> 20} MiB chunk: host us, median (p10-p90) over {reps}")
    for name in pieces:
        c, h = sorted(res[(name, 'cold')]), sorted(res[(name, 'hot')])
        print(f"  {name:34s} cold {statistics.median(c):7.1f} ({c[len(c) // 10]:6.1f}-{c[9 * len(c) // 10]:6.1f})  "
              f"hot {statistics.median(h):7.1f} ({h[len(h) // 10]:6.1f}-{h[9 * len(h) // 10]:6.1f})")
    # the zero-copy chunk is the planned pack: check it bit-exactly against the device pack
    out = t._alloc(chunk).view(dt).view(plan.shape)
    plan.run(P, out=out)
    torch.cuda.synchronize()
    print("zero-copy chunk equals the device pack:", torch.equal(out.view(torch.int16), plan.run(P).cpu().view(torch.int16)))
