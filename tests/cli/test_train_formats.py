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


def test_a_bf16_run_on_the_cpu_trains_evaluates_and_generates(model_dir, tmp_path):
    """bf16 on XLA:CPU (what `lora train` picks on AVX512-BF16 CPUs): the step packs its layer
    residuals and reads the stacked kernels as uint16 (flax_lora.residuals, matmul.storage_view);
    the loss, the before/after evaluation and generation all run on those weights."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS["chat"] * 4))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(model_dir), "--data", str(path), "--output", str(out),
                                   "--max-steps", "4", "--max-length", "64", "--precision", "bf16",
                                   "--learning-rate", "1e-2", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run_config.json").read_text())["precision"] == "bf16"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["after"]["loss"] < ev["before"]["loss"], ev
    gen = CliRunner().invoke(cli, ["generate", str(out), "--prompt", "What is the capital of France?",
                                   "--max-new-tokens", "4"])
    assert gen.exit_code == 0 and gen.stdout.strip(), gen.output
