"""Rows as training examples: rendered text, trained spans, token ids with a loss mask.

The one tokenization path: ``lora advise --data`` measures the sequences this module builds and
``lora train`` trains on them, so the two agree token for token (a test holds them equal).

1. :func:`render_row`: the row as text and the character spans that are trained: a pair's or an
   Alpaca row's target, every assistant answer of a chat (rendered with the chat template, see
   :mod:`advisor.templates`), a whole text document.
2. :func:`encode`: one tokenization of the whole text with character offsets; a token is trained
   when it overlaps a trained span. Non-chat rows get the BOS ``tokenizer(text)`` would add and an
   EOS after the target; a chat gets neither (its template writes them), so there is one BOS.
3. :func:`fit`: a sequence longer than ``max_length`` is cut (the prompt from the left, the
   target keeping at least half the budget), or, for a text document, split into windows that
   train every token once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from advisor.formats import Format, messages_of, to_text
from advisor.rows import BadRow, RowReport, apply_policy
from advisor.schema import RowPolicy
from advisor.templates import TemplateError, assistant_spans

CHARS_PER_TOKEN = 4.0  # length estimate without a tokenizer (English text, BPE vocabularies)


@dataclass(frozen=True)
class Rendered:
    """A row as text, its trained character spans, and what evaluation generates toward."""

    text: str
    spans: tuple[tuple[int, int], ...]
    chat: bool  # the template wrote the special tokens; no BOS / EOS added
    reference: str  # the last trained answer ("" for a text document)


@dataclass
class Example:
    """A token sequence: ids, loss mask (1 on trained tokens), where the last answer starts."""

    ids: Any  # numpy int32 [n]
    loss_mask: Any  # numpy int32 [n]
    prompt_len: int  # tokens before the last answer (the prompt evaluation generates from)
    prompt: str
    target: str  # the last answer's text ("" when there is none to compare, e.g. a text window)
    truncated: bool = False
    row: int = 0  # line or row number in the data file
    pieces: list = field(default_factory=list)  # (text, trained) segments, for `lora data --show`


def render_row(row: dict, fmt: Format, template: str | None = None, special: dict | None = None) -> Rendered:
    """The text of one checked row and its trained spans (chats need the template source)."""
    if fmt.kind == "chat":
        messages = messages_of(row, fmt)
        text, spans = assistant_spans(template, messages, special or {})
        last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        return Rendered(text, tuple(spans), True, last)
    prompt, target = to_text(row, fmt)
    text = prompt + target
    return Rendered(text, ((len(prompt), len(text)),), False, "" if fmt.kind == "text" else target)


def encode(r: Rendered, tok, row: int = 0, pieces: bool = False) -> Example:
    """The whole sequence ``lora train`` builds for a rendered row (before it is cut to length)."""
    import numpy as np

    ids, offsets = tok.encode(r.text)
    mask = [int(any(s < b and e > a for a, b in r.spans)) for s, e in offsets]
    if not r.chat:
        ids, mask, offsets = tok.prefix + ids, [0] * len(tok.prefix) + mask, [(0, 0)] * len(tok.prefix) + offsets
        if tok.eos_id is not None:
            ids, mask, offsets = ids + [tok.eos_id], mask + [1], offsets + [(len(r.text), len(r.text))]
    last = r.spans[-1][0]
    prompt_len = next((i for i, (s, e) in enumerate(offsets) if mask[i] and e > last), len(ids))
    ex = Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32), prompt_len, r.text[:last], r.reference,
                 row=row)
    if pieces:
        ex.pieces = _pieces(tok, ids, mask)
    return ex


def _pieces(tok, ids, mask) -> list[tuple[str, bool]]:
    """The sequence as decoded (text, trained) runs: what `lora data --show` marks."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((tok.decode(ids[start:i], skip_special_tokens=False), bool(mask[start])))
            start = i
    return out


def text_pieces(r: Rendered) -> list[tuple[str, bool]]:
    """The rendered text as (text, trained) runs, at the character level (no tokenizer needed)."""
    out, at = [], 0
    for a, b in r.spans:
        out += [(r.text[at:a], False)] if a > at else []
        out.append((r.text[a:b], True))
        at = b
    return out + ([(r.text[at:], False)] if at < len(r.text) else [])


def estimate_length(r: Rendered) -> int:
    """Tokens of a rendered row estimated from its characters (no tokenizer offline)."""
    return math.ceil(len(r.text) / CHARS_PER_TOKEN) + (0 if r.chat else 1)


def _cut(ex: Example, max_length: int) -> Example:
    """The prompt loses its start, the last answer keeps at least half the budget (or what it needs)."""
    n, p = len(ex.ids), ex.prompt_len
    if n <= max_length:
        return ex
    t_len = min(n - p, max(max_length - p, max_length // 2))
    p_keep = max_length - t_len
    keep = slice(p - p_keep, p + t_len)
    return Example(ex.ids[keep], ex.loss_mask[keep], p_keep, ex.prompt, ex.target, True, ex.row)


def _windows(ex: Example, max_length: int) -> list[Example]:
    """A document in windows of ``max_length`` overlapping by one token: each token is trained once
    (a window's first token is the previous window's last target, kept as context only)."""
    n = len(ex.ids)
    if n <= max_length:
        return [ex]
    out, start = [], 0
    while start < n - 1:
        ids, mask = ex.ids[start:start + max_length], ex.loss_mask[start:start + max_length].copy()
        if start:
            mask[0] = 0
        out.append(Example(ids, mask, 1, "", "", False, ex.row))
        start += max_length - 1
    return out


def fit(ex: Example, max_length: int, kind: str) -> list[Example]:
    """The example(s) a sequence becomes at ``max_length``: windows for text, else one, cut."""
    return _windows(ex, max_length) if kind == "text" else [_cut(ex, max_length)]


def encode_rows(rows: list[tuple[dict, int]], fmt: Format, tok, template: str | None, report: RowReport,
                policy: RowPolicy = "skip") -> list[Example]:
    """Every usable row encoded (whole, before cutting); a row the template cannot render is a bad
    row under ``policy``, reported by line like any other."""
    special = getattr(tok, "special", {})
    out = []
    for row, number in rows:
        try:
            out.append(encode(render_row(row, fmt, template, special), tok, number))
        except TemplateError as exc:
            report.bad.append(BadRow(number, str(exc)))
    if len(out) < len(rows):
        report.bad.sort(key=lambda b: b.line)
        apply_policy(report, policy)
    return out
