"""int8 weight-only quantization: memory, logit error, and training on quantized frozen weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_lora.lora import LoraConfig, init_lora, lora_active
from flax_lora.models import CausalLM
from flax_lora.quant import SCALE, nbytes, quant_active, quantize_kernel, quantize_params


def _llama(scan=False):
    from transformers import LlamaConfig

    from flax_lora.models.decoder import load_decoder

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False,
                      initializer_range=0.05)
    module, params, _ = load_decoder(cfg, scan=scan)
    return CausalLM(module, params, cfg, "llama", "test")


def _ids():
    return jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 97)


def test_kernel_roundtrip_error_is_half_a_step():
    w = jax.random.normal(jax.random.PRNGKey(0), (48, 24))
    q, s = quantize_kernel(w, out_axis=-1)
    assert q.dtype == jnp.int8 and s.shape == (24,)
    err = jnp.abs(q.astype(jnp.float32) * s - w)
    assert bool(jnp.all(err <= s / 2 + 1e-7))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_llama_logits_close_and_linears_four_times_smaller(scan):
    model = _llama(scan)
    qparams = quantize_params(model.params)
    flat, qflat = flatten_dict(model.params), flatten_dict(qparams)
    kernels = [k for k in flat if k[-1] == "kernel" and "lm_head" not in k]
    assert kernels and all(qflat[k].dtype == jnp.int8 and k[:-1] + (SCALE,) in qflat for k in kernels)
    assert qflat[("lm_head", "kernel")].dtype == jnp.float32  # the head stays
    lin = sum(flat[k].nbytes for k in kernels)
    assert nbytes(model.params) - nbytes(qparams) == pytest.approx(lin * 3 / 4, rel=0.05)  # minus scales
    ids = _ids()
    ref = model.logits({"params": model.params}, ids, jnp.ones_like(ids))
    with quant_active():
        got = model.logits({"params": qparams}, ids, jnp.ones_like(ids))
    rel = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    l2 = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    print(f"int8 logit error: max abs / max |logit| {rel:.2e}, relative L2 {l2:.2e}")
    assert 0 < rel < 5e-2 and l2 < 2e-2


def test_gpt2_conv1d_quantized_matches():
    from transformers import GPT2Config

    from flax_lora.models.gpt2 import causal_lm_from_config

    model = causal_lm_from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      initializer_range=0.2))
    conv = [p for p, i in model.linears().items() if i.kind == "conv1d"]
    qparams = quantize_params(model.params, conv1d_paths=conv)
    ids = _ids() % 64
    ref = model.logits({"params": model.params}, ids, jnp.ones_like(ids))
    with quant_active():
        got = model.logits({"params": qparams}, ids, jnp.ones_like(ids))
    assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_scanned_gpt2_port_quantizes_its_conv1d_kernels_as_unrolled(method):
    """``lora train`` scans the GPT-2 port: its stacked Conv1D kernels ([L, out, in]) are quantized
    per output channel like the unrolled ones (paths named in the stacked layout)."""
    from transformers import GPT2Config

    from flax_lora.models.base import CausalLM
    from flax_lora.models.gpt2 import load_gpt2
    from flax_lora.models.stacking import in_layout
    from flax_lora.quant import quantize_as

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=64, n_positions=32, initializer_range=0.2)
    ids = _ids() % 64
    out = {}
    for scan in (False, True):
        module, params, _ = load_gpt2(cfg, scan=scan)
        model = CausalLM(module, params, cfg, "gpt2", "t", layers_stacked=scan)
        conv = in_layout([p for p, i in model.linears().items() if i.kind == "conv1d"], scan)
        assert len(conv) == (4 if scan else 8)
        q = quantize_as(model.params, method, conv)
        with quant_active():
            out[scan] = model.logits({"params": q}, ids, jnp.ones_like(ids))
        ref = model.logits({"params": model.params}, ids, jnp.ones_like(ids))
        assert float(jnp.abs(out[scan] - ref).max() / jnp.abs(ref).max()) < 0.1
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)


def test_lora_on_quantized_weights_adds_the_same_delta_and_trains():
    from flax_lora.targets import resolve_targets
    from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    model = _llama()
    qparams = quantize_params(model.params)
    lc = LoraConfig(4, 8.0)
    lora = init_lora(resolve_targets(model.linears(), "llama", preset="attention"), 4, jax.random.PRNGKey(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.05, lora)
    ids = _ids()
    mask = jnp.ones_like(ids)

    def logits(params, lo):
        with lora_active(lc.scaling):
            return model.logits({"params": params, "lora": lo}, ids, mask)

    with quant_active():
        q_base = model.logits({"params": qparams}, ids, mask)
    # the adapter moves quantized and full-precision logits alike
    d_full = logits(model.params, lora) - model.logits({"params": model.params}, ids, mask)
    d_q = logits(qparams, lora) - q_base
    assert float(jnp.abs(d_full).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(d_q), np.asarray(d_full), atol=0.05 * float(jnp.abs(d_full).max()))

    oc = OptimConfig(3e-2, total_steps=100)
    opt = make_optimizer(oc)
    step = make_train_step(model, lc, opt, make_schedule(oc))
    state = init_state(init_lora(resolve_targets(model.linears(), "llama", preset="attention"), 4,
                                 jax.random.PRNGKey(1)), opt, 0)
    half = np.asarray(ids[:, :8])
    x = np.concatenate([half, half], axis=1)[None]
    lm = np.zeros_like(x)
    lm[..., 8:] = 1
    batch = {"input_ids": x, "attention_mask": np.ones_like(x), "loss_mask": lm}
    before = [np.asarray(v) for v in jax.tree_util.tree_leaves(qparams)]
    losses = []
    for _ in range(15):
        state, m = step(state, qparams, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert all(np.array_equal(b, np.asarray(a)) for b, a in zip(before, jax.tree_util.tree_leaves(qparams)))
