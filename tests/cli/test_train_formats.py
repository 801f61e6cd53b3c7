"""Each data format trains through `lora train` (a tiny Llama with a Llama-3-style chat template),
and the run records what it read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.flax_lora.training.test_same_tokens import ROWS
from tests.helpers import tiny_chat_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_llama(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_format_trains(model_dir, tmp_path, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[name] * 4))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(model_dir), "--data", str(path), "--output", str(out),
                                   "--max-steps", "3", "--max-length", "64", "-q"])
    assert res.exit_code == 0, res.output
    resolved = json.loads((out / "resolved.json").read_text())
    kind = {"prompt-completion": "pair", "alpaca": "alpaca", "chat": "chat", "sharegpt": "sharegpt", "text": "text"}[name]
    assert resolved["data_format"].startswith(kind)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3]
