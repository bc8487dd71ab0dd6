"""The demos tell the truth: chat-demo times both sides alternately (median and spread, no speed-up claim
for a turn that reused nothing), and ``--model PATH`` uses the checkpoint's own tokenizer in both demos."""

from __future__ import annotations

import json
import warnings

import pytest

from kvstream.cli import main
from kvstream.models import build_model, decode_ids, encode_text, load_tokenizer, prompts, tiny_config

VOCAB = 64  # below every byte id of a letter: byte-encoded prompts would not even embed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint with a word-level tokenizer trained offline on the shipped prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(prompts(), trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    build_model(tiny_config("llama", num_layers=2, vocab_size=len(fast))).save_pretrained(path)
    return str(path), set(tok.get_vocab())


def test_tokenizer_is_used_when_the_checkpoint_has_one(checkpoint, tmp_path):
    path, vocab = checkpoint
    tok = load_tokenizer(path)
    assert tok is not None and load_tokenizer(None) is None and load_tokenizer(str(tmp_path)) is None
    ids = encode_text(prompts()[0], 40, tok)
    assert len(ids) == 40 and max(ids) < VOCAB
    assert set(decode_ids(ids, tok).split()) <= vocab
    assert encode_text("ab", 3) == [97, 98, 97] and decode_ids([104, 105]) == "hi"  # bytes without one


def test_a_tokenizer_that_does_not_load_falls_back_to_bytes(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_tokenizer(str(tmp_path)) is None
    assert any("does not load" in str(w.message) for w in caught)


def test_chat_demo_times_alternately_and_prints_text(checkpoint, tmp_path, capsys):
    path, vocab = checkpoint
    out = tmp_path / "turns.json"
    assert main(["chat-demo", "--model", path, "--turns", "2", "--turn-tokens", "12", "--new-tokens", "3",
                 "--repeats", "3", "--json", str(out)]) == 0
    turns = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for t in turns:
        assert len(t["ttft_full_runs_s"]) == len(t["ttft_reuse_runs_s"]) == 3
        assert min(t["ttft_full_runs_s"]) <= t["ttft_full_s"] <= max(t["ttft_full_runs_s"])
        assert t["identical"] and t["reply"] is not None and set(t["reply"].split()) <= vocab
        assert f"turn {t['turn']} reply: {t['reply']!r}" in printed
    assert turns[0]["matched_tokens"] == 0 and turns[0]["speedup"] is None and not turns[0]["noisy"]
    assert turns[1]["matched_tokens"] > 0 and turns[1]["speedup"] > 0
    assert "median of 3 alternating runs" in printed


def test_generate_demo_prints_the_continuation_as_text(checkpoint, capsys):
    path, vocab = checkpoint
    assert main(["demo", "--model", path, "--device", "cpu", "--batch", "1", "--prompt-tokens", "16",
                 "--new-tokens", "3"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if "continuation of request 0" in l][0]
    text = line.split("after the resume: ", 1)[1]
    assert text.startswith("'") and set(text.strip("'").split()) <= vocab
