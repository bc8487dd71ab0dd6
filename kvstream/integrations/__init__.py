"""Integrations with inference frameworks: :mod:`kvstream.integrations.hf` (transformers ``generate``)."""
