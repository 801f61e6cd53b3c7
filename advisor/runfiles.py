"""A run directory's files as plain data: their names and the metrics log's format.

Dependency-free, so that ``lora diagnose`` (pure Python) reads exactly what the trainer writes.
``metrics.jsonl`` holds one JSON object per line, appended with a single ``write`` each: a kill
leaves at most a torn last line, which readers skip with a note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from advisor.errors import UserError

CONFIG = "run_config.json"  # every value the run uses
RESOLVED = "resolved.json"  # what the run found out while it started (devices, targets, steps)
ADVICE = "advice.json"  # the advice it was built from
METRICS = "metrics.jsonl"  # one object per logged step, evaluation or event
EVAL = "eval.json"  # before/after evaluation and throughput
EVAL_BEFORE = "eval_before.json"
DATA_REPORT = "data_report.json"  # bad and truncated rows
LOSS_PNG = "loss.png"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
EVENTS = "events"  # TensorBoard event files (--report-to tensorboard)


def append_metric(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one line with a single ``write`` (O_APPEND): a kill leaves at most a torn last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def read_metrics(path: str | os.PathLike, *, missing_ok: bool = False) -> tuple[list[tuple[int, dict]], list[str]]:
    """``(line number, object)`` of every line of a metrics log, and notes about skipped lines.

    Blank lines are skipped. A garbled *last* line without a newline is what a kill mid-write
    leaves, so it is skipped with a note; any other garbled line is a UserError naming it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return [], []
        raise UserError(f"{path.parent} has no {path.name}: not a lora run directory, or the run "
                        "has not logged a step yet") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a metrics file") from None
    lines = raw.split(b"\n")
    rows, notes = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            if number == len(lines):  # unterminated tail: a complete line ends with a newline
                notes.append(f"skipped {where}: cut off mid-write (the run was probably killed)")
                continue
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc})"
            raise UserError(f"{where}: {reason}; fix or delete the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows, notes
