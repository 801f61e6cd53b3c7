"""How many samples a local data file holds and how long their token sequences are, without
loading a model: what ``lora advise --data`` and ``lora data`` report.

The rows are read, checked, rendered and tokenized by the trainer's own path
(:mod:`advisor.rows`, :mod:`advisor.formats`, :mod:`advisor.examples`): the lengths are those of
the sequences ``lora train`` builds, chat template and special tokens included. They are exact
when the model's ``tokenizer.json`` is available offline (the ``tokenizers`` library, no
transformers), else estimated at ``CHARS_PER_TOKEN`` from the same rendered text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from advisor.errors import AdviceError, UserError
from advisor.examples import CHARS_PER_TOKEN, Example, encode, estimate_length, render_row, text_pieces
from advisor.formats import Format, usable_rows
from advisor.rows import BadRow, RowReport, apply_policy, read_records
from advisor.schema import DataFormat, RowPolicy
from advisor.templates import TemplateError, choose

__all__ = ["CHARS_PER_TOKEN", "Measured", "measure", "percentile"]


@dataclass
class Measured:
    """A data file as the trainer will see it."""

    lengths: list[int]  # per usable row: tokens (or the estimate), whole, before max_length
    fmt: Format
    report: RowReport
    tokenizer: Path | None  # the tokenizer.json the lengths were counted with (None: estimated)
    template: str | None = None  # where a chat's template came from
    examples: list[Example] = field(default_factory=list)  # with a tokenizer: the encoded rows
    shown: list[dict] = field(default_factory=list)  # the first rows as {line, tokens, trained_tokens, pieces}


def _chat_setup(model_dir: Path | None, tok, given: str | None) -> tuple[str, str, dict]:
    """(template source, its origin, special tokens) for chat rows."""
    if tok is not None:
        source, origin = choose(tok.chat_template, given)
        return source, origin, tok.special
    config = {}
    if model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except ValueError:
            config = {}
    from advisor.tokenizer import SPECIALS, content_of, template_of

    source, origin = choose(template_of(config, model_dir), given)
    return source, origin, {k: content_of(config.get(k)) for k in SPECIALS}


def measure(path: str | Path, model_dir: Path | None = None, *, data_format: DataFormat | None = None,
            input_field: str | None = None, target_field: str | None = None, chat_template: str | None = None,
            policy: RowPolicy = "skip", pieces: int = 0) -> Measured:
    """Every usable row of a local file rendered and measured as ``lora train`` builds it; the first
    ``pieces`` examples also as decoded (text, trained) segments (``lora data --show``).

    A bad input is an :class:`AdviceError` (the advisor's contract) with the reader's message.
    """
    try:
        return _measure(Path(path), model_dir, data_format, input_field, target_field, chat_template, policy, pieces)
    except AdviceError:
        raise
    except UserError as exc:
        raise AdviceError(str(exc)) from None


def _measure(path, model_dir, data_format, input_field, target_field, chat_template, policy, pieces) -> Measured:
    from advisor.tokenizer import Tokenizer

    records, numbers, report = read_records(path)
    rows, fmt = usable_rows(records, numbers, report, input_field=input_field, target_field=target_field,
                            name=data_format, policy=policy)
    tok_file = model_dir / "tokenizer.json" if model_dir is not None else None
    tok = Tokenizer.from_folder(model_dir) if tok_file is not None and tok_file.is_file() else None
    template, origin, special = _chat_setup(model_dir, tok, chat_template) if fmt.kind == "chat" else (None, None, {})
    lengths, examples, shown = [], [], []
    for row, number in rows:
        try:
            rendered = render_row(row, fmt, template, special)
        except TemplateError as exc:
            report.bad.append(BadRow(number, str(exc)))
            continue
        if tok is None:
            lengths.append(estimate_length(rendered))
            if len(shown) < pieces:
                shown.append({"line": number, "tokens": lengths[-1], "trained_tokens": None,
                              "pieces": text_pieces(rendered)})
        else:
            ex = encode(rendered, tok, number, pieces=len(shown) < pieces)
            examples.append(ex)
            lengths.append(len(ex.ids))
            if ex.pieces:
                shown.append({"line": number, "tokens": len(ex.ids), "trained_tokens": int(ex.loss_mask.sum()),
                              "pieces": ex.pieces})
    report.bad.sort(key=lambda b: b.line)
    apply_policy(report, policy)
    return Measured(lengths, fmt, report, tok_file if tok is not None else None, origin, examples, shown)


def windows(lengths: list[int], max_length: int) -> int:
    """Examples a text corpus becomes at ``max_length`` (windows overlapping by one token)."""
    return sum(1 if n <= max_length else math.ceil((n - 1) / (max_length - 1)) for n in lengths)


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
