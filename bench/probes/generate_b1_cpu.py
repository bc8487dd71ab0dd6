"""The B1 gap on the CPU: a host-bound decode (tiny 32-layer Llama, float32, one thread, B1, prompt 64, 128 new
tokens) of DynamicCache and StreamingCache -> HostTransport, alternating, through the bench's generate_once: what
kvstream's host work adds per token when nothing else is noisy. ``PYTHONPATH=$PWD python bench/probes/generate_b1_cpu.py [tokens] [pairs]``."""
import statistics, sys, torch
from transformers import DynamicCache
from kvstream.bench.generate import generate_once
from kvstream.integrations.hf import StreamingCache
from kvstream.models import build_model, tiny_config
from kvstream.transports.host import HostTransport
torch.set_num_threads(1)
cfg = tiny_config("llama", num_layers=32)
m = build_model(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 64))
T = int(sys.argv[1]) if len(sys.argv) > 1 else 128
t = HostTransport(capacity_bytes=1 << 30)
dev = torch.device("cpu")
res = {"d": [], "s": []}
with torch.inference_mode():
    for i in range(-1, int(sys.argv[2]) if len(sys.argv) > 2 else 8):
        for kind in (("d", "s") if i % 2 == 0 else ("s", "d")):
            make = (lambda: DynamicCache(config=cfg)) if kind == "d" else (lambda i=i: StreamingCache(config=cfg, transport=t, session=f"g{i}{kind}"))
            r = generate_once(m, ids, make, T, dev)
            if i >= 0:
                res[kind].append(r)
            for k in t.keys():
                t.delete(k)
d = [r.per_token_s * 1e3 for r in res["d"]]; s = [r.per_token_s * 1e3 for r in res["s"]]
print("per token ms dynamic", [round(x, 2) for x in d]); print("per token ms stream ", [round(x, 2) for x in s])
print(f"medians {statistics.median(d):.3f} vs {statistics.median(s):.3f}: {statistics.median(s) / statistics.median(d) - 1:+.1%}; "
      f"paired {statistics.median(b / a for a, b in zip(d, s)) - 1:+.1%}")
print("tokens identical:", all(torch.equal(a.tokens, b.tokens) for a, b in zip(res["d"], res["s"])))
