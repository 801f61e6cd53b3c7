"""Training rows from a local file or a Hub dataset, checked, with their bad-row report.

Local files go through the project's one row reader (:mod:`advisor.rows`, shared with
``lora advise --data``); Hub names through ``datasets``. Either way the format is detected and
rows are checked by :mod:`advisor.formats`, so the advisor and the trainer see the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from advisor.formats import Format, usable_rows
from advisor.rows import RowReport, read_records
from advisor.schema import DataFormat, RowPolicy
from flax_lora.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def is_local(source: str) -> bool:
    """Whether ``source`` names a local file (else: a Hub dataset name)."""
    path = Path(source).expanduser()
    return path.exists() or path.suffix.lower() in EXTENSIONS or source.startswith((".", "/", "~"))


def read_rows(source: str, split: str = "train") -> tuple[list[dict], list[int], RowReport]:
    """(records, their line/row numbers, report of the unreadable ones) of a local file or a Hub split.

    Local files are parsed row by row by :mod:`advisor.rows`, so one bad line is reported by
    number instead of sinking the file; a file that is not what its extension says is a UserError.
    """
    path = Path(source).expanduser()
    if is_local(source):
        return read_records(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise UserError(f"dataset {source!r}: not a local file and not loadable from the Hub ({type(exc).__name__})") from None
    rows = ds.to_list()
    return rows, list(range(1, len(rows) + 1)), RowReport(source, "row", total=len(rows))


def load_checked(source: str, *, fmt: Format | None = None, input_field: str | None = None,
                 target_field: str | None = None, name: DataFormat | None = None, policy: RowPolicy = "skip"
                 ) -> tuple[list[tuple[dict, int]], Format, RowReport]:
    """Usable ``(row, line number)`` pairs of ``source``, its format, and the bad-row report
    (:func:`advisor.formats.usable_rows` on the rows :func:`read_rows` reads)."""
    records, numbers, report = read_rows(source)
    rows, fmt = usable_rows(records, numbers, report, fmt=fmt, input_field=input_field,
                            target_field=target_field, name=name, policy=policy)
    return rows, fmt, report


def report_json(report: RowReport, policy: RowPolicy, shown: int = 100) -> dict[str, Any]:
    """A RowReport for ``data_report.json``: counts plus the first ``shown`` bad / truncated lines."""
    return {"source": report.source, "unit": report.unit, "rows": report.total, "bad": len(report.bad),
            "used": report.total - len(report.bad), "truncated": len(report.truncated), "split": len(report.split),
            "windows": report.windows, "on_bad_row": policy,
            "bad_rows": [{report.unit: b.line, "reason": b.reason} for b in report.bad[:shown]],
            "truncated_rows": report.truncated[:shown]}


def split_eval(rows: list, fraction: float = 0.05, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` held out (at least 1 row, at most 200)."""
    if len(rows) < 2:
        raise UserError("need at least 2 rows to hold out an eval set (or pass --eval-data)")
    n_eval = min(max(1, round(len(rows) * fraction)), 200)
    perm = np.random.default_rng([seed, 10_000]).permutation(len(rows))
    held = set(perm[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
