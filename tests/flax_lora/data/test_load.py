"""Training rows from files: the advisor's reader and field table, a held-out eval split."""

from __future__ import annotations

import json

import pytest

from advisor.data_stats import measure
from advisor.formats import to_text
from flax_lora.data.load import is_local, load_checked, read_rows, split_eval
from flax_lora.errors import UserError


def test_reads_jsonl_csv_and_reports_missing(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    (tmp_path / "d.csv").write_text("text\nhello\nworld\n")
    assert read_rows(str(tmp_path / "d.jsonl"))[0][2] == {"question": "q2", "answer": "a2"}
    assert [r["text"] for r in read_rows(str(tmp_path / "d.csv"))[0]] == ["hello", "world"]
    with pytest.raises(UserError, match="not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    assert is_local(str(tmp_path / "missing.jsonl")) and not is_local("org/dataset")


def test_trainer_and_advisor_see_the_same_rows_and_text(tmp_path):
    """Rows holding two known pairs, some bad: both keep the same rows and render the same text."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "instruction": f"i{i}", "output": f"o{i}"} for i in range(30)]
    rows[4] = {"prompt": "p", "completion": ""}  # empty target: dropped by both
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, fmt, report = load_checked(str(path))
    m = measure(path)
    assert fmt == m.fmt and fmt.describe() == "pair(prompt -> completion)"
    assert [b.line for b in report.bad] == [b.line for b in m.report.bad] == [5]
    assert len(m.lengths) == len(kept) == 29 and to_text(kept[0][0], fmt) == ("p0", "c0")


def test_split_eval_is_seeded_and_bounded():
    rows = list(range(100))
    train, held = split_eval(rows, seed=3)
    assert len(held) == 5 and sorted(train + held) == rows and split_eval(rows, seed=3) == (train, held)
    assert len(split_eval(list(range(10_000)))[1]) == 200
    with pytest.raises(UserError, match="at least 2 rows"):
        split_eval([1])
