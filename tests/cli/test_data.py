"""`lora data`: the format, kept and dropped rows, lengths, and the trained spans as `lora train`
builds them; JSON for scripts; one-line errors; no jax."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.helpers import ROOT, chat_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Tell me a joke about cats, please!"},
        {"role": "assistant", "content": "Why did the cat sit on the computer?"}]


@pytest.fixture()
def files(tmp_path):
    chat_tokenizer("chatml", tmp_path / "model")
    rows = [{"messages": CHAT}] * 19 + [{"messages": CHAT[:1]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_shows_exactly_the_assistant_turns_as_trained(files):
    res = CliRunner().invoke(cli, ["data", "--data", str(files / "chat.jsonl"), "--model", str(files / "model"),
                                   "--show", "1", "--max-length", "40"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "format chat(messages), chat template: the tokenizer's chat template" in out
    assert "rows: 20 read, 19 kept, 1 dropped" in out and "dropped line 20: the conversation has no assistant" in out
    assert "longer than max_length 40: 19" in out
    example = out.split("«like this»", 1)[1]
    assert example.count("«") == 2 and "«Paris.<|im_end|>»" in out and "«Why did the cat sit on the computer?<|im_end|>»" in out


def test_json_segments_and_a_tokenizer_free_estimate(files):
    res = CliRunner().invoke(cli, ["data", "--data", str(files / "chat.jsonl"), "--model", str(files / "model"),
                                   "--show", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["kept"] == 19 and report["length_unit"] == "tokens" and len(report["examples"]) == 2
    trained = [s["text"] for s in report["examples"][0]["segments"] if s["trained"]]
    assert trained == ["Paris.<|im_end|>", "Why did the cat sit on the computer?<|im_end|>"]
    assert "".join(s["text"] for s in report["examples"][0]["segments"]).startswith("<|im_start|>system")
    res = CliRunner().invoke(cli, ["data", "--data", str(files / "chat.jsonl"), "--json"])
    estimate = json.loads(res.output)
    assert estimate["length_unit"] == "estimated-tokens" and "built-in chatml" in estimate["chat_template"]
    # without a tokenizer the spans are still exact, at the character level
    trained = [s["text"] for s in estimate["examples"][0]["segments"] if s["trained"]]
    assert trained == ["Paris.<|im_end|>", "Why did the cat sit on the computer?<|im_end|>"]
    assert estimate["examples"][0]["trained_tokens"] is None


def test_bad_files_are_one_line_and_it_needs_no_jax(files):
    (files / "bad.jsonl").write_text('{"colour": "red"}\n')
    res = CliRunner().invoke(cli, ["data", "--data", str(files / "bad.jsonl")])
    assert res.exit_code == 2 and "no recognisable fields" in res.output and len(res.output.splitlines()) == 1
    code = ("import sys; from cli.main import main; sys.argv = ['lora', 'data', '--data', %r, '--model', %r];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('jax' in sys.modules, 'transformers' in sys.modules)"
            % (str(files / "chat.jsonl"), str(files / "model")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
