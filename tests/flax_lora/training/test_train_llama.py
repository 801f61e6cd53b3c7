"""`lora train` on the project's Llama port: the layers scan (one layer compiled, not L), and
scanning, remat and the unrolled model train alike; adapters stay per layer on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_config

pytestmark = pytest.mark.slow  # trains or starts subprocesses

STEPS = dict(max_steps=6, log_every=2, save_every=3, eval_every=0, rouge_examples=4, max_new_tokens=4,
             batch_size=4, max_length=16, learning_rate=3e-2, target_preset="attention", seed=0,
             dropout=0.0)  # LoRA dropout masks are drawn per scanned layer: equal runs need none


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random-init Llama (3 layers, GQA) with the demo's word tokenizer, and demo data."""
    from transformers import LlamaConfig

    from flax_lora import demo
    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=64, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = causal_lm_from_config(cfg, seed=0)
    hub.save_pt_safetensors(d / "model", model.params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo.make_rows(96, 0)))
    return d


def _train(d, out, scan=True, monkeypatch=None, **over):
    import flax_lora.models as models
    from flax_lora.training.loop import train

    if not scan:  # the unrolled model, for comparison (build() imports load_model when it runs)
        real = models.load_model
        monkeypatch.setattr(models, "load_model", lambda src, **kw: real(src, **{**kw, "scan": False}))
    cfg = run_config(d / "model", d / "train.jsonl", out, **{**STEPS, **over})
    result = train(cfg, quiet=True)
    if not scan:
        monkeypatch.undo()
    return result


def _losses(run):
    from flax_lora.training.rundir import RunDir

    return [r["loss"] for r in RunDir(run).read_metrics() if "loss" in r]


@pytest.fixture(scope="module")
def runs(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    try:
        _train(llama_dir, out / "scan")
        _train(llama_dir, out / "flat", scan=False, monkeypatch=mp)
        _train(llama_dir, out / "remat", remat=True)
    finally:
        mp.undo()
    return out


def test_scanned_training_learns_and_records_it(runs):
    from flax_lora.training.rundir import RunDir

    rd = RunDir(runs / "scan")
    resolved = rd.load_resolved()
    assert resolved.scan_layers is True and resolved.model_type == "llama"
    losses = _losses(runs / "scan")
    assert len(losses) == 3 and all(np.isfinite(losses))
    ev = json.loads(rd.eval.read_text())
    assert ev["after"]["loss"] < ev["before"]["loss"] - 0.1, ev  # it learns
    meta = json.loads((rd.adapter / "adapter.json").read_text())
    assert meta["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(meta["linears"]) == sorted(f"model/layers/{i}/self_attn/{m}" for i in range(3)
                                            for m in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_scan_unrolled_and_remat_train_alike(runs):
    from flax_lora.adapters.native import load_adapter

    base = _losses(runs / "scan")
    for other in ("flat", "remat"):
        np.testing.assert_allclose(_losses(runs / other), base, rtol=2e-5, err_msg=other)
    a, _, _, _ = load_adapter(runs / "scan" / "adapter")
    for other in ("flat", "remat"):
        b, _, _, _ = load_adapter(runs / other / "adapter")
        import jax

        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def test_eval_generate_and_continue_a_scanned_run(runs, llama_dir, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    res = CliRunner().invoke(cli, ["eval", str(runs / "scan"), "--rouge-examples", "2"])
    assert res.exit_code == 0, res.output
    before = json.loads((runs / "scan" / "eval.json").read_text())["after"]["loss"]
    assert json.loads(res.output)["loss"] == pytest.approx(before, rel=1e-4)
    res = CliRunner().invoke(cli, ["generate", str(runs / "scan"), "--prompt", "reverse 1 2 3 4 :", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    # continue the per-layer adapter in a scanned model: it starts where the first run ended
    _train(llama_dir, tmp_path / "more", adapter=str(runs / "scan" / "adapter"), max_steps=2, log_every=1)
    from flax_lora.training.rundir import RunDir

    first = [r for r in RunDir(tmp_path / "more").read_metrics() if "eval_loss" in r][0]["eval_loss"]
    assert first == pytest.approx(before, rel=1e-4)


@pytest.mark.legacy
def test_remat_is_refused_for_a_family_without_it(tmp_path, llama_dir):
    """OPT runs on transformers' Flax class (the flax-legacy extra), which has no remat."""
    from click.testing import CliRunner
    from transformers import OPTConfig

    from cli.main import cli
    from flax_lora import demo
    from flax_lora.models import hub
    from flax_lora.models.registry import from_config

    cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    hub.save_pt_safetensors(tmp_path / "opt", from_config(cfg).params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), tmp_path / "opt")
    res = CliRunner().invoke(cli, ["train", "--model", str(tmp_path / "opt"), "--data", str(llama_dir / "train.jsonl"),
                                   "--output", str(tmp_path / "r"), "--remat", "--max-steps", "2", "-q"])
    assert res.exit_code == 2 and "--remat" in res.output and "'opt'" in res.output, res.output


def test_remat_trains_the_demo_on_the_gpt2_port(tmp_path):
    """The demo's GPT-2 runs on the project's port, which recomputes activations (--remat) too."""
    from click.testing import CliRunner

    from cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--output", str(tmp_path / "r"), "--remat", "--max-steps", "2",
                                   "--eval-every", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "resolved.json").read_text())["model_type"] == "gpt2"
