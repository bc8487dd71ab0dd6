"""Shared by chunk_cold.py and chunk_pieces.py: a StreamingStaticCache of Llama-3-8B's KV shape prefilled with
P=512 tokens on the GPU, its 16-token chunk plan, and a 16 MiB Python thrash (what a forward does to the host's
caches)."""
import sys
from types import SimpleNamespace

import torch
from kvstream.integrations.hf import StreamingStaticCache
from kvstream.models import llama3_8b_config
from kvstream.transports.host import HostTransport


def prefilled(session: str, chunks: int) -> SimpleNamespace:
    """Batch from argv[1] (default 16); the transport holds ``chunks`` chunks. Call under inference_mode."""
    L, H, D, P, N = 32, 8, 128, 512, 16
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    cfg = llama3_8b_config(L)
    chunk = L * 2 * B * H * N * D * 2
    t = HostTransport(capacity_bytes=chunk * chunks + (64 << 20), preallocate=True)
    cache = StreamingStaticCache(cfg, P + 64, t, session=session)
    dt = torch.bfloat16
    kp, vp = (torch.randn(B, H, P, D, device="cuda", dtype=dt) for _ in range(2))
    for l in range(L):
        cache.update(kp, vp, l)
    torch.cuda.synchronize()
    junk = list(range(1 << 20))  # ~16 MiB of int objects and pointers

    def thrash():
        x = 0
        for v in junk:
            x += v
        return x

    return SimpleNamespace(L=L, H=H, D=D, B=B, P=P, N=N, cfg=cfg, chunk=chunk, t=t, cache=cache, dt=dt, kp=kp, vp=vp,
                           plan=cache._plan(N, None, None), s=cache.streamer, thrash=thrash)
