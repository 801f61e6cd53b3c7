"""The advisor measures exactly the token sequences the trainer builds, for every format: chat
(template and special tokens included), ShareGPT, Alpaca with a system prompt, prompt/completion
and text documents (whose windows it counts)."""

from __future__ import annotations

import json

import pytest

from advisor import advise
from advisor.data_stats import measure
from flax_lora.training.build import build
from flax_lora.training.config import config_from_advice
from flax_lora.training.rundir import RunDir
from tests.helpers import tiny_chat_llama

Q, A = "What is the capital of France?", "Paris."
ROWS = {
    "chat": [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": Q * (i % 3 + 1)}, {"role": "assistant", "content": A},
                           {"role": "user", "content": "Tell me a joke about cats, please!"},
                           {"role": "assistant", "content": "Why did the cat sit on the computer?" * (i % 2 + 1)}]}
             for i in range(12)],
    "sharegpt": [{"conversations": [{"from": "human", "value": Q * (i % 4 + 1)}, {"from": "gpt", "value": A}]}
                 for i in range(12)],
    "alpaca": [{"system": "You are a helpful assistant.", "instruction": Q, "input": "France" * (i % 3),
                "output": A * (i % 2 + 1)} for i in range(12)],
    "prompt-completion": [{"prompt": Q * (i % 5 + 1), "completion": A} for i in range(12)],
    "text": [{"text": " ".join(["The capital of France is Paris."] * (i + 1))} for i in range(12)],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # BOS from the tokenizer and from the template: one must win
    return tiny_chat_llama(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_advisor_lengths_equal_the_trainers_sequences(model_dir, tmp_path, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[name]))
    measured = measure(path, model_dir)
    advice = advise(data=str(path), model=str(model_dir), vram_gb=16, max_length=1024)
    assert advice.data.length_unit == "tokens" and advice.data.max == max(measured.lengths)
    cfg = config_from_advice(advice, model=str(model_dir), data=str(path), output=str(tmp_path / "run"),
                             overrides={"eval_data": str(path)})
    s = build(cfg, RunDir(tmp_path / "run"))
    assert [len(ex.ids) for ex in s.train_examples] == measured.lengths
    assert [ex.loss_mask.tolist() for ex in s.train_examples] == [ex.loss_mask.tolist() for ex in measured.examples]
    bos = s.tokenizer.bos_id
    assert all(ex.ids.tolist().count(bos) == 1 for ex in s.train_examples)


def test_text_windows_counted_by_the_advisor_are_the_trainers(model_dir, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS["text"]))
    advice = advise(data=str(path), model=str(model_dir), vram_gb=16, max_length=64)
    cfg = config_from_advice(advice, model=str(model_dir), data=str(path), output=str(tmp_path / "run"),
                             overrides={"eval_data": str(path)})
    s = build(cfg, RunDir(tmp_path / "run"))
    assert advice.data.windows == len(s.train_examples) > len(ROWS["text"])
    assert s.reports["train"].windows > 0 and "split into" in s.reports["train"].summary()
    trained = sum(int(ex.loss_mask.sum()) for ex in s.train_examples)
    whole = sum(int(ex.loss_mask.sum()) for ex in measure(path, model_dir).examples)
    assert trained == whole  # every token trained once, none dropped
