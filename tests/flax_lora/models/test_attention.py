"""LORA_ATTENTION=auto (jax.nn.dot_product_attention) gives the explicit-scores logits on valid positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def test_fused_attention_matches_explicit_scores_with_right_padding(monkeypatch):
    from transformers import LlamaConfig

    from flax_lora.models.decoder import load_decoder

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, initializer_range=0.1)
    module, params, _ = load_decoder(cfg, scan=True)
    ids = jax.random.randint(jax.random.PRNGKey(0), (3, 16), 0, 97)
    mask = jnp.ones_like(ids).at[1, 10:].set(0).at[2, 5:].set(0)

    def logits():
        return np.asarray(jax.jit(lambda p: module.apply({"params": p}, ids, mask).logits)(params))

    monkeypatch.setenv("LORA_ATTENTION", "xla")
    ref = logits()
    monkeypatch.setenv("LORA_ATTENTION", "auto")
    got = logits()
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5)


def test_default_kernel_choice(monkeypatch):
    """Unset: flash attention only on GPUs in half precision with a cuDNN head size; the
    variable always wins."""
    import flax_lora.models.decoder as llama

    monkeypatch.delenv("LORA_ATTENTION", raising=False)
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    assert llama._fused_attention(jnp.bfloat16, 64) == "cudnn"
    assert llama._fused_attention(jnp.float32, 64) is None      # fp32: cuDNN flash has no kernel
    assert llama._fused_attention(jnp.bfloat16, 256) is None    # head size cuDNN does not take
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "cpu")
    assert llama._fused_attention(jnp.bfloat16, 64) is None
    monkeypatch.setenv("LORA_ATTENTION", "xla")
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    assert llama._fused_attention(jnp.bfloat16, 64) is None
