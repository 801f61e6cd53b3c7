"""Bad data, torn metrics, adapters (native and PEFT), model-loading hygiene and output paths,
through the real `lora` CLI (in process) on the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.helpers import run_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, jax_cache):
    """A short finished demo run (model/, data/, adapter/, checkpoints/), no ROUGE (generation compiles)."""
    from flax_lora.training.loop import train

    out = tmp_path_factory.mktemp("reliab") / "run"
    train(run_config(None, None, out, max_steps=4, save_every=2, rouge_examples=0), quiet=True)
    return out


def lora(*args: str):
    res = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in res.output, res.output
    return res


def _pairs(n: int) -> list[str]:
    return [json.dumps({"prompt": f"reverse {i % 10} 1 2 3 :", "completion": " three two one zero"}) for i in range(n)]


# ----------------------------------------------------------------------------- bad data


@pytest.mark.slow  # pays the module's demo run (~20 s)
def test_bad_rows_are_skipped_reported_by_line_and_recorded(run, tmp_path):
    lines = _pairs(30)
    lines[2] = '{"prompt": "reverse 1 2 3 4 :", "completion": '  # invalid JSON
    lines[6] = json.dumps({"prompt": "reverse 1 2 3 4 :"})  # missing field
    lines[9] = json.dumps({"prompt": "reverse " + "1 " * 40 + ":", "completion": " one"})  # longer than max_length
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    res = lora("train", "--model", str(run / "model"), "--data", str(data), "--output", str(tmp_path / "out"),
               "--max-steps", "1", "--max-length", "16", "--batch-size", "2", "-q")
    assert res.exit_code == 0, res.output
    assert "skipped 2 of 30 rows" in res.stderr and "line 3: not valid JSON" in res.stderr
    assert "line 7: field 'completion' is missing" in res.stderr and "(lines 10)" in res.stderr
    rep = json.loads((tmp_path / "out" / "data_report.json").read_text())["train"]
    assert (rep["rows"], rep["bad"], rep["used"], rep["truncated"]) == (30, 2, 28, 1)
    assert [b["line"] for b in rep["bad_rows"]] == [3, 7] and rep["truncated_rows"] == [10]

    res = lora("train", "--model", str(run / "model"), "--data", str(data), "--output", str(tmp_path / "o2"),
               "--on-bad-row", "fail")
    assert res.exit_code == 2 and "2 bad rows of 30 with --on-bad-row fail" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name, content, needle", [
    ("many_bad.jsonl", "\n".join(_pairs(8) + ["{oops"] * 2) + "\n", "2 of 10 rows are bad (20%, more than 10%)"),
    ("all_bad.jsonl", json.dumps({"prompt": "", "completion": ""}) + "\n", "no usable rows, all 1 are bad"),
    ("empty.jsonl", "\n\n", "has no rows"),
    ("parquet.jsonl", "PAR1\x00\x01binary", "is a Parquet file, not JSONL text"),
    ("text.parquet", '{"prompt": "a", "completion": "b"}\n', "is JSON or JSON Lines text, not a Parquet file"),
    ("table.jsonl", "prompt,completion\na,b\n", "looks like CSV, not JSON Lines"),
])
def test_unusable_data_files_exit_2_with_one_line(run, tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    res = lora("train", "--model", str(run / "model"), "--data", str(tmp_path / name), "--output", str(tmp_path / "o"))
    assert res.exit_code == 2 and needle in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- torn metrics


@pytest.mark.slow
def test_torn_metrics_line_is_skipped_by_diagnose_and_repaired_by_resume(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0.01, "lo')  # a kill mid-append
    res = lora("diagnose", str(copy))
    assert res.exit_code == 0 and "cut off mid-write" in res.output, res.output
    from flax_lora.training.rundir import RunDir

    assert all("step" in r for r in RunDir(copy).read_metrics())
    res = lora("train", "--output", str(copy), "--resume", "--max-steps", "6", "-q")
    assert res.exit_code == 0, res.output
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line parses: the torn one is gone
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [4, 6]


# ----------------------------------------------------------------------------- adapters


@pytest.mark.slow
def test_generate_and_continue_training_from_native_and_peft_adapters(run, tmp_path, monkeypatch):
    from flax_lora.adapters.peft import export_peft

    peft = export_peft(run / "adapter", tmp_path / "peft")
    prompt = ["--prompt", "reverse 1 2 3 4 :", "--max-new-tokens", "4"]
    native = lora("generate", "--model", str(run / "model"), "--adapter", str(run / "adapter"), *prompt)
    via_peft = lora("generate", "--model", str(run / "model"), "--adapter", str(peft), *prompt)
    assert native.exit_code == 0 and via_peft.exit_code == 0, native.output + via_peft.output
    assert native.stdout == via_peft.stdout and native.stdout.strip()

    # Continue the PEFT adapter, from relative paths: the run records absolute ones.
    monkeypatch.chdir(run.parent)
    res = lora("train", "--model", "run/model", "--data", "run/data/train.jsonl", "--eval-data", "run/data/eval.jsonl",
               "--adapter", str(peft), "--output", str(tmp_path / "cont"), "--max-steps", "2", "-q")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "cont" / "run_config.json").read_text())
    assert cfg["model"] == str((run / "model").resolve()) and Path(cfg["data"]).is_absolute()
    assert cfg["adapter"] == str(peft.resolve()) and cfg["r"] == json.loads((peft / "adapter_config.json").read_text())["r"]
    assert json.loads((tmp_path / "cont" / "adapter" / "adapter.json").read_text())["base_model"] == str((run / "model").resolve())
    before = json.loads((tmp_path / "cont" / "eval.json").read_text())["before"]["loss"]
    assert before == pytest.approx(json.loads((run / "eval.json").read_text())["after"]["loss"], rel=1e-4)


def test_mismatching_adapters_name_the_first_mismatch(run, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from flax_lora.adapters.peft import export_peft

    peft = export_peft(run / "adapter", tmp_path / "peft")
    tensors = load_file(str(peft / "adapter_model.safetensors"))
    renamed = {k.replace("attn.c_attn", "attn.q_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(peft / "adapter_model.safetensors"))
    res = lora("generate", "--model", str(run / "model"), "--adapter", str(peft), "--prompt", "reverse 1 :")
    assert res.exit_code == 2 and "attn.q_proj does not exist in this model" in res.output, res.output

    import shutil

    native = tmp_path / "native"
    shutil.copytree(run / "adapter", native)
    tensors = load_file(str(native / "adapter.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(native / "adapter.safetensors"))
    res = lora("train", "--model", str(run / "model"), "--data", str(run / "data" / "train.jsonl"),
               "--adapter", str(native), "--output", str(tmp_path / "o"), "--max-steps", "1")
    assert res.exit_code == 2 and f"adapter tensor {first} has shape (3, 3)" in res.output, res.output
    res = lora("generate", "--model", str(run / "model"), "--adapter", str(tmp_path / "nope"), "--prompt", "x")
    assert res.exit_code == 2 and "no such run or adapter directory" in res.output


# ----------------------------------------------------------------------------- model loading


def _model_copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run / "model", tmp_path / "model"))


def test_corrupt_safetensors_and_numpy_dtype(run, tmp_path):
    model = _model_copy(run, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "dtype": "numpy", "torch_dtype": "numpy"}))
    ok = lora("generate", "--model", str(model), "--prompt", "reverse 1 2 :", "--max-new-tokens", "2")
    assert ok.exit_code == 0, ok.output
    raw = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated download
    res = lora("generate", "--model", str(model), "--prompt", "x")
    assert res.exit_code == 2 and "model.safetensors" in res.output and "truncated" in res.output, res.output
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    res = lora("generate", "--model", str(model), "--prompt", "x")
    assert res.exit_code == 2 and "not a safetensors file" in res.output, res.output


def test_remote_code_config_is_refused_before_anything_runs(run, tmp_path):
    model = _model_copy(run, tmp_path)
    marker = tmp_path / "PWNED"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}}))
    res = lora("generate", "--model", str(model), "--prompt", "x")
    assert res.exit_code == 2 and "never runs remote code" in res.output, res.output
    assert not marker.exists()


# ----------------------------------------------------------------------------- output paths


def test_output_paths_stay_inside_the_run_folder(run, tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.training.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    with pytest.raises(UserError, match="outside the output folder"):
        rd.child("../escape.json")
    with pytest.raises(UserError, match="outside the output folder"):
        rd.child("/etc/passwd")
    import shutil

    copy = Path(shutil.copytree(run, tmp_path / "run"))
    outside = tmp_path / "elsewhere.json"
    outside.write_text((copy / "run_config.json").read_text())
    (copy / "run_config.json").unlink()
    (copy / "run_config.json").symlink_to(outside)  # planted link out of the folder
    res = lora("train", "--output", str(copy), "--resume", "--max-steps", "6")
    assert res.exit_code == 2 and "points outside the output folder" in res.output, res.output
