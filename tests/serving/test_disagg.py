"""Disaggregated serving: prompt and token workers as processes over gloo (CPU) or NCCL (two GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from kvstream.serving import disagg
from kvstream.serving.loadgen import Request
from kvstream.serving.worker import generate, pad_left


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_disagg_cpu_three_requests_identical_to_single_process(tmp_path):
    proc = _cli("disagg", "--device", "cpu", "--requests", "3", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "3 requests checked, identical" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["checked"], summary["mismatched"], summary["missing"]) == (3, [], [])
    assert summary["summary"]["requests"] == 3 and summary["summary"]["output_tokens"] == 3 * 16
    prompt, token = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (prompt["role"], token["role"]) == ("prompt", "token")
    assert len(prompt["timings"]["prefill_s"]) == 3 and all(c["identical"] for c in token["checks"])
    assert set(summary["planner_inputs"]) >= {"prompt_time_s", "token_time_s", "tokens", "overhead"}


def test_padded_microbatch_continues_exactly_after_the_handoff(seed):
    """The worker's flow in one process: prefill a left-padded microbatch into a gloo link, load it on
    the other end, continue; the tokens equal single-process generate."""
    import kvstream
    from kvstream.models import build_model, encode_text, prompts, tiny_config
    from kvstream.transports.remote import RemoteHostTransport

    model = build_model(tiny_config(), seed=0)
    mb = [Request(id=i, arrival_s=0.0, prompt_ids=tuple(encode_text(prompts()[i], n)), max_new_tokens=7)
          for i, n in enumerate((30, 11, 24))]
    ids, mask = pad_left(mb, torch.device("cpu"))
    assert ids.shape == (3, 30) and mask.sum(1).tolist() == [30, 11, 24] and ids[1, :19].eq(0).all()
    link = RemoteHostTransport.loopback(timeout_s=20)
    try:
        cache = kvstream.StreamingCache(config=model.config, transport=link, session="mb000000")
        first = generate(model, ids, mask, 1, cache=cache)
        cache.wait()
        loaded = kvstream.StreamingCache.load(link, "mb000000", config=model.config, device="cpu", stream=False)
        mask1 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        out = generate(model, first, mask1, 6, cache=loaded)
        assert torch.equal(out, generate(model, ids, mask, 7))
    finally:
        link.close()


SERVE = ["serve", "--device", "cpu", "--requests", "200", "--rate", "2", "--prompt-tokens", "16",
         "--output-tokens", "fixed:4", "--timeout", "120", "--no-check"]


def test_killed_token_worker_makes_the_prompt_worker_fail_fast(tmp_path):
    from kvstream.transports.peer import rendezvous_store

    server = rendezvous_store("127.0.0.1", 0, is_server=True, timeout_s=60)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port), WORLD_SIZE="2",
               TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "kvstream.cli", *SERVE, "--results", str(tmp_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while int(server.add("kvstream/serve/barrier/ready", 0)) < 2:  # both workers run the load
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        time.sleep(1.0)
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - t0 < 30  # far below the 120 s timeout: the peer's death is noticed
        assert procs[0].returncode == 3, err[-2000:]
        assert "PeerError" in err and "peer rank 1" in err
    finally:
        for p in procs:
            p.kill()


def test_worker_argv_round_trips_the_options():
    args = disagg._parser().parse_args(["--device", "cpu", "--requests", "5", "--microbatch", "2", "--no-check"])
    argv = disagg.worker_argv(disagg.resolve_defaults(args), "/tmp/r")
    assert argv[:4] == ["--role", "auto", "--results", "/tmp/r"]
    assert "--no-check" in argv and argv[argv.index("--microbatch") + 1] == "2"
    assert argv[argv.index("--transport") + 1] == "remote" and argv[argv.index("--model") + 1] == "tiny"


@pytest.mark.gpu2
def test_disagg_two_gpus_nccl_identical(tmp_path):
    proc = _cli("disagg", "--device", "cuda", "--requests", "4", "--layers", "4", "--prompt-tokens", "512",
                "--output-tokens", "fixed:16", "--results", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["checked"], summary["mismatched"]) == (4, [])


def test_weight_fingerprint_tells_models_apart():
    from kvstream.models import build_model, tiny_config
    from kvstream.serving.worker import fingerprint

    a, b, c = (build_model(tiny_config(), seed=s) for s in (0, 0, 1))
    assert fingerprint(a) == fingerprint(b) and fingerprint(a) != fingerprint(c)
