"""Helpers for tests and benchmarks (multi-rank gloo launches)."""
