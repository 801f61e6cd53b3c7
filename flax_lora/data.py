"""Training data: load rows, recognise their fields, tokenize with a loss mask, batch in buckets.

Rows come from local JSONL/JSON/CSV/Parquet files (read row by row by :mod:`flax_lora.rows`,
bad rows counted and reported by line) or a Hub name (``datasets``). Each row becomes
``(prompt, target)`` text; the loss covers the target tokens only. Batches are padded to a
few length buckets (powers of two up to ``max_length``) so the train step compiles a bounded
number of times, and the order is a pure function of ``(seed, epoch)``: a checkpoint records
``(epoch, batch index)`` and resuming replays exactly the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from flax_lora.errors import UserError
from flax_lora.rows import RowReport, apply_policy, check_rows

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# (input field, target field, how the prompt is written); the first whose fields exist wins.
PAIRS: list[tuple[str, str, str]] = [
    ("prompt", "completion", "{prompt}"),
    ("instruction", "output", "alpaca"),
    ("input", "output", "{input}\n"),
    ("document", "summary", "{document}\n\nSummary: "),
    ("article", "highlights", "{article}\n\nSummary: "),
    ("dialogue", "summary", "{dialogue}\n\nSummary: "),
    ("question", "answer", "Question: {question}\nAnswer: "),
]
ALPACA = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass(frozen=True)
class Format:
    """How rows become (prompt, target): ``kind`` is pair | alpaca | text | messages."""

    kind: str
    input_field: str | None = None
    target_field: str | None = None
    template: str = "{input}"

    def describe(self) -> str:
        if self.kind in ("pair", "alpaca"):
            return f"{self.kind}({self.input_field} -> {self.target_field})"
        return f"{self.kind}({self.target_field or 'messages'})"


def read_rows(source: str, split: str = "train") -> tuple[list[dict], list[int], RowReport]:
    """(records, their line/row numbers, report of the unreadable ones) of a local file or a Hub split.

    Local files are parsed row by row by :mod:`flax_lora.rows`, so one bad line is reported by
    number instead of sinking the file; a file that is not what its extension says is a UserError.
    """
    from flax_lora.rows import read_records

    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in EXTENSIONS or source.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"data file not found: {source}")
        if path.is_file() and path.suffix.lower() not in EXTENSIONS:
            raise UserError(f"data file {source}: unsupported extension (use {', '.join(EXTENSIONS)})")
        return read_records(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise UserError(f"dataset {source!r}: not a local file and not loadable from the Hub ({type(exc).__name__})") from None
    rows = ds.to_list()
    return rows, list(range(1, len(rows) + 1)), RowReport(source, "row", total=len(rows))


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """All parseable rows of a local file (by extension) or a Hub dataset's ``split``."""
    rows, _, report = read_rows(source, split)
    if not rows:
        apply_policy(report)
    return rows


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Columns present in at least half of the rows (a few odd rows do not change the format)."""
    counts: dict[str, int] = {}
    for row in rows:
        for k in row:
            counts[k] = counts.get(k, 0) + 1
    return [k for k, n in counts.items() if 2 * n >= len(rows)]


def load_checked(source: str, *, fmt: Format | None = None, input_field: str | None = None,
                 target_field: str | None = None, policy: str = "skip") -> tuple[list[tuple[dict, int]], Format, RowReport]:
    """Usable ``(row, line number)`` pairs of ``source``, its format, and the bad-row report.

    Rows with missing, empty or wrongly typed fields (for the detected or given format) are
    dropped and reported; ``policy`` (``--on-bad-row``) decides whether that is acceptable.
    """
    rows, numbers, report = read_rows(source)
    if not rows:
        apply_policy(report, policy)  # raises: no rows, or every row unreadable
    if fmt is None:
        fmt = detect_format(columns_of(rows), input_field, target_field)
    rows, numbers = check_rows(rows, numbers, report, fmt.kind, fmt.input_field, fmt.target_field)
    apply_policy(report, policy)
    return list(zip(rows, numbers)), fmt, report


def report_json(report: RowReport, policy: str, shown: int = 100) -> dict[str, Any]:
    """A RowReport for ``data_report.json``: counts plus the first ``shown`` bad / truncated lines."""
    return {"source": report.source, "unit": report.unit, "rows": report.total, "bad": len(report.bad),
            "used": report.total - len(report.bad), "truncated": len(report.truncated), "on_bad_row": policy,
            "bad_rows": [{report.unit: b.line, "reason": b.reason} for b in report.bad[:shown]],
            "truncated_rows": report.truncated[:shown]}


def detect_format(columns: Sequence[str], input_field: str | None = None, target_field: str | None = None) -> Format:
    """Recognise the fields of a dataset, or use the given ones; unknown fields are a UserError."""
    cols = set(columns)
    for f in (input_field, target_field):
        if f and f not in cols:
            raise UserError(f"field {f!r} not in the data; columns: {', '.join(sorted(cols))}")
    if target_field:
        if not input_field:
            return Format("text", None, target_field)
        return Format("pair", input_field, target_field, "{input}\n")
    if input_field:
        raise UserError("--input-field needs --target-field")
    for inp, tgt, tmpl in PAIRS:
        if inp in cols and tgt in cols:
            if tmpl == "alpaca":
                return Format("alpaca", inp, tgt, ALPACA)
            return Format("pair", inp, tgt, tmpl.replace("{" + inp + "}", "{input}"))
    if "messages" in cols:
        return Format("messages")
    if "text" in cols:
        return Format("text", None, "text")
    raise UserError(
        "no recognisable fields in the data (want e.g. prompt/completion, input/output, instruction/output, "
        f"document/summary, question/answer, text or messages); columns: {', '.join(sorted(cols))}. "
        "Use --input-field/--target-field"
    )


def _render_messages(messages: list[dict], tokenizer) -> tuple[str, str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError("a 'messages' row must end with an assistant message")
    history, answer = messages[:-1], str(messages[-1].get("content", ""))
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, answer
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return prompt, answer


def to_text(row: dict[str, Any], fmt: Format, tokenizer=None) -> tuple[str, str]:
    """One row as (prompt, target) text."""
    if fmt.kind == "text":
        return "", str(row[fmt.target_field])
    if fmt.kind == "messages":
        return _render_messages(row["messages"], tokenizer)
    if fmt.kind == "alpaca":
        extra = str(row.get("input") or "")
        block = f"### Input:\n{extra}\n\n" if extra else ""
        return fmt.template.format(instruction=row[fmt.input_field], input_block=block), str(row[fmt.target_field])
    return fmt.template.format(input=row[fmt.input_field]), str(row[fmt.target_field])


@dataclass
class Example:
    ids: np.ndarray  # int32 [n] prompt + target (+ eos)
    loss_mask: np.ndarray  # int32 [n], 1 on target tokens
    prompt_len: int
    prompt: str
    target: str
    truncated: bool = False  # longer than max_length, cut


def tokenize(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int) -> list[Example]:
    """Tokenize (prompt, target) pairs; targets end with eos; truncated to ``max_length``.

    When too long, the target keeps at most half the budget (or what it needs) and the prompt
    is cut from the left, so the tokens nearest the answer survive.
    """
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    out = []
    for prompt, target in pairs:
        p = bos + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        truncated = len(p) + len(t) > max_length
        if truncated:
            t = t[: max(max_length - len(p), max_length // 2)]
            p = p[len(p) - (max_length - len(t)):] if max_length > len(t) else []
        ids = np.asarray(p + t, np.int32)
        mask = np.zeros(len(ids), np.int32)
        mask[len(p):] = 1
        out.append(Example(ids, mask, len(p), prompt, target, truncated))
    return out


def buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded lengths: powers of two from ``smallest``, capped by (and ending at) ``max_length``."""
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def bucket_for(length: int, bucket_list: Sequence[int]) -> int:
    return next((b for b in bucket_list if b >= length), bucket_list[-1])


def collate(examples: Sequence[Example | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays [n, length]; ``None`` slots are all-padding rows with no loss."""
    n = len(examples)
    ids = np.full((n, length), pad_id, np.int32)
    att = np.zeros((n, length), np.int32)
    lm = np.zeros((n, length), np.int32)
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        k = min(len(ex.ids), length)
        ids[i, :k], att[i, :k], lm[i, :k] = ex.ids[:k], 1, ex.loss_mask[:k]
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


@dataclass(frozen=True)
class Position:
    """Where the data stream is: ``batch`` batches of ``epoch`` already consumed."""

    epoch: int = 0
    batch: int = 0


class Batches:
    """Shuffled, bucketed training batches of shape [accum, batch_size, T].

    Epoch ``e`` uses the permutation ``default_rng([seed, e])``; the last partial batch of an
    epoch is filled with empty rows (zero loss), so every example is seen once per epoch.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, accum: int, seed: int, max_length: int, pad_id: int):
        self.examples, self.batch_size, self.accum = list(examples), batch_size, accum
        self.seed, self.pad_id, self.buckets = seed, pad_id, buckets(max_length)
        self.per_step = batch_size * accum
        self.steps_per_epoch = max(1, math.ceil(len(self.examples) / self.per_step))

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def batch(self, pos: Position) -> dict[str, np.ndarray]:
        idx = self.order(pos.epoch)[pos.batch * self.per_step:(pos.batch + 1) * self.per_step]
        chosen: list[Example | None] = [self.examples[i] for i in idx]
        chosen += [None] * (self.per_step - len(chosen))
        length = bucket_for(max(len(e.ids) for e in chosen if e is not None), self.buckets)
        arrays = collate(chosen, length, self.pad_id)
        return {k: v.reshape(self.accum, self.batch_size, length) for k, v in arrays.items()}

    def iterate(self, start: Position = Position()) -> Iterator[tuple[Position, dict[str, np.ndarray]]]:
        """Yields (position after this batch, batch) forever, epoch after epoch."""
        pos = start
        while True:
            if pos.batch >= self.steps_per_epoch:
                pos = Position(pos.epoch + 1, 0)
            batch = self.batch(pos)
            pos = Position(pos.epoch, pos.batch + 1)
            yield pos, batch


def eval_batches(examples: Sequence[Example], batch_size: int, max_length: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Fixed-order eval batches [batch_size, T], sorted by length to waste little padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    bl = buckets(max_length)
    out = []
    for s in range(0, len(order), batch_size):
        chunk: list[Example | None] = [examples[i] for i in order[s:s + batch_size]]
        length = bucket_for(max(len(e.ids) for e in chunk), bl)
        chunk += [None] * (batch_size - len(chunk))
        out.append(collate(chunk, length, pad_id))
    return out


def split_eval(rows: list, fraction: float = 0.05, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` held out (at least 1 row, at most 200)."""
    if len(rows) < 2:
        raise UserError("need at least 2 rows to hold out an eval set (or pass --eval-data)")
    n_eval = min(max(1, round(len(rows) * fraction)), 200)
    perm = np.random.default_rng([seed, 10_000]).permutation(len(rows))
    held = set(perm[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
