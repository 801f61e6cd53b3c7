"""`lora train / eval / generate` end to end on the demo model, resume, and bad input (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.helpers import run_config


def _train_cfg(demo_assets, out, **kw):
    model_dir, train, evald = demo_assets
    base = dict(eval_data=str(evald), max_length=16, batch_size=4, grad_accum=2, dropout=0.1, learning_rate=1e-3,
                target_preset="attention", log_every=3, rouge_examples=0, seed=1)
    return run_config(model_dir, train, out, **{**base, **kw})


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(demo_assets, tmp_path):
    from flax_lora.adapters.native import load_adapter
    from flax_lora.training.rundir import RunDir
    from flax_lora.training.loop import train

    train(_train_cfg(demo_assets, tmp_path / "full", max_steps=12), quiet=True)
    train(_train_cfg(demo_assets, tmp_path / "cut", max_steps=6), quiet=True)  # "interrupted" after 6
    train(_train_cfg(demo_assets, tmp_path / "cut", max_steps=12), resume=True, quiet=True)
    full, _, _, _ = load_adapter(tmp_path / "full" / "adapter")
    cut, _, _, _ = load_adapter(tmp_path / "cut" / "adapter")
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(cut)):
        np.testing.assert_array_equal(a, b)
    losses = lambda d: [(r["step"], r["loss"]) for r in RunDir(d).read_metrics() if "loss" in r]
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")  # every step logged once, same values
    assert [s for s, _ in losses(tmp_path / "cut")] == [3, 6, 9, 12]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = CliRunner().invoke(cli, ["train", "--output", str(out), "--max-steps", "120", "--quiet"])
    assert res.exit_code == 0, res.output
    return out, res


@pytest.mark.slow
def test_demo_run_dir_is_complete_and_learns(demo_run):
    out, res = demo_run
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out)
    for name in ("advice.json", "run_config.json", "resolved.json", "metrics.jsonl", "loss.png", "eval.json",
                 "adapter/adapter.json", "adapter/adapter.safetensors", "model/model.safetensors", "data/train.jsonl"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    assert ev["after"]["loss"] < 0.6 * ev["before"]["loss"]
    assert ev["after"]["rougeL"] > ev["before"]["rougeL"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(train_rows[0])
    assert train_rows[-1]["step"] == 120 and any("eval_loss" in r for r in rows)
    first = next(r for r in rows if r.get("event") == "first_step")
    assert first["step"] == 1 and first["time_to_first_step_seconds"] == pytest.approx(
        first["load_seconds"] + first["eval_before_seconds"] + first["compile_and_first_step_seconds"], abs=0.02)
    assert 0 < ev["eval_share"] < 1 and ev["eval_seconds"] > 0 and ev["time_to_first_step_seconds"] < ev["wall_seconds"]
    cfg = json.loads((out / "run_config.json").read_text())
    resolved = json.loads((out / "resolved.json").read_text())
    assert cfg["demo"] and cfg["max_steps"] == 120 and resolved["total_steps"] == 120 and len(resolved["targets"]) == 8
    # the adapter adapts exactly the modules the advice names (PEFT's suffix rule), in every layer
    names = json.loads((out / "advice.json").read_text())["lora"]["target_modules"]
    assert names == ["c_attn", "attn.c_proj"]
    wanted = [f"transformer/h/{i}/attn/{m}" for i in range(4) for m in ("c_attn", "c_proj")]
    assert sorted(resolved["targets"]) == sorted(wanted)
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert sorted(adapter["linears"]) == sorted(wanted)


@pytest.mark.slow
def test_eval_and_generate_from_run_dir(demo_run):
    out, _ = demo_run
    res = CliRunner().invoke(cli, ["eval", str(out), "--rouge-examples", "4"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert {"loss", "perplexity", "rouge1", "rouge2", "rougeL"} <= set(got)
    res = CliRunner().invoke(cli, ["generate", str(out), "--prompt", "reverse 1 2 3 4 :", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert set(res.stdout.split()) <= set("zero one two three four five six seven eight nine".split())
    res = CliRunner().invoke(cli, ["generate", "--model", str(out / "model"), "--adapter", str(out / "adapter"),
                                   "--prompt", "reverse 1 2 3 4 :", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output


def test_output_folder_of_a_different_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(run_config(None, None, out).to_json()))
    res = CliRunner().invoke(cli, ["train", "--output", str(out), "--max-steps", "1"])
    assert res.exit_code == 2 and "already holds a run" in res.output
    res = CliRunner().invoke(cli, ["train", "--output", str(out), "--max-steps", "1", "--resume", "--seed", "7"])
    assert res.exit_code == 2 and "different run" in res.output and "seed" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{model}", "--data", "{tmp}/missing.jsonl"], "data file not found"),
        (["--model", "{model}", "--data", "{tmp}/cols.jsonl"], "no recognisable fields"),
        (["--model", "{tmp}/no_such_model", "--data", "{tmp}/good.jsonl"], "no such folder"),
        (["--model", "no-such-org/no-such-model-xyz", "--data", "{tmp}/good.jsonl"], "neither a local folder"),
        (["--from-advice", "{tmp}/bad_advice.json"], "not a valid advice file"),
        (["--from-advice", "{tmp}/nope.json"], "advice file not found"),
        (["--model", "{model}"], "both --model and --data"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(args, message, tmp_path, demo_assets):
    (tmp_path / "cols.jsonl").write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    (tmp_path / "good.jsonl").write_text((json.dumps({"prompt": "a", "completion": "b"}) + "\n") * 3)
    (tmp_path / "bad_advice.json").write_text(json.dumps({"lora": {"r": -1}}))
    args = [a.format(tmp=tmp_path, model=demo_assets[0]) for a in args]
    res = CliRunner().invoke(cli, ["train", "--output", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_int8_demo_run_learns_and_records_throughput(tmp_path):
    import jax

    from flax_lora.training.build import load_run
    from flax_lora.training.rundir import RunDir

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--output", str(out), "--max-steps", "60", "--quantization", "int8", "--quiet"])
    assert res.exit_code == 0, res.output
    rd = RunDir(out)
    assert rd.load_config().quantization == "int8"
    logged = [r for r in rd.read_metrics() if "loss" in r]
    assert [r["step"] for r in logged] == [20, 40, 60]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert all(r["tokens_per_second"] > 0 and r.get("mfu") is None for r in logged)  # CPU: no known peak
    result = json.loads(rd.eval.read_text())
    assert result["after"]["loss"] < result["before"]["loss"]
    assert result["train_mfu"] is None and result["peak_memory_gb"] is None and result["devices"] == 1
    s, _ = load_run(out)  # the run's model is rebuilt quantized (the adapter was trained on it)
    kernels = [x for x in jax.tree_util.tree_leaves(s.model.params) if x.dtype == np.int8]
    assert kernels


def test_a_start_that_fails_leaves_no_folder_behind(tmp_path):
    """The demo writes its model and data, then the eval file is missing: the half-made folder goes,
    so the corrected command can use the same --output."""
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--output", str(out), "--eval-data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "not found" in res.output and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")  # a folder that was not empty is never removed
    res = CliRunner().invoke(cli, ["train", "--output", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output and (out / "keep.txt").read_text() == "mine"
