"""int8 and throughput in `lora train`: a quantized demo run learns; MFU from a known device kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli


@pytest.mark.slow
def test_int8_demo_run_learns_and_records_throughput(tmp_path):
    import jax

    from flax_lora.run import RunDir
    from flax_lora.trainer import load_run

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


def test_mfu_from_model_shape_and_a_known_device(tiny_models):
    import jax

    from flax_lora import perf
    from flax_lora.lora import init_lora
    from flax_lora.targets import resolve_targets

    m = tiny_models["gpt2"]  # n_embd 32, 2 layers, vocab 64, lm_head tied to the embedding
    lora = init_lora(resolve_targets(m.linears(), "gpt2", preset="attention"), 4, jax.random.PRNGKey(0))
    n_lora = sum(x.size for x in jax.tree_util.tree_leaves(lora))
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # c_attn, attn c_proj, c_fc, mlp c_proj
    matmul = 2 * per_layer + 64 * 32
    fpt = perf.model_flops_fn(m.params, lora, m.config)(16)
    assert fpt == 4 * matmul + 6 * n_lora + 12 * 2 * 16 * 32
    tps = 1e6
    assert perf.mfu(tps, fpt, "NVIDIA H100 80GB HBM3") == pytest.approx(tps * fpt / 989e12)
    assert perf.mfu(tps, fpt, "NVIDIA H100 80GB HBM3", n_devices=2) == pytest.approx(tps * fpt / (2 * 989e12))
    assert perf.mfu(tps, fpt, "cpu") is None


def test_advised_gradient_checkpointing_reaches_the_run_config(tmp_path):
    from advisor import advise
    from flax_lora.trainer import config_from_advice

    tight = advise(samples=3000, vram_gb=3, model="llama-3.2-1b")
    assert tight.training.gradient_checkpointing
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = config_from_advice(tight, model="some/llama", data=str(data), output=str(tmp_path / "r"), overrides={})
    assert cfg.remat is True and cfg.quantization == "int8"
    roomy = advise(samples=3000, vram_gb=24, model="llama-3.2-1b")
    cfg = config_from_advice(roomy, model="some/llama", data=str(data), output=str(tmp_path / "r"), overrides={})
    assert cfg.remat is False
    cfg = config_from_advice(roomy, model="some/llama", data=str(data), output=str(tmp_path / "r"),
                             overrides={"remat": True})
    assert cfg.remat is True  # the flag wins
