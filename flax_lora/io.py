"""Atomic file writes: a crash never leaves a truncated file that a later command trusts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def inside(root: str | os.PathLike, name: str) -> Path:
    """``root/name``, or a UserError when it resolves outside ``root`` (``..``, absolute, symlink)."""
    from flax_lora.errors import UserError

    root = Path(root)
    path = root / name
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{path} points outside the output folder {root} (to {target}); refusing to use it")
    return path
