"""benchmarks/e2e.py: the generated job is what it says (token lengths, seeded), and a tiny run of
our side reports figures taken from the run itself (the tokens it counts are the data's tokens, its
times bracket the trainer's own), with the TRL side skipped and saying why."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

SCRIPT = ROOT / "benchmarks" / "e2e.py"


def _e2e():
    """The benchmark script as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("e2e_bench", SCRIPT)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_generated_rows_have_the_drawn_token_lengths(tmp_path):
    from tokenizers import Tokenizer

    e2e = _e2e()
    words = e2e.pseudo_words(e2e.N_WORDS)
    assert e2e.write_tokenizer(tmp_path, words) <= 512  # fits the tiny shape's vocabulary
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rows = e2e.make_rows(300, seed=3, words=words)
    assert rows == e2e.make_rows(300, seed=3, words=words) and rows != e2e.make_rows(300, seed=4, words=words)
    prompts = [len(tok.encode(r["prompt"]).ids) for r in rows]
    completions = [len(tok.encode(r["completion"]).ids) for r in rows]
    assert min(prompts) >= 20 and max(prompts) <= 400 and min(completions) >= 10 and max(completions) <= 200
    assert max(prompts) > 3 * sorted(prompts)[150]  # a long tail over the median
    unk = tok.token_to_id("<unk>")
    assert all(unk not in tok.encode(r["prompt"] + r["completion"] + "</s>").ids for r in rows)
    assert all(tok.encode(r["prompt"] + r["completion"] + "</s>").ids[-1] == tok.token_to_id("</s>") for r in rows)


@pytest.mark.slow
def test_tiny_run_reports_what_our_side_did_and_skips_trl_without_its_python(tmp_path, jax_cache):
    from transformers import AutoTokenizer

    env = subprocess_env(jax_cache)
    env.pop("LORA_TRL_PYTHON", None)
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "8", "--batch-size", "4", "--examples", "32",
           "--max-length", "1024", "--precision", "fp32", "--packing", "off", "--workdir", str(tmp_path / "work"),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "LORA_TRL_PYTHON" in report["versions"]["trl"]["skipped"]
    (run,) = report["runs"]
    assert "LORA_TRL_PYTHON" in run["trl"]["skipped"] and "skipped: no TRL python" in proc.stdout
    r = run["lora"]

    # 8 steps of 4 over 32 examples: one epoch, every example once, none cut at 1024 tokens
    tok = AutoTokenizer.from_pretrained(report["job"]["model"])
    rows = [json.loads(line) for line in open(report["job"]["data"])]
    assert len(rows) == 32 and r["train_rows"] == 32
    assert r["tokens_total"] == sum(len(tok(x["prompt"] + x["completion"])["input_ids"]) + 1 for x in rows)
    assert r["target_tokens_total"] == sum(len(tok(x["completion"])["input_ids"]) + 1 for x in rows)
    assert r["padded_tokens_total"] > r["tokens_total"]  # padded to the length buckets

    # times: the process brackets the trainer's own clock; the steady rate agrees with the trainer's
    rep = r["reported"]
    assert r["wall_s"] > rep["wall_seconds"] and r["time_to_first_step_s"] > rep["time_to_first_step_seconds"]
    assert r["wall_s"] > r["time_to_first_step_s"] > 0 and r["eval_s"] > 0
    assert r["wall_without_eval_s"] == pytest.approx(r["wall_s"] - r["eval_s"], abs=0.02)
    assert r["time_to_first_step_without_eval_s"] == pytest.approx(r["time_to_first_step_s"] - rep["eval_before_seconds"], abs=0.02)
    assert r["steady_steps"] == [2, 8]
    assert 0.5 < r["steady_tokens_per_s"] / rep["train_tokens_per_second"] < 2.0
    assert 0 < r["steady_target_tokens_per_s"] < r["steady_tokens_per_s"]
    assert r["peak_rss_mb"] > 200  # a JAX process, measured by wait4
    # random init near uniform over the 512-entry vocabulary: the losses are the run's, not placeholders
    assert abs(r["first_loss"] - math.log(512)) < 0.1 and math.isfinite(r["final_loss"]) and r["final_loss_steps"] == [1, 8]
    assert set(report["machine"]["flags"]) >= {"avx512f", "avx512_bf16", "amx_bf16"}
    assert report["versions"]["lora"]["jax"] and os.path.isfile(report["job"]["eval_data"])
