"""A ``generate`` killed by SIGKILL mid-decode resumes from what its stream left: ``StreamingCache.load(...,
recover=True)`` loads the acknowledged prefix (no manifest was written), and the tokens continue exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch
from transformers import DynamicCache

import kvstream
from kvstream.integrations.hf.keywords import cache_kwargs
from kvstream.models import batch_of_prompts, build_model, tiny_config

KILL_AT = 6  # decode steps before the SIGKILL
NEW = 12

PRODUCER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    import kvstream
    from kvstream.integrations.hf.keywords import cache_kwargs
    from kvstream.models import batch_of_prompts, build_model, tiny_config

    root, tokens_path, kill_at, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = build_model(tiny_config("llama"), seed=7)
    ids = batch_of_prompts(2, 20)
    cache = kvstream.StreamingCache(config=model.config, transport=kvstream.DiskTransport(root), session="g")

    class KillAt(StoppingCriteria):  # the tokens so far go where the caller keeps them, then the process dies
        def __init__(self):
            self.steps = 0
        def __call__(self, input_ids, scores, **kw):
            self.steps += 1
            with open(tokens_path, "w") as f:
                json.dump(input_ids.tolist(), f)
            if self.steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), pad_token_id=0,
                       do_sample=False, max_new_tokens=new, stopping_criteria=StoppingCriteriaList([KillAt()]))
""")


def test_generate_killed_mid_decode_resumes_from_the_acked_prefix(tmp_path):
    root, tokens = str(tmp_path / "kv"), tmp_path / "tokens.json"
    proc = subprocess.run([sys.executable, "-c", PRODUCER, root, str(tokens), str(KILL_AT), str(NEW)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    known = torch.tensor(json.loads(tokens.read_text()))  # prompt + the tokens generated before the kill
    model = build_model(tiny_config("llama"), seed=7)
    ids = batch_of_prompts(2, 20)
    with torch.inference_mode():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(DynamicCache(config=model.config)),
                              pad_token_id=0, do_sample=False, max_new_tokens=NEW)
    assert torch.equal(known, full[:, :known.shape[1]])
    transport = kvstream.DiskTransport(root)
    try:
        cache = kvstream.StreamingCache.load(transport, session="g", config=model.config, recover=True)
        acked = cache.get_seq_length()  # positions whose KV landed before the kill
        assert ids.shape[1] <= acked < known.shape[1]
        prefix = known[:, :acked + 1]  # the next position's token is known: generate computes from there
        with torch.inference_mode():
            more = model.generate(prefix, attention_mask=torch.ones_like(prefix), **cache_kwargs(cache),
                                  pad_token_id=0, do_sample=False, max_new_tokens=full.shape[1] - prefix.shape[1])
        assert torch.equal(more, full)
    finally:
        transport.close()
