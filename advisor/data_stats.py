"""Sample count and text lengths of a local data file, without loading a model.

Lengths are in tokens when the model's ``tokenizer.json`` is available offline (the
``tokenizers`` library, no transformers), else estimated at ``CHARS_PER_TOKEN``.
A sample's length is its prompt plus its target, rendered as the trainer renders them.
"""

from __future__ import annotations

import math
from pathlib import Path

from advisor.errors import AdviceError, UserError
from advisor.formats import Format, to_text, usable_rows
from advisor.rows import RowReport, read_records

CHARS_PER_TOKEN = 4.0  # typical for English text with BPE vocabularies


def sample_texts(path: str | Path) -> tuple[list[tuple[str, str]], Format, RowReport]:
    """(prompt, target) text of every row ``lora train`` would train on, their format, and the report.

    The trainer's reader and field table (:mod:`advisor.rows`, :mod:`advisor.formats`) with its
    default ``--on-bad-row skip``: the same rows are kept and the same ones reported.
    """
    try:
        records, numbers, report = read_records(path)
        rows, fmt = usable_rows(records, numbers, report)
    except AdviceError:
        raise
    except UserError as exc:  # the advisor's contract: bad input -> AdviceError
        raise AdviceError(str(exc)) from None
    return [to_text(row, fmt) for row, _ in rows], fmt, report


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
