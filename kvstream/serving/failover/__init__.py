"""Fault tolerance by KV replication on the pipeline engine: a killed stage is replaced and every request
continues where it was, with no acknowledged token computed again (``kvstream failover``).
"""
