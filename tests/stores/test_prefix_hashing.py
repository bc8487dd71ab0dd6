"""Chained prefix hashes: deterministic across processes (any PYTHONHASHSEED), chained, chunked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvstream.errors import ConfigError
from kvstream.stores.hashing import as_token_ids, nested_path, prefix_hashes

#: Golden keys: a change here breaks every store written before (bump HASH_VERSION instead).
GOLDEN_40_BY_16 = ["4275840eb678cbeeb3dbff6f7d72154e", "1304b5e8fec1be3e6a1bfbab81ad98cb"]


def test_golden_keys_are_stable():
    assert prefix_hashes(list(range(40)), 16) == GOLDEN_40_BY_16
    assert prefix_hashes(list(range(16)), 16, namespace="llama") == ["97294d6bd3247645fd1ff2e9cd7b62f0"]


@pytest.mark.parametrize("hashseed", ["12345"])  # this process runs with a random seed
def test_same_keys_in_a_process_with_another_hash_seed(hashseed):
    code = ("import json; from kvstream.stores.hashing import prefix_hashes; from kvstream.stores import ChunkFileStore;"
            "import tempfile; s = ChunkFileStore(tempfile.mkdtemp(), chunk_tokens=4, namespace='m');"
            "print(json.dumps([prefix_hashes(list(range(40)), 16), s.keys_for([5, 6, 7, 8, 9, 10, 11, 12, 13])]))")
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    from kvstream.stores import ChunkFileStore

    import tempfile

    mine = ChunkFileStore(tempfile.mkdtemp(), chunk_tokens=4, namespace="m").keys_for([5, 6, 7, 8, 9, 10, 11, 12, 13])
    assert theirs == [GOLDEN_40_BY_16, mine]


def test_keys_are_chained_over_the_whole_prefix():
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = prefix_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)  # same second chunk, other first token
    assert len(a) == len(b) == 2
    assert a[0] != b[0] and a[1] != b[1]
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9], 4) == a  # the trailing partial chunk has no key
    assert prefix_hashes([1, 2, 3], 4) == []


def test_namespace_and_chunk_size_separate_keys():
    ids = list(range(32))
    assert prefix_hashes(ids, 16, namespace="a") != prefix_hashes(ids, 16, namespace="b")
    assert prefix_hashes(ids, 16)[0] != prefix_hashes(ids, 8)[1]  # same 16 tokens, other chunking


def test_token_id_forms_agree():
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = prefix_hashes(ids, 4)
    for form in (torch.tensor([ids]), torch.tensor(ids, dtype=torch.int32), np.array(ids), tuple(ids), [ids]):
        assert prefix_hashes(form, 4) == ref


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4), [1.5, 2.0], "abc",
                                 [[1, 2], [3, 4]], torch.zeros(1, 1, 4, dtype=torch.long)])
def test_bad_ids_raise_config_error(bad):
    with pytest.raises(ConfigError):
        as_token_ids(bad)


def test_bad_chunk_tokens():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        prefix_hashes([1, 2], 0)


def test_nested_path():
    key = "44c3aa0000000000000000000000beef"
    assert nested_path(key) == f"44/c3/{key}"
    assert nested_path(key, levels=3, chars=1) == f"4/4/c/{key}"
    assert nested_path(key, levels=0) == key
    with pytest.raises(ConfigError):
        nested_path(key, levels=20, chars=2)


def test_token_ids_are_python_ints_and_anything_else_is_refused():
    assert as_token_ids(torch.tensor([[5, 6, 7]])) == [5, 6, 7]
    assert all(type(x) is int for x in as_token_ids(torch.tensor([5, 6], dtype=torch.int32)))
    assert as_token_ids([np.int64(3), 4]) == [3, 4] and all(type(x) is int for x in as_token_ids([np.int64(3), 4]))
    for bad in ([1, 2.0], [1, True], [1, "2"], torch.tensor([1.0])):
        with pytest.raises(ConfigError):
            as_token_ids(bad)
