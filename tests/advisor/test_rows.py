"""Bad data rows are counted and reported by line; files that are not what they claim are refused."""

import json

import pytest

from advisor.errors import UserError
from advisor.formats import Format, check_rows
from advisor.rows import apply_policy, read_records


def good(i):
    return json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"})


def jsonl(tmp_path, lines: list, name="d.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return str(path)


def load(path, kind="pair", inp="prompt", tgt="completion"):
    records, numbers, report = read_records(path)
    records, numbers = check_rows(records, numbers, report, Format(kind, inp, tgt))
    return records, numbers, report


def test_each_kind_of_bad_row_is_reported_with_its_line(tmp_path):
    lines = [good(i) for i in range(40)]
    lines[2] = '{"prompt": "q", "completion": "a"'  # truncated JSON
    lines[5] = b'{"prompt": "q\xff\xfe", "completion": "a"}'  # invalid UTF-8
    lines[9] = '{"prompt": "q"}'  # missing field
    lines[12] = '{"prompt": "q", "completion": "   "}'  # empty field
    lines[20] = '{"prompt": ["q"], "completion": "a"}'  # wrong type
    lines[30] = '["prompt", "completion"]'  # not an object
    lines[33] = '{"prompt": "q", "completion": null}'
    records, numbers, report = load(jsonl(tmp_path, lines))
    assert report.total == 40 and len(records) == 33
    assert [(b.line, b.reason.split(" (")[0]) for b in report.bad] == [
        (3, "not valid JSON"), (6, "not valid UTF-8"), (10, "field 'completion' is missing"),
        (13, "field 'completion' is empty"), (21, "field 'prompt' is a list, not text"),
        (31, "a JSON list, not an object"), (34, "field 'completion' is missing")]
    assert 3 not in numbers and numbers[:3] == [1, 2, 4]
    summary = report.summary()
    assert summary.startswith("skipped 7 of 40 rows in") and "line 3: not valid JSON" in summary
    assert "and 2 more" in summary
    with pytest.raises(UserError, match="more than 10%"):  # 7/40 = 18% bad: too many even for skip
        apply_policy(report, "skip")
    apply_policy(report, "skip", max_bad_share=0.2)  # within a looser bound: skipped and reported


def test_skip_is_the_default_and_fail_fails_on_one_bad_row(tmp_path):
    lines = [good(i) for i in range(50)]
    lines[7] = '{"prompt": "q", "completion": 3.5e999}'
    records, _, report = load(jsonl(tmp_path, lines))
    assert len(records) == 49 and [b.line for b in report.bad] == [8]
    apply_policy(report)  # 2% bad: skipped
    with pytest.raises(UserError, match=r"1 bad rows of 50 with --on-bad-row fail \(line 8: field 'completion' is inf"):
        apply_policy(report, "fail")


def test_numbers_are_text_but_booleans_are_not(tmp_path):
    lines = ['{"question": "2+2?", "answer": 4}', '{"question": "ok?", "answer": true}']
    records, _, report = load(jsonl(tmp_path, lines), inp="question", tgt="answer")
    assert len(records) == 1 and report.bad[0].reason == "field 'answer' is a bool, not text"


def test_empty_after_filtering_is_an_error(tmp_path):
    path = jsonl(tmp_path, ['{"prompt": "", "completion": "a"}', '{"prompt": "q"}'])
    _, _, report = load(path)
    with pytest.raises(UserError, match="no usable rows, all 2 are bad"):
        apply_policy(report)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    _, _, report = load(str(tmp_path / "e.jsonl"))
    with pytest.raises(UserError, match="has no rows"):
        apply_policy(report)


def test_csv_rows_with_wrong_column_counts_and_bytes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\nq1,a1\n"multi\nline q",a2\nq3\nq4,a4,extra\nq5,\xff\n,a6\nq7,a7\n')
    records, numbers, report = load(str(path))
    assert [r["prompt"] for r in records] == ["q1", "multi\nline q", "q7"] and numbers == [2, 3, 9]
    assert [(b.line, b.reason) for b in report.bad] == [
        (5, "1 columns, the header has 2"), (6, "3 columns, the header has 2"), (7, "not valid UTF-8"),
        (8, "field 'prompt' is empty")]


def test_json_array_and_wrapped_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "q", "completion": "a"}, 5, {"prompt": "q"}]))
    records, _, report = load(str(tmp_path / "a.json"))
    assert len(records) == 1 and [(b.line, b.reason) for b in report.bad] == [
        (2, "a JSON int, not an object"), (3, "field 'completion' is missing")]
    (tmp_path / "w.json").write_text(json.dumps({"data": [{"prompt": "q", "completion": "a"}]}))
    assert len(load(str(tmp_path / "w.json"))[0]) == 1


def test_messages_rows(tmp_path):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    bad_item = {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}
    path = jsonl(tmp_path, [json.dumps(x) for x in (ok, no_answer, bad_item, {"messages": "hi"})])
    records, _, report = load(path, kind="chat", inp=None, tgt="messages")
    assert len(records) == 1 and [b.line for b in report.bad] == [2, 3, 4]


@pytest.mark.parametrize("name,content,needle", [
    ("d.jsonl", b"PAR1\x00\x00binary", "is a Parquet file, not JSONL text"),
    ("d.jsonl", b"\x1f\x8b\x08\x00gz", "is a gzip file"),
    ("d.jsonl", b"prompt,completion\nq,a\nq2,a2\n", "looks like CSV, not JSON Lines"),
    ("d.parquet", b'{"prompt": "q", "completion": "a"}\n', "is JSON or JSON Lines text, not a Parquet file"),
    ("d.parquet", b"PAR1 truncated", "unreadable Parquet"),
    ("d.csv", b"\x80\x04\x95pickle", "is a Python pickle"),
    ("d.json", b'[{"prompt": "q", ', "not valid JSON"),
    ("d.txt", b"hello", "unsupported extension"),
])
def test_files_that_are_not_what_they_claim(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=needle):
        read_records(tmp_path / name)


def test_real_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["q1", None, "q3"], "completion": ["a1", "a2", ""]}), tmp_path / "d.parquet")
    records, numbers, report = load(str(tmp_path / "d.parquet"))
    assert numbers == [1] and [(b.line, b.reason) for b in report.bad] == [
        (2, "field 'prompt' is missing"), (3, "field 'completion' is empty")]
    assert report.unit == "row"
