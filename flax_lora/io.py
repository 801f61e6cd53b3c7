"""Atomic file writes (one implementation, in the dependency-free advisor layer) and path
containment for run directories."""

from __future__ import annotations

import os
from pathlib import Path

from advisor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from flax_lora.errors import UserError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "inside"]


def inside(root: str | os.PathLike, name: str) -> Path:
    """``root/name``, or a UserError when it resolves outside ``root`` (``..``, absolute, symlink)."""
    root = Path(root)
    path = root / name
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{path} points outside the output folder {root} (to {target}); refusing to use it")
    return path
