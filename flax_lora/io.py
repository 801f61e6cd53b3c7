"""Atomic file writes (one implementation, in the dependency-free advisor layer)."""

from advisor.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
