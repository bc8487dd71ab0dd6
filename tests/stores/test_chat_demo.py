"""``kvstream chat-demo`` with tiny settings: every turn reuses the turns before and stays identical."""

from __future__ import annotations

import json

import pytest

from kvstream.cli import main


@pytest.mark.parametrize("store,arch", [("radix", "llama"), ("file", "gpt2")])
def test_chat_demo_runs_and_reuses(tmp_path, store, arch, capsys):
    out = tmp_path / "turns.json"
    argv = ["chat-demo", "--store", store, "--arch", arch, "--turns", "3", "--turn-tokens", "24", "--new-tokens", "4",
            "--layers", "2", "--chunk-tokens", "8", "--json", str(out)]
    if store == "file":
        argv += ["--root", str(tmp_path / "kv")]
    assert main(argv) == 0
    turns = json.loads(out.read_text())
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert all(t["identical"] for t in turns)
    assert turns[0]["matched_tokens"] == 0
    for before, t in zip(turns, turns[1:]):  # all of the conversation so far but whole-chunk rounding
        history = before["prompt_tokens"] + 4
        expected = history - 1 if store == "radix" else (history - 1) // 8 * 8
        assert t["matched_tokens"] == expected
        assert t["prefilled_tokens"] == t["prompt_tokens"] - expected
    assert "TTFT reuse" in capsys.readouterr().out


@pytest.mark.parametrize("plan", [False, True])
def test_chat_demo_with_tiers(tmp_path, plan):
    out = tmp_path / "turns.json"
    argv = ["chat-demo", "--store", "tiered", "--turns", "3", "--turn-tokens", "24", "--new-tokens", "4",
            "--layers", "2", "--chunk-tokens", "8", "--root", str(tmp_path / "kv"), "--json", str(out)]
    assert main(argv + (["--plan"] if plan else [])) == 0
    turns = json.loads(out.read_text())
    assert all(t["identical"] for t in turns)
    if not plan:  # the host tier holds the whole conversation so far
        assert [t["matched_tokens"] for t in turns[1:]] == [b["prompt_tokens"] + 3 for b in turns[:-1]]
    assert all(t["plan"] in ("load", "split", "recompute", "none") for t in turns)
