"""Load generator: Poisson arrivals, lengths, microbatches and the metrics, checked by hand."""

from __future__ import annotations

import math

import pytest

from kvstream.errors import ConfigError
from kvstream.models import encode_text, prompts
from kvstream.serving.loadgen import (Completion, make_requests, microbatches, output_lengths, poisson_arrivals,
                                      prompt_lengths, summarize)


def test_poisson_arrivals_are_seeded_increasing_with_the_rate():
    a = poisson_arrivals(4.0, 20000, seed=3)
    assert a == poisson_arrivals(4.0, 20000, seed=3) and a != poisson_arrivals(4.0, 20000, seed=4)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.25) < 0.01  # mean inter-arrival 1/rate (20000 samples: sd of the mean 0.0018)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert abs(cv - 1.0) < 0.05  # exponential gaps: standard deviation equals the mean
    assert poisson_arrivals(math.inf, 3) == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="rate must be > 0"):
        poisson_arrivals(0.0, 3)


def test_output_length_specs():
    assert output_lengths("fixed:7", 3) == [7, 7, 7]
    u = output_lengths("uniform:4:6", 500, seed=1)
    assert set(u) == {4, 5, 6}
    e = output_lengths("exp:50", 4000, seed=2)
    assert min(e) >= 2 and 45 < sum(e) / len(e) < 55
    for bad in ("fixed", "uniform:9:3", "exp:-1", "gauss:3", "fixed:1"):
        with pytest.raises(ConfigError):
            output_lengths(bad, 3)


def test_prompt_lengths_fixed_or_from_a_file(tmp_path):
    assert prompt_lengths(fixed=64) == [64]
    f = tmp_path / "lens.txt"
    f.write_text("# lengths\n12\n30  # long\n\n7\n")
    assert prompt_lengths(path=f) == [12, 30, 7]
    j = tmp_path / "lens.json"
    j.write_text("[5, 6]")
    assert prompt_lengths(path=j) == [5, 6]
    with pytest.raises(ConfigError, match="either a fixed prompt length or a file"):
        prompt_lengths()
    f.write_text("12\nabc\n")
    with pytest.raises(ConfigError, match="must be integers"):
        prompt_lengths(path=f)


def test_make_requests_is_deterministic_and_cycles_lengths():
    reqs = make_requests(5, rate_per_s=2.0, prompt_lens=[8, 3], output_spec="fixed:4", seed=1)
    assert reqs == make_requests(5, rate_per_s=2.0, prompt_lens=[8, 3], output_spec="fixed:4", seed=1)
    assert [r.prompt_tokens for r in reqs] == [8, 3, 8, 3, 8]
    assert all(max(r.prompt_ids) < 256 and r.max_new_tokens == 4 for r in reqs)
    assert reqs[1].prompt_ids == tuple(encode_text(prompts()[1], 3))


def test_microbatches_group_in_arrival_order():
    reqs = make_requests(5, rate_per_s=10.0, prompt_lens=[4], output_spec="fixed:2")
    groups = microbatches(reqs, 2)
    assert [[r.id for r in g] for g in groups] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError):
        microbatches(reqs, 0)


def test_summarize_by_hand():
    done = [Completion(id=0, arrival_s=0.0, start_s=0.0, first_token_s=0.5, finish_s=2.0, prompt_tokens=10, output_tokens=4),
            Completion(id=1, arrival_s=1.0, start_s=1.5, first_token_s=2.0, finish_s=5.0, prompt_tokens=10, output_tokens=8)]
    s = summarize(done)
    assert s["makespan_s"] == 5.0 and s["requests"] == 2 and s["output_tokens"] == 12
    assert s["throughput_req_per_s"] == pytest.approx(0.4) and s["throughput_tokens_per_s"] == pytest.approx(2.4)
    # normalized latencies: 2/4 = 0.5 and 4/8 = 0.5
    assert s["normalized_latency_s_per_token"]["mean"] == pytest.approx(0.5)
    assert s["latency_s"]["mean"] == pytest.approx(3.0) and s["latency_s"]["p90"] == pytest.approx(3.8)
    assert s["ttft_s"] == pytest.approx(0.75)
    with pytest.raises(ConfigError):
        summarize([])
