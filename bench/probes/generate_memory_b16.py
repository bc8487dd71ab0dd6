"""B16 P2000: KV resident and peak of DynamicCache and StreamingCache -> HostTransport, 16 new tokens, as the
generate bench measures them (the largest memory_allocated at the generate streamer's puts, minus the baseline;
the first put comes right after the prefill). The packed prefill chunks that the streamer holds show here.
``PYTHONPATH=$PWD python3 bench/probes/generate_memory_b16.py`` (on the GPU machine)."""
import sys, torch
from kvstream.bench.generate import generate_once
from kvstream.integrations.hf import StreamingCache
from kvstream.models import build_model, llama3_8b_config, batch_of_prompts
from kvstream.transports.host import HostTransport
from transformers import DynamicCache
cfg = llama3_8b_config(32)
m = build_model(cfg, device="cuda", dtype=torch.bfloat16).eval()
ids = batch_of_prompts(16, 2000, device="cuda")
T = 16
t = HostTransport(capacity_bytes=int(32 * 2 * 16 * 8 * 128 * 2 * (2000 + T) * 1.25) + (64 << 20), preallocate=True)
dev = torch.device("cuda")
for i in range(2):
    for kind in ("dynamic", "stream-host"):
        mk = (lambda: DynamicCache(config=cfg)) if kind == "dynamic" else (lambda: StreamingCache(config=cfg, transport=t, session=f"s{i}"))
        r = generate_once(m, ids, mk, T, dev)
        print(f"{kind:12s} rep {i}: total {r.total_s:.2f} s prefill {r.prefill_s*1e3:.0f} ms  KV resident {r.kv_resident_bytes/1e9:.3f} GB  peak {r.peak_bytes/1e9:.3f} GB", flush=True)
        for k in t.keys():
            t.delete(k)
