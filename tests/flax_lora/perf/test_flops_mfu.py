"""LoRA training FLOPs per token from a model's shape, and MFU against a known device's peak."""

from __future__ import annotations

import pytest


def test_mfu_from_model_shape_and_a_known_device(tiny_models):
    import jax

    from flax_lora.perf import flops as perf
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
