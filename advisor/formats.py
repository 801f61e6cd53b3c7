"""How a data row becomes training text: the one field table, the formats, per-row checks.

Shared by ``lora advise --data`` (lengths, sample count) and ``lora train`` (what is trained),
so both detect the same format, keep the same rows and measure the same text. Dependency-free.

Formats (``--format`` names in brackets):

* ``pair`` [prompt-completion]: a prompt and its target (prompt/completion, input/output,
  question/answer, document/summary, ...); the target is trained.
* ``alpaca`` [alpaca]: instruction, optional input, output, optional system; the output is trained.
* ``chat`` [chat, sharegpt]: a conversation, ``messages`` (role/content; system, user, assistant,
  other roles passed to the template) or ShareGPT ``conversations`` (from/value; human, gpt,
  system, ...); every assistant turn is trained (:mod:`advisor.examples`).
* ``text`` [text]: a document; every token is trained.

A format is detected from the columns present in at least half of the rows, in the order of
:data:`FIELDS`, or named with ``--format`` (and the field flags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

from advisor.errors import UserError
from advisor.rows import BadRow, RowReport, apply_policy
from advisor.schema import DataFormat, RowPolicy

Kind = Literal["pair", "alpaca", "chat", "text"]
ALPACA = "{system_block}### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
# ShareGPT's "from" values and the chat roles they are.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool", "function_call": "tool_call", "observation": "tool"}


class Fields(NamedTuple):
    """One row of the field table: the columns that identify a format and how the prompt reads."""

    kind: Kind
    input_field: str | None
    target_field: str
    template: str = "{input}"
    name: DataFormat = "prompt-completion"


# The first entry whose fields exist wins.
FIELDS: tuple[Fields, ...] = (
    Fields("pair", "prompt", "completion", "{input}"),
    Fields("alpaca", "instruction", "output", ALPACA, "alpaca"),  # optional "input" and "system" columns
    Fields("pair", "input", "output", "{input}\n"),
    Fields("pair", "document", "summary", "{input}\n\nSummary: "),
    Fields("pair", "article", "highlights", "{input}\n\nSummary: "),
    Fields("pair", "dialogue", "summary", "{input}\n\nSummary: "),
    Fields("pair", "question", "answer", "Question: {input}\nAnswer: "),
    Fields("chat", None, "messages", name="chat"),
    Fields("chat", None, "conversations", name="sharegpt"),
    Fields("text", None, "text", name="text"),
)
BY_NAME = {name: next(f for f in FIELDS if f.name == name) for name in ("prompt-completion", "alpaca", "chat",
                                                                        "sharegpt", "text")}


@dataclass(frozen=True)
class Format:
    """How rows become text: ``kind`` and the columns it reads (``target_field`` holds a chat's turns)."""

    kind: Kind
    input_field: str | None = None
    target_field: str | None = None
    template: str = "{input}"
    sharegpt: bool = False  # chat turns as {"from", "value"}

    def describe(self) -> str:
        if self.kind in ("pair", "alpaca"):
            return f"{self.kind}({self.input_field} -> {self.target_field})"
        return f"{'sharegpt' if self.sharegpt else self.kind}({self.target_field})"

    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in (self.input_field, self.target_field) if f)


def _format(f: Fields) -> Format:
    return Format(f.kind, f.input_field, f.target_field, f.template, sharegpt=f.name == "sharegpt")


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Columns present in at least half of the rows (a few odd rows do not change the format)."""
    counts: dict[str, int] = {}
    for row in rows:
        for k in row:
            counts[k] = counts.get(k, 0) + 1
    return [k for k, n in counts.items() if 2 * n >= len(rows)]


def named_format(name: DataFormat, input_field: str | None, target_field: str | None) -> Format:
    """``--format NAME`` with its standard columns, or the ones the field flags give."""
    f = BY_NAME[name]
    if f.kind in ("chat", "text"):
        if input_field:
            raise UserError(f"--format {name} reads one column; use --target-field, not --input-field")
        return _format(f._replace(target_field=target_field or f.target_field))
    return _format(f._replace(input_field=input_field or f.input_field, target_field=target_field or f.target_field))


def detect_format(columns: Sequence[str], input_field: str | None = None, target_field: str | None = None,
                  name: DataFormat | None = None) -> Format:
    """The format of a dataset: named, or given by its fields, or recognised from its columns."""
    cols = set(columns)
    for f in (input_field, target_field):
        if f and f not in cols:
            raise UserError(f"field {f!r} not in the data; columns: {', '.join(sorted(cols))}")
    if name is not None:
        fmt = named_format(name, input_field, target_field)
        missing = [c for c in fmt.fields() if c not in cols]
        if missing:
            raise UserError(f"--format {name}: the data has no {', '.join(map(repr, missing))} column; columns: "
                            f"{', '.join(sorted(cols))}")
        return fmt
    if target_field:
        if not input_field:
            return Format("text", None, target_field)
        return Format("pair", input_field, target_field, "{input}\n")
    if input_field:
        raise UserError("--input-field needs --target-field")
    for f in FIELDS:
        if (f.input_field is None or f.input_field in cols) and f.target_field in cols:
            return _format(f)
    names = ", ".join("/".join(x for x in (f.input_field, f.target_field) if x) for f in FIELDS)
    raise UserError(f"no recognisable fields in the data (want one of: {names}); columns: "
                    f"{', '.join(sorted(cols))}. Use --format or --input-field/--target-field")


def to_text(row: dict[str, Any], fmt: Format) -> tuple[str, str]:
    """One checked pair, Alpaca or text row as (prompt, target) text (chats: :mod:`advisor.examples`)."""
    if fmt.kind == "text":
        return "", str(row[fmt.target_field])
    if fmt.kind == "alpaca":
        extra, system = str(row.get("input") or ""), str(row.get("system") or "")
        return fmt.template.format(instruction=row[fmt.input_field],
                                   input_block=f"### Input:\n{extra}\n\n" if extra else "",
                                   system_block=f"{system}\n\n" if system else ""), str(row[fmt.target_field])
    if fmt.kind == "chat":
        raise ValueError("chat rows are rendered with a template: advisor.examples.render_row")
    return fmt.template.format(input=row[fmt.input_field]), str(row[fmt.target_field])


def messages_of(row: dict[str, Any], fmt: Format) -> list[dict[str, str]]:
    """A checked chat row's turns as ``{"role", "content"}`` (ShareGPT's from/value mapped)."""
    turns = row[fmt.target_field]
    if not fmt.sharegpt:
        return [{"role": m["role"], "content": m["content"]} for m in turns]
    return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in turns]


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


def _turn_problem(i: int, m: Any, fmt: Format) -> str | None:
    role_key, content_key = ("from", "value") if fmt.sharegpt else ("role", "content")
    if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not m[role_key].strip():
        return f"{fmt.target_field}[{i}] has no {role_key!r} (a string)"
    if not isinstance(m.get(content_key), str):
        return f"{fmt.target_field}[{i}] {content_key!r} is {type(m.get(content_key)).__name__}, not text"
    if fmt.sharegpt and m[role_key] not in SHAREGPT_ROLES:
        return (f"{fmt.target_field}[{i}] has the unknown role {m[role_key]!r} (ShareGPT roles: "
                f"{', '.join(sorted(SHAREGPT_ROLES))})")
    return None


def _chat_problem(row: dict, fmt: Format) -> str | None:
    turns = row.get(fmt.target_field)
    if not isinstance(turns, list) or not turns:
        return f"field {fmt.target_field!r} is missing or not a non-empty list"
    for i, m in enumerate(turns):
        if problem := _turn_problem(i, m, fmt):
            return problem
    answers = [m["content"] for m in messages_of(row, fmt) if m["role"] == "assistant"]
    if not answers:
        return "the conversation has no assistant turn (nothing to train)"
    if not all(a.strip() for a in answers):
        return "an assistant turn is empty"
    return None


def row_problem(row: dict, fmt: Format) -> str | None:
    """Why ``row`` cannot be used with this format (``None`` when it can)."""
    if fmt.kind == "chat":
        return _chat_problem(row, fmt)
    names = [fmt.target_field] if fmt.kind == "text" else [fmt.input_field, fmt.target_field]
    for name in names:
        problem = _text_problem(row, name)
        if problem:
            return problem
    if fmt.kind == "alpaca":
        return _text_problem(row, "input", optional=True) or _text_problem(row, "system", optional=True)
    return None


def _looks_like(row: dict, fmt: Format) -> str:
    """For a row of a file that mixes formats: which format the row itself has."""
    try:
        own = detect_format(list(row))
    except UserError:
        return ""
    if (own.kind, own.fields(), own.sharegpt) == (fmt.kind, fmt.fields(), fmt.sharegpt):
        return ""
    return f" (a {own.describe()} row in a {fmt.describe()} file)"


def check_rows(records: list[dict], numbers: list[int], report: RowReport, fmt: Format) -> tuple[list[dict], list[int]]:
    """The usable records (and their numbers); the rest are added to ``report.bad``."""
    good, good_numbers = [], []
    for row, number in zip(records, numbers):
        problem = row_problem(row, fmt)
        if problem:
            report.bad.append(BadRow(number, problem + _looks_like(row, fmt)))
        else:
            good.append(row)
            good_numbers.append(number)
    report.bad.sort(key=lambda b: b.line)
    return good, good_numbers


def usable_rows(records: list[dict], numbers: list[int], report: RowReport, *, fmt: Format | None = None,
                input_field: str | None = None, target_field: str | None = None, name: DataFormat | None = None,
                policy: RowPolicy = "skip") -> tuple[list[tuple[dict, int]], Format]:
    """The ``(row, line number)`` pairs ``lora train`` trains on, and their format.

    The format is detected from the rows unless given; rows with missing, empty or wrongly typed
    fields are dropped into ``report``; ``policy`` (``--on-bad-row``) decides whether that is
    acceptable (UserError when not, or when no row is left).
    """
    if not records:
        apply_policy(report, policy)  # raises: no rows, or every row unreadable
    if fmt is None:
        fmt = detect_format(columns_of(records), input_field, target_field, name)
    records, numbers = check_rows(records, numbers, report, fmt)
    apply_policy(report, policy)
    return list(zip(records, numbers)), fmt
