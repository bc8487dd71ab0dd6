"""Session names are checked when a StreamingCache is built, against its transport's key rules."""

from __future__ import annotations

import pytest

import kvstream
from kvstream.errors import ConfigError
from kvstream.models import tiny_config


@pytest.mark.parametrize("session", ["a//b", "a/./b", "x" * 300, "nul\x00", ".tmp/x", "s.kvc/x"])
def test_a_name_the_disk_cannot_store_fails_at_construction(tmp_path, session):
    transport = kvstream.DiskTransport(tmp_path)
    with pytest.raises(ConfigError, match="Invalid session name"):
        kvstream.StreamingCache(config=tiny_config("llama"), transport=transport, session=session)
    transport.close()


def test_host_transport_keeps_its_own_rules():
    transport = kvstream.HostTransport(capacity_bytes=1 << 20)
    kvstream.StreamingCache(config=tiny_config("llama"), transport=transport, session="a//b")  # as before
    with pytest.raises(ConfigError, match="Invalid session name"):
        kvstream.StreamingCache(config=tiny_config("llama"), transport=transport, session="../x")
