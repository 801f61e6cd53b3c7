"""Reading a local data file row by row, so that bad rows are counted and reported by line.

The one reader of rows, shared by ``lora advise --data`` and ``lora train`` (dependency-free:
Parquet alone loads pyarrow). ``read_records`` parses JSONL / JSON / CSV / Parquet itself (one
bad line does not sink the file, unlike ``datasets.load_dataset``);
:func:`advisor.formats.check_rows` drops rows whose fields are missing, empty or of the wrong
type for the detected format; ``apply_policy`` turns the report into a decision: ``skip`` (default) drops bad rows and reports them but fails when more than
``MAX_BAD_SHARE`` of the rows are bad; ``fail`` fails on the first report with any bad row.
A file that is not what its extension says (Parquet or gzip named .jsonl, CSV named .jsonl,
text named .parquet) gets a clear error, as does a file left with no usable rows.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.errors import UserError
from advisor.schema import RowPolicy

MAX_BAD_SHARE = 0.10  # skip mode still fails when more than this share of rows is bad
SHOWN = 5  # bad rows named in a message
MAGIC = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file",
         b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"\x93NUMPY": "a NumPy array", b"\x80": "a Python pickle"}
POLICIES: tuple[RowPolicy, ...] = ("skip", "fail")


@dataclass
class BadRow:
    line: int  # 1-based line of the file (JSONL, CSV) or row number (JSON array, Parquet)
    reason: str


@dataclass
class RowReport:
    """What happened to a file's rows."""

    source: str
    unit: str  # "line" or "row"
    total: int = 0
    bad: list[BadRow] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)  # lines longer than max_length (kept, cut)
    split: list[int] = field(default_factory=list)  # text documents longer than max_length (in windows)
    windows: int = 0  # the windows those documents became

    def describe_bad(self) -> str:
        shown = "; ".join(f"{self.unit} {b.line}: {b.reason}" for b in self.bad[:SHOWN])
        more = f"; and {len(self.bad) - SHOWN} more" if len(self.bad) > SHOWN else ""
        return shown + more

    def summary(self) -> str:
        """One line for the user ('' when every row was fine)."""
        parts = []
        if self.bad:
            parts.append(f"skipped {len(self.bad)} of {self.total} rows in {self.source} ({self.describe_bad()})")
        if self.truncated:
            lines = ", ".join(map(str, self.truncated[:SHOWN])) + (" ..." if len(self.truncated) > SHOWN else "")
            parts.append(f"{len(self.truncated)} rows longer than max_length were truncated ({self.unit}s {lines})")
        if self.split:
            parts.append(f"{len(self.split)} documents longer than max_length were split into {self.windows} windows "
                         "(every token trained once)")
        return "; ".join(parts)


def _what_it_is(head: bytes) -> str | None:
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return what
    if b"\x00" in head[:512]:
        return "a binary file"
    return None


def _decode(raw: bytes) -> str:
    """UTF-8 with undecodable bytes kept as lone surrogates, so the rows holding them can be named."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return text.removeprefix("\ufeff")


def _has_bad_bytes(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    return False


def read_records(path: str | Path) -> tuple[list[dict], list[int], RowReport]:
    """(records, their line/row numbers, report with the unparseable ones) of a local file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"data file {path} is a directory") from None
    if suffix == ".parquet":
        return _read_parquet(path, raw)
    what = _what_it_is(raw[:4096])
    if what:
        raise UserError(f"data file {path} is {what}, not {suffix.lstrip('.').upper()} text: "
                        "check the file or give it the right extension")
    text = _decode(raw)
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            return _read_json_array(path, text)
        try:  # a single object: {"data": [...]} or one row
            obj = json.loads(text)
        except ValueError:
            pass  # JSON Lines with a .json name
        else:
            lists = [v for v in obj.values() if isinstance(v, list)] if isinstance(obj, dict) else []
            if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                return _rows_of(path, lists[0])
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text)
    raise UserError(f"data file {path}: unsupported extension (use .jsonl, .json, .csv or .parquet)")


def _rows_of(path: Path, items: list) -> tuple[list[dict], list[int], RowReport]:
    report = RowReport(str(path), "row", total=len(items))
    records, numbers = [], []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            report.bad.append(BadRow(i, f"a JSON {type(item).__name__}, not an object"))
        elif _has_bad_bytes(item):
            report.bad.append(BadRow(i, "not valid UTF-8"))
        else:
            records.append(item)
            numbers.append(i)
    return records, numbers, report


def _read_json_array(path: Path, text: str) -> tuple[list[dict], list[int], RowReport]:
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise UserError(f"data file {path}: not valid JSON ({exc})") from None
    return _rows_of(path, items)


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], list[int], RowReport]:
    report = RowReport(str(path), "line")
    records, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        report.total += 1
        if _has_bad_bytes(line):
            report.bad.append(BadRow(number, "not valid UTF-8"))
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            report.bad.append(BadRow(number, f"not valid JSON ({exc.args[0].split(':')[0]})"))
            continue
        if not isinstance(obj, dict):
            report.bad.append(BadRow(number, f"a JSON {type(obj).__name__}, not an object"))
            continue
        records.append(obj)
        numbers.append(number)
    if report.total and not records and len(report.bad) == report.total:
        first = text.split("\n", 1)[0]
        if "," in first and not first.lstrip().startswith(("{", "[")):
            raise UserError(f"data file {path} looks like CSV, not JSON Lines (line 1: {first[:60]!r}); "
                            "rename it to .csv")
    return records, numbers, report


def _read_csv(path: Path, text: str) -> tuple[list[dict], list[int], RowReport]:
    report = RowReport(str(path), "line")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"data file {path} is empty") from None
    except csv.Error as exc:
        raise UserError(f"data file {path}: unreadable CSV header ({exc})") from None
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise UserError(f"data file {path}: the CSV header has empty or repeated column names: {header}")
    records, numbers = [], []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            report.total += 1
            report.bad.append(BadRow(start, f"unreadable CSV ({exc})"))
            continue
        if not cells:
            continue
        report.total += 1
        if len(cells) != len(header):
            report.bad.append(BadRow(start, f"{len(cells)} columns, the header has {len(header)}"))
        elif _has_bad_bytes(cells):
            report.bad.append(BadRow(start, "not valid UTF-8"))
        else:
            records.append(dict(zip(header, cells)))
            numbers.append(start)
    return records, numbers, report


def _read_parquet(path: Path, raw: bytes) -> tuple[list[dict], list[int], RowReport]:
    if not raw.startswith(b"PAR1"):
        what = _what_it_is(raw[:4096]) or ("JSON or JSON Lines text" if raw.lstrip()[:1] in (b"{", b"[")
                                           else "not Parquet")
        raise UserError(f"data file {path} is {what}, not a Parquet file: check the file or its extension")
    import pyarrow.parquet as pq

    try:
        items = pq.read_table(path).to_pylist()
    except Exception as exc:  # truncated or corrupt
        raise UserError(f"data file {path}: unreadable Parquet ({type(exc).__name__}: {exc})") from None
    return _rows_of(path, items)


def apply_policy(report: RowReport, policy: RowPolicy = "skip", max_bad_share: float = MAX_BAD_SHARE) -> None:
    """Raise UserError when the bad rows are not acceptable under ``policy``."""
    if policy not in POLICIES:
        raise UserError(f"--on-bad-row {policy!r}: use one of {', '.join(POLICIES)}")
    if report.total and len(report.bad) == report.total:
        raise UserError(f"data file {report.source}: no usable rows, all {report.total} are bad "
                        f"({report.describe_bad()})")
    if not report.total:
        raise UserError(f"data file {report.source} has no rows")
    if not report.bad:
        return
    if policy == "fail":
        raise UserError(f"data file {report.source}: {len(report.bad)} bad rows of {report.total} with "
                        f"--on-bad-row fail ({report.describe_bad()})")
    share = len(report.bad) / report.total
    if share > max_bad_share:
        raise UserError(f"data file {report.source}: {len(report.bad)} of {report.total} rows are bad "
                        f"({share:.0%}, more than {max_bad_share:.0%}): {report.describe_bad()}. "
                        "Fix the file (or check --input-field/--target-field)")
