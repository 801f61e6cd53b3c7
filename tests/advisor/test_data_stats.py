import csv
import json
import math

import pytest

from advisor import AdviceError, advise, data_stats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_counts_and_estimates_lengths(tmp_path):
    # 95 samples of 60..154 estimated tokens (chars / 4), then 5 outliers of 1010
    chars = [4 * (i + 50) for i in range(95)] + [4000] * 5
    records = [{"prompt": "p" * n, "completion": "c" * 40} for n in chars]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    a = advise(data=str(path), vram_gb=24, model="gpt2")
    d = a.data
    lengths = sorted(math.ceil((n + 40) / 4) + 1 for n in chars)  # + the EOS the trainer appends
    assert d.samples == 100 and a.request.samples is None
    assert (d.p95, d.max, d.length_unit, d.chars_per_token) == (155, 1011, "estimated-tokens", 4.0)
    assert lengths[94] == 155 and lengths[-1] == 1011
    assert a.training.max_length == math.ceil(155 / 64) * 64 == 192
    assert d.truncated_at_max_length == sum(n > 192 for n in lengths) == 5
    assert any("truncates 5 of 100" in w for w in a.warnings)
    assert a.training.total_steps == math.ceil(100 / a.training.effective_batch_size) * a.training.epochs


@pytest.mark.parametrize("record,prompt,target", [
    ({"instruction": "abcd", "input": "", "output": "efgh"}, "### Instruction:\nabcd\n\n### Response:\n", "efgh"),
    ({"instruction": "abcd", "input": "xy", "output": "efgh"},
     "### Instruction:\nabcd\n\n### Input:\nxy\n\n### Response:\n", "efgh"),
    ({"input": "abcdefgh", "output": "ijkl"}, "abcdefgh\n", "ijkl"),
    ({"document": "a" * 40, "summary": "b" * 8}, "a" * 40 + "\n\nSummary: ", "b" * 8),
    ({"article": "a" * 40, "highlights": "b" * 8}, "a" * 40 + "\n\nSummary: ", "b" * 8),
    ({"dialogue": "a" * 40, "summary": "b" * 8}, "a" * 40 + "\n\nSummary: ", "b" * 8),
    ({"question": "a" * 7, "answer": "b"}, "Question: aaaaaaa\nAnswer: ", "b"),
    ({"text": "a" * 17}, "", "a" * 17),
    # both pairs present: prompt/completion wins, for the advisor as for the trainer
    ({"prompt": "p", "completion": "c", "instruction": "i", "output": "o"}, "p", "c"),
])
def test_recognised_fields_are_measured_as_the_trainer_renders_them(tmp_path, record, prompt, target):
    from advisor.examples import render_row

    path = write_jsonl(tmp_path / "d.jsonl", [record] * 3)
    m = data_stats.measure(path)
    assert not m.report.bad and m.tokenizer is None
    rendered = render_row(record, m.fmt, "unused")
    assert (rendered.text[:rendered.spans[-1][0]], rendered.text[rendered.spans[-1][0]:]) == (prompt, target)
    assert m.lengths == [math.ceil(len(prompt + target) / 4) + 1] * 3  # + EOS


def test_json_csv_and_parquet(tmp_path):
    rows = [{"question": "q" * 400, "answer": "a" * 400}] * 10
    (tmp_path / "d.json").write_text(json.dumps({"train": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(rows)
    for name in ("d.json", "d.csv"):
        a = advise(data=str(tmp_path / name), vram_gb=24, model="gpt2")
        # "Question: " + 400 + "\nAnswer: " + 400 characters = 819 -> 205 estimated tokens, + EOS
        assert (a.data.samples, a.data.p95, a.training.max_length) == (10, 206, 256)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert advise(data=str(tmp_path / "d.parquet"), vram_gb=24).data.samples == 10


def test_tokenizer_json_is_used_when_offline_available(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tmp_path / "model"
    model.mkdir()
    tok.save(str(model / "tokenizer.json"))
    (model / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 3, "n_positions": 128}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello world " * 30, "completion": "hello"}] * 4)
    a = advise(data=str(data), vram_gb=8, model=str(model))
    assert a.data.length_unit == "tokens" and a.data.tokenizer.endswith("tokenizer.json")
    assert a.data.max == 61  # 60 prompt words + 1, not the 371 characters / 4


@pytest.mark.parametrize("content,needle", [
    ('{"text": "a"}\n{"text": "b"}\n{oops\n', "1 of 3 rows are bad .*line 3: not valid JSON"),
    ('{"text": "a"}\n{"other": "b"}\n', "line 2: field 'text' is missing"),
    ('{"colour": "red"}\n', "no recognisable fields"),
    ('["just", "a", "list"]\n', "not an object"),
    ("", "has no rows"),
])
def test_malformed_files_name_the_place(tmp_path, content, needle):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(AdviceError, match=needle):
        advise(data=str(tmp_path / "d.jsonl"), vram_gb=12)


def test_a_few_bad_rows_are_skipped_and_reported_like_the_trainer_does(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(40)]
    lines[6] = "{oops"
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    a = advise(data=str(tmp_path / "d.jsonl"), vram_gb=12)
    assert a.data.samples == 39
    assert any("skipped 1 of 40 rows" in w and "line 7" in w for w in a.warnings)


def test_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(AdviceError, match="not found"):
        advise(data=str(tmp_path / "missing.jsonl"), vram_gb=12)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(AdviceError, match="unsupported"):
        advise(data=str(tmp_path / "d.txt"), vram_gb=12)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AdviceError, match="a binary file"):
        advise(data=str(tmp_path / "bin.jsonl"), vram_gb=12)


def test_explicit_samples_win_over_the_file_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}] * 5)
    a = advise(samples=500, data=str(path), vram_gb=12)
    assert a.training.total_steps == math.ceil(500 / a.training.effective_batch_size) * a.training.epochs
    assert any("differs" in w for w in a.warnings)
