"""The fused chunked vocabulary loss equals the plain log-softmax loss, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.training.losses import fused_token_nll, model_token_nll
from flax_lora.training.losses import token_nll


def _data(vocab_major, b=3, t=11, h=16, v=37, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(ks[0], (b, t, h))
    w = jax.random.normal(ks[1], (v, h) if vocab_major else (h, v))
    ids = jax.random.randint(ks[2], (b, t), 0, v)
    mask = (jax.random.uniform(ks[3], (b, t)) > 0.4).astype(jnp.int32)
    return hidden, w, ids, mask


def _ref(hidden, w, ids, mask, vocab_major):
    logits = hidden @ (w.T if vocab_major else w)
    return token_nll(logits, ids, mask)


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_value_and_grad_match_plain_loss(vocab_major, chunk):
    hidden, w, ids, mask = _data(vocab_major)
    ref = lambda h: _ref(h, w, ids, mask, vocab_major)[0]
    fused = jax.jit(lambda h: fused_token_nll(h, w, ids, mask, vocab_major=vocab_major, chunk=chunk)[0])
    np.testing.assert_allclose(float(fused(hidden)), float(ref(hidden)), rtol=1e-5)
    g_ref, g_fused = jax.grad(ref)(hidden), jax.jit(jax.grad(fused))(hidden)
    np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_ref), atol=1e-5)
    assert float(jnp.abs(g_fused[:, -1]).max()) == 0.0  # the last position predicts nothing
    count = fused_token_nll(hidden, w, ids, mask, vocab_major=vocab_major, chunk=chunk)[1]
    assert float(count) == float(mask[:, 1:].sum())


def test_masked_positions_cost_nothing_and_get_no_gradient():
    hidden, w, ids, mask = _data(True)
    mask = jnp.zeros_like(mask).at[0, 3].set(1)  # one target token
    g = jax.jit(jax.grad(lambda h: fused_token_nll(h, w, ids, mask, chunk=4)[0]))(hidden)
    nz = np.argwhere(np.abs(np.asarray(g)).sum(-1) > 0)
    assert nz.tolist() == [[0, 2]]  # only position 2 (which predicts token 3) is in the loss
    assert float(fused_token_nll(hidden, w, ids, jnp.zeros_like(mask))[0]) == 0.0


def test_bf16_hidden_close_to_float32():
    hidden, w, ids, mask = _data(True, h=64, v=301)
    ref = float(_ref(hidden, w, ids, mask, True)[0])
    got = float(fused_token_nll(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16), ids, mask)[0])
    assert abs(got - ref) / abs(ref) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_llama_train_loss_fused_equals_logits_path(tied, monkeypatch):
    from transformers import LlamaConfig

    from flax_lora.lora import LoraConfig, init_lora, lora_active
    from flax_lora.models import CausalLM
    from flax_lora.models.decoder import load_decoder
    from flax_lora.targets import resolve_targets

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                      tie_word_embeddings=tied, initializer_range=0.2)
    module, params, _ = load_decoder(cfg)
    model = CausalLM(module, params, cfg, "llama", "test")
    targets = resolve_targets(model.linears(), "llama", preset="attention")
    lora = init_lora(targets, 4, jax.random.PRNGKey(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, lora)  # B != 0
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 97)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[1, 9:].set(0),
             "loss_mask": jnp.ones_like(ids).at[:, :4].set(0).at[1, 9:].set(0)}

    def loss(lo, fused):
        monkeypatch.setenv("LORA_FUSED_LOSS", "1" if fused else "0")
        with lora_active(LoraConfig(4, 8).scaling):
            return model_token_nll(model, {"params": params, "lora": lo}, batch)[0]

    v0, g0 = jax.value_and_grad(loss)(lora, False)
    v1, g1 = jax.value_and_grad(loss)(lora, True)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_one_pass_max_sumexp_matches_two_passes():
    """The GPU's single-pass (variadic reduce) max / sum-exp equals the CPU's two passes."""
    from flax_lora.training.losses import _max_sumexp_one_pass, _max_sumexp_two_pass

    x = jax.random.normal(jax.random.PRNGKey(0), (5, 1000)) * 30.0
    x = x.at[1].set(-1e30).at[2, 7].set(80.0)  # a row of huge negatives, a dominant entry
    m1, s1 = jax.jit(_max_sumexp_one_pass)(x)
    m2, s2 = jax.jit(_max_sumexp_two_pass)(x)
    assert m1.shape == s1.shape == (5, 1)
    np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-5)
