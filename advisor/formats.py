"""How a data row becomes (prompt, target) text: the one field table and per-row checks.

Shared by ``lora advise --data`` (lengths, sample count) and ``lora train`` (what is trained),
so both detect the same format, keep the same rows and measure the same text. Dependency-free.

A format is detected from the columns present in at least half of the rows, in the order of
:data:`FIELDS` (most specific first), or given with ``--input-field`` / ``--target-field``.
Chat ``messages`` are rendered here without a template (``role: content`` lines); the trainer
renders them with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

from advisor.errors import UserError
from advisor.rows import BadRow, RowReport, apply_policy
from advisor.schema import RowPolicy

Kind = Literal["pair", "alpaca", "text", "messages"]
ALPACA = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


class Fields(NamedTuple):
    """One row of the field table: the columns that identify a format and how the prompt reads."""

    kind: Kind
    input_field: str | None
    target_field: str
    template: str = "{input}"


# The first entry whose fields exist wins.
FIELDS: tuple[Fields, ...] = (
    Fields("pair", "prompt", "completion", "{input}"),
    Fields("alpaca", "instruction", "output", ALPACA),  # optional "input" column
    Fields("pair", "input", "output", "{input}\n"),
    Fields("pair", "document", "summary", "{input}\n\nSummary: "),
    Fields("pair", "article", "highlights", "{input}\n\nSummary: "),
    Fields("pair", "dialogue", "summary", "{input}\n\nSummary: "),
    Fields("pair", "question", "answer", "Question: {input}\nAnswer: "),
    Fields("messages", None, "messages"),
    Fields("text", None, "text"),
)


@dataclass(frozen=True)
class Format:
    """How rows become (prompt, target): ``kind`` is pair | alpaca | text | messages."""

    kind: Kind
    input_field: str | None = None
    target_field: str | None = None
    template: str = "{input}"

    def describe(self) -> str:
        if self.kind in ("pair", "alpaca"):
            return f"{self.kind}({self.input_field} -> {self.target_field})"
        return f"{self.kind}({self.target_field or 'messages'})"

    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in (self.input_field, self.target_field) if f)


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Columns present in at least half of the rows (a few odd rows do not change the format)."""
    counts: dict[str, int] = {}
    for row in rows:
        for k in row:
            counts[k] = counts.get(k, 0) + 1
    return [k for k, n in counts.items() if 2 * n >= len(rows)]


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
    for f in FIELDS:
        if (f.input_field is None or f.input_field in cols) and f.target_field in cols:
            if f.kind == "messages":
                return Format("messages")
            return Format(f.kind, f.input_field, f.target_field, f.template)
    names = ", ".join("/".join(x for x in (f.input_field, f.target_field) if x) for f in FIELDS)
    raise UserError(f"no recognisable fields in the data (want one of: {names}); columns: "
                    f"{', '.join(sorted(cols))}. Use --input-field/--target-field")


def render_plain(messages: list[dict]) -> tuple[str, str]:
    """A chat as (prompt, target) without a template: ``role: content`` lines, the last answer as target."""
    history, answer = messages[:-1], str(messages[-1].get("content", ""))
    return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: ", answer


def to_text(row: dict[str, Any], fmt: Format) -> tuple[str, str]:
    """One (checked) row as (prompt, target) text; chat rows without a template."""
    if fmt.kind == "text":
        return "", str(row[fmt.target_field])
    if fmt.kind == "messages":
        return render_plain(row["messages"])
    if fmt.kind == "alpaca":
        extra = str(row.get("input") or "")
        block = f"### Input:\n{extra}\n\n" if extra else ""
        return fmt.template.format(instruction=row[fmt.input_field], input_block=block), str(row[fmt.target_field])
    return fmt.template.format(input=row[fmt.input_field]), str(row[fmt.target_field])


def _text_problem(row: dict, name: str, *, optional: bool = False) -> str | None:
    if name not in row or row[name] is None:
        return None if optional else f"field {name!r} is missing"
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"field {name!r} is a {type(value).__name__}, not text"
    if isinstance(value, float) and not math.isfinite(value):
        return f"field {name!r} is {value}"
    if not optional and not str(value).strip():
        return f"field {name!r} is empty"
    return None


def _messages_problem(row: dict) -> str | None:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field 'messages' is missing or not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] is not an object with string role and content"
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return "the last message is not a non-empty assistant message"
    return None


def row_problem(row: dict, fmt: Format) -> str | None:
    """Why ``row`` cannot be used with this format (``None`` when it can)."""
    if fmt.kind == "messages":
        return _messages_problem(row)
    names = [fmt.target_field] if fmt.kind == "text" else [fmt.input_field, fmt.target_field]
    for name in names:
        problem = _text_problem(row, name)
        if problem:
            return problem
    if fmt.kind == "alpaca":
        return _text_problem(row, "input", optional=True)
    return None


def check_rows(records: list[dict], numbers: list[int], report: RowReport, fmt: Format) -> tuple[list[dict], list[int]]:
    """The usable records (and their numbers); the rest are added to ``report.bad``."""
    good, good_numbers = [], []
    for row, number in zip(records, numbers):
        problem = row_problem(row, fmt)
        if problem:
            report.bad.append(BadRow(number, problem))
        else:
            good.append(row)
            good_numbers.append(number)
    report.bad.sort(key=lambda b: b.line)
    return good, good_numbers


def usable_rows(records: list[dict], numbers: list[int], report: RowReport, *, fmt: Format | None = None,
                input_field: str | None = None, target_field: str | None = None,
                policy: RowPolicy = "skip") -> tuple[list[tuple[dict, int]], Format]:
    """The ``(row, line number)`` pairs ``lora train`` trains on, and their format.

    The format is detected from the rows unless given; rows with missing, empty or wrongly typed
    fields are dropped into ``report``; ``policy`` (``--on-bad-row``) decides whether that is
    acceptable (UserError when not, or when no row is left).
    """
    if not records:
        apply_policy(report, policy)  # raises: no rows, or every row unreadable
    if fmt is None:
        fmt = detect_format(columns_of(records), input_field, target_field)
    records, numbers = check_rows(records, numbers, report, fmt)
    apply_policy(report, policy)
    return list(zip(records, numbers)), fmt
