import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from advisor import Advice, advise
from cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_default_table_shows_values_reasons_memory():
    res = run("advise", "--samples", "3000", "--vram", "12")
    assert res.exit_code == 0, res.output
    expected = advise(samples=3000, vram_gb=12)
    out = res.stdout
    assert "3,000 samples, 12 GB GPU" in out
    for name in ("r", "alpha", "dropout", "per_device_batch_size", "learning_rate", "max_length", "epochs"):
        assert f"\n  {name} " in out
    assert f"{expected.memory.total_gb:.2f} / 12 GB" in out and "frozen weights" in out
    assert expected.model.name in out and "[#" in out


def test_json_matches_the_api_and_file_is_written(tmp_path):
    target = tmp_path / "sub" / "advice.json"
    res = run("advise", "--samples", "3000", "--vram", "12", "--task", "summarization", "--json", "-o", str(target))
    assert res.exit_code == 0, res.output
    printed = Advice.from_json(res.stdout)
    assert printed == Advice.from_json(target.read_text())
    assert printed == advise(samples=3000, vram_gb=12, task="summarization")
    assert not [p for p in target.parent.iterdir() if p.name != "advice.json"]  # no temp file left


def test_flags_reach_the_request():
    res = run("advise", "--samples", "500", "--vram", "24", "--model", "gpt2", "--recipe", "quick",
              "--style", "conservative", "--targets", "c_attn", "--grad-accum", "3", "--lr-schedule", "cosine",
              "--noisy", "--gpus", "2", "--precision", "fp32", "--json")
    assert res.exit_code == 0, res.output
    a = json.loads(res.stdout)
    assert a["lora"]["alpha"] == 4 and a["lora"]["target_modules"] == ["c_attn"] and a["lora"]["dropout"] == 0.2
    assert a["training"]["gradient_accumulation_steps"] == 3 and a["training"]["gpus"] == 2
    assert (a["training"]["lr_schedule"], a["training"]["precision"]) == ("cosine", "fp32")


def test_recipes_lists_four():
    res = run("recipes")
    assert res.exit_code == 0
    for name in ("quick", "balanced", "max-quality", "memory-constrained"):
        assert name in res.stdout
    assert set(json.loads(run("recipes", "--json").stdout)) == {"quick", "balanced", "max-quality",
                                                               "memory-constrained"}


@pytest.mark.parametrize("args,needle", [
    (["--samples", "-5", "--vram", "12"], "--samples"),
    (["--samples", "abc", "--vram", "12"], "--samples"),
    (["--samples", "10", "--vram", "0"], "more than 0"),
    (["--samples", "10", "--vram", "lots"], "not a number"),
    (["--samples", "10", "--vram", "12", "--task", "poetry"], "--task"),
    (["--samples", "10", "--vram", "12", "--recipe", "fast"], "--recipe"),
    (["--vram", "12"], "samples"),
    (["--samples", "10", "--vram", "12", "--data", "/nonexistent/d.jsonl"], "d.jsonl"),
    (["--samples", "10", "--vram", "12", "--model", "acme/unknown-model"], "--model-params"),
    (["--samples", "10", "--vram", "12", "--model-params", "big"], "1.3B"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    res = run("advise", *args)
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and needle in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_vram_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    res = run("advise", "--samples", "10", "--vram", "auto")
    assert res.exit_code == 2 and "pass a number" in res.stderr
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 24564\necho 81559\n")
    fake.chmod(0o755)
    res = run("advise", "--samples", "10", "--vram", "auto", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["request"]["vram_gb"] == pytest.approx(24564 / 1024)


def test_real_process_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "cli", "advise", "--samples", "-5", "--vram", "12"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    (tmp_path / "d.jsonl").write_text("{broken\n")
    bad = subprocess.run([sys.executable, "-m", "cli", "advise", "--vram", "12", "--data", str(tmp_path / "d.jsonl")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "line 1: not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "cli", "advise", "--samples", "3000", "--vram", "12", "--json"],
                        capture_output=True, text=True, cwd=ROOT, env=env)
    assert ok.returncode == 0 and Advice.from_json(ok.stdout).training.total_steps > 0


def test_no_heavy_imports():
    code = (
        "import sys\n"
        "from advisor import advise\n"
        "import advisor.rules, advisor.data_stats, advisor.io, cli.advise\n"
        "from click.testing import CliRunner\n"
        "from cli.main import cli\n"
        "advise(samples=3000, vram_gb=12, model='gpt2')\n"
        "assert CliRunner().invoke(cli, ['advise', '--samples', '3000', '--vram', '12']).exit_code == 0\n"
        "heavy = {'jax', 'flax', 'transformers', 'datasets', 'torch', 'flax_lora'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("flag,want", [("--packing", True), ("--no-packing", False)])
def test_packing_flag_is_the_advice_and_says_it_was_given(flag, want):
    res = run("advise", "--samples", "3000", "--vram", "12", "--model", "HuggingFaceTB/SmolLM2-135M", flag, "--json")
    assert res.exit_code == 0, res.output
    advice = Advice.from_json(res.stdout)
    assert advice == advise(samples=3000, vram_gb=12, model="HuggingFaceTB/SmolLM2-135M", packing=want)
    assert advice.training.packing is want
