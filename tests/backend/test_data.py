"""Data: field recognition, truncation with a loss mask, buckets, deterministic resumable order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flax_lora import data as D
from flax_lora.errors import UserError


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
        (["messages"], "messages", None, None),
    ],
)
def test_recognises_common_fields(columns, kind, inp, tgt):
    fmt = D.detect_format(columns)
    assert (fmt.kind, fmt.input_field, fmt.target_field) == (kind, inp, tgt)


def test_field_flags_override_and_unknown_fields_list_columns():
    assert D.detect_format(["q", "a"], "q", "a").input_field == "q"
    with pytest.raises(UserError, match="columns: a, q"):
        D.detect_format(["q", "a"])
    with pytest.raises(UserError, match="not in the data"):
        D.detect_format(["q", "a"], "x", "a")


def test_rendering_alpaca_and_messages():
    fmt = D.detect_format(["instruction", "input", "output"])
    p, t = D.to_text({"instruction": "Add", "input": "1 2", "output": "3"}, fmt)
    assert "### Input:\n1 2" in p and p.endswith("### Response:\n") and t == "3"
    p, t = D.to_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                     D.Format("messages"), tokenizer=object())
    assert p == "user: hi\nassistant: " and t == "yo"


def test_loads_jsonl_csv_and_reports_missing(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    (tmp_path / "d.csv").write_text("text\nhello\nworld\n")
    assert D.load_rows(str(tmp_path / "d.jsonl"))[2] == {"question": "q2", "answer": "a2"}
    assert [r["text"] for r in D.load_rows(str(tmp_path / "d.csv"))] == ["hello", "world"]
    with pytest.raises(UserError, match="not found"):
        D.load_rows(str(tmp_path / "missing.jsonl"))


def test_tokenize_masks_prompt_and_truncates_keeping_the_answer():
    from flax_lora.demo import build_tokenizer

    tok = build_tokenizer()
    (ex,) = D.tokenize([("reverse 1 2 3 4 :", " four three two one")], tok, 16)
    assert ex.prompt_len == 6 and ex.loss_mask.tolist() == [0] * 6 + [1] * 5  # 4 words + eos
    (short,) = D.tokenize([("reverse 1 2 3 4 :", " four three two one")], tok, 8)
    # too long: the target keeps half the budget, the prompt loses its start (keeps the ":")
    assert len(short.ids) == 8 and short.loss_mask.sum() == 4 and short.ids[3] == tok.convert_tokens_to_ids(":")


def test_batches_are_bucketed_deterministic_and_resumable():
    ex = [D.Example(np.arange(n, dtype=np.int32), np.ones(n, np.int32), 0, "", "") for n in (3, 5, 9, 17, 20, 4, 6)]
    b = D.Batches(ex, batch_size=2, accum=2, seed=3, max_length=32, pad_id=0)
    assert b.steps_per_epoch == 2 and D.buckets(32) == [16, 32]
    stream = [x for _, x in zip(range(5), b.iterate())]
    assert all(x["input_ids"].shape[:2] == (2, 2) and x["input_ids"].shape[2] in (16, 32) for _, x in stream)
    # every example once per epoch: the padding rows carry no loss
    assert sum(int(x["loss_mask"].sum()) for _, x in stream[:2]) == sum(len(e.ids) for e in ex)
    pos2, _ = stream[2]
    resumed = next(b.iterate(stream[1][0]))
    assert resumed[0] == pos2 and np.array_equal(resumed[1]["input_ids"], stream[2][1]["input_ids"])
    assert not np.array_equal(b.order(0), b.order(1))
