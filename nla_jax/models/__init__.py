"""Decoder-only transformers as pure functions of parameter pytrees."""
