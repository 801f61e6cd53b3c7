"""The one field table: detection from columns, the given-field flags, rendering as the trainer does."""

from __future__ import annotations

import pytest

from advisor.errors import UserError
from advisor.formats import FIELDS, Format, columns_of, detect_format, to_text


@pytest.mark.parametrize(
    "columns, kind, inp, tgt",
    [
        (["prompt", "completion"], "pair", "prompt", "completion"),
        (["input", "output"], "pair", "input", "output"),
        (["instruction", "input", "output"], "alpaca", "instruction", "output"),
        (["document", "summary", "id"], "pair", "document", "summary"),
        (["article", "highlights"], "pair", "article", "highlights"),
        (["dialogue", "summary"], "pair", "dialogue", "summary"),
        (["question", "answer"], "pair", "question", "answer"),
        (["text", "meta"], "text", None, "text"),
        (["messages"], "chat", None, "messages"),
        (["conversations"], "chat", None, "conversations"),
        # several known pairs: the table's order decides, the same for advisor and trainer
        (["instruction", "output", "prompt", "completion"], "pair", "prompt", "completion"),
        (["text", "messages"], "chat", None, "messages"),
    ],
)
def test_recognises_common_fields(columns, kind, inp, tgt):
    fmt = detect_format(columns)
    assert (fmt.kind, fmt.input_field, fmt.target_field) == (kind, inp, tgt)


def test_every_table_entry_is_detected_from_its_own_columns():
    for f in FIELDS:
        cols = [c for c in (f.input_field, f.target_field) if c]
        assert detect_format(cols).kind == f.kind


def test_field_flags_override_and_unknown_fields_list_columns():
    assert detect_format(["q", "a"], "q", "a").input_field == "q"
    assert detect_format(["q", "a"], target_field="a") == Format("text", None, "a")
    with pytest.raises(UserError, match="columns: a, q"):
        detect_format(["q", "a"])
    with pytest.raises(UserError, match="not in the data"):
        detect_format(["q", "a"], "x", "a")
    with pytest.raises(UserError, match="needs --target-field"):
        detect_format(["q", "a"], "q")


def test_columns_of_ignores_a_few_odd_rows():
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"extra": 1}]
    assert sorted(columns_of(rows)) == ["completion", "prompt"]


def test_rendering_alpaca_and_messages():
    fmt = detect_format(["instruction", "input", "output"])
    p, t = to_text({"instruction": "Add", "input": "1 2", "output": "3"}, fmt)
    assert "### Input:\n1 2" in p and p.endswith("### Response:\n") and t == "3"
    p, t = to_text({"instruction": "Add", "output": "3", "system": "Be brief."}, fmt)
    assert p.startswith("Be brief.\n\n### Instruction:\nAdd") and "### Input" not in p
