"""Sample count and text lengths of a local data file, without loading a model.

Lengths are in tokens when the model's ``tokenizer.json`` is available offline (the
``tokenizers`` library, no transformers), else estimated at ``CHARS_PER_TOKEN``.
A sample's length is its prompt plus its target: what the trainer feeds the model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator

from advisor.errors import AdviceError

CHARS_PER_TOKEN = 4.0  # typical for English text with BPE vocabularies

# Field sets the trainer recognises, most specific first: (input fields, target fields).
FIELD_SETS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("instruction", "input"), ("output",)),  # alpaca; "input" may be empty
    (("instruction",), ("output",)),
    (("prompt",), ("completion",)),
    (("input",), ("output",)),
    (("document",), ("summary",)),
    (("article",), ("highlights",)),
    (("dialogue",), ("summary",)),
    (("question",), ("answer",)),
    ((), ("text",)),
    ((), ("messages",)),
)


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; malformed input raises AdviceError with its place."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except ValueError as exc:
                            raise AdviceError(f"{path}:{n}: not valid JSON ({exc})") from None
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise AdviceError(f"{path}: not valid JSON ({exc})") from None
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
            if not isinstance(data, list):
                raise AdviceError(f"{path}: expected a list of records")
            yield from enumerate(data, 1)
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                try:
                    for row in reader:
                        yield reader.line_num, row
                except csv.Error as exc:
                    raise AdviceError(f"{path}:{reader.line_num}: {exc}") from None
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise AdviceError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise AdviceError(f"{path}: not a readable Parquet file ({exc})") from None
            yield from enumerate(rows, 1)
        else:
            raise AdviceError(f"{path}: unsupported data format {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    except UnicodeDecodeError as exc:
        raise AdviceError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except IsADirectoryError:
        raise AdviceError(f"{path}: is a folder, not a data file") from None
    except OSError as exc:
        raise AdviceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def detect_fields(record: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(record, dict):
        raise AdviceError(f"{where}: a record must be an object with named fields")
    for inputs, targets in FIELD_SETS:
        if all(k in record for k in inputs + targets):
            return inputs, targets
    names = ", ".join("+".join(i + t) for i, t in FIELD_SETS)
    raise AdviceError(f"{where}: no recognised fields in {sorted(record)}; expected one of: {names}")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # chat messages
        return "\n".join(_text(m.get("content") if isinstance(m, dict) else m) for m in value)
    return str(value)


def sample_texts(path: str | Path) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """(prompt, target) pairs of every record, and the fields they came from."""
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    fields: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    for n, record in _records(path):
        where = f"{path}:{n}"
        if fields is None:
            fields = detect_fields(record, where)
        if not isinstance(record, dict) or any(k not in record for k in fields[0] + fields[1]):
            raise AdviceError(f"{where}: missing field(s) {', '.join(fields[0] + fields[1])}")
        prompt = "\n".join(t for t in (_text(record[k]) for k in fields[0]) if t)
        pairs.append((prompt, "\n".join(_text(record[k]) for k in fields[1])))
    if fields is None:
        raise AdviceError(f"{path}: no samples")
    return pairs, fields[0] + fields[1]


def token_lengths(pairs: list[tuple[str, str]], tokenizer_file: Path | None) -> list[int]:
    """Token counts with the tokenizer when given, else estimated from characters."""
    if tokenizer_file is None:
        return [math.ceil(len(p + t) / CHARS_PER_TOKEN) for p, t in pairs]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    prompts = tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    targets = tok.encode_batch([t for _, t in pairs], add_special_tokens=False)
    return [len(a.ids) + len(b.ids) for a, b in zip(prompts, targets)]


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
