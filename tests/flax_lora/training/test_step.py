"""The LoRA transform and the jitted train step on GPT-2, Llama and OPT tiny models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_lora.lora import LoraConfig, init_lora, lora_active, merge
from flax_lora.targets import resolve_targets
from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

from tests.helpers import copy_batch

LC = LoraConfig(r=4, alpha=8)


def _setup(model, preset="attention-mlp"):
    linears = model.linears()
    targets = resolve_targets(linears, model.model_type, preset=preset)
    return linears, targets, init_lora(targets, LC.r, jax.random.PRNGKey(1))


_FWD = {}


def _fwd(model, params, lora, batch):
    if id(model) not in _FWD:  # one jitted function per model: retraces only per tree structure

        def f(params, lora, ids, mask):
            with lora_active(LC.scaling):
                return model.logits({"params": params, "lora": lora}, ids, mask)

        _FWD[id(model)] = jax.jit(f)
    return _FWD[id(model)](params, lora, batch["input_ids"], batch["attention_mask"])


def _logits(model, lora, batch):
    return _fwd(model, model.params, lora, batch)


def _base(model, batch, params=None):
    return _fwd(model, model.params if params is None else params, {}, batch)


def test_lora_at_init_is_the_base_model(tiny_models, family):
    model = tiny_models[family]
    _, _, lora = _setup(model)
    batch = copy_batch(2)
    base = _base(model, batch)
    # B = 0 makes the LoRA term exactly zero; the two programs differ only in XLA's fusion choices
    np.testing.assert_allclose(np.asarray(_logits(model, lora, batch)), np.asarray(base), rtol=0, atol=1e-5)


def test_merged_weights_match_lora_forward(tiny_models, family):
    model = tiny_models[family]
    linears, _, lora = _setup(model)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 100))
    lora = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.1, lora)  # B != 0
    batch = copy_batch(2)
    lora_out = _logits(model, lora, batch)
    merged = merge(model.params, lora, LC.scaling, linears)
    merged_out = _base(model, batch, merged)
    assert float(jnp.abs(lora_out - _base(model, batch)).max()) > 1e-3  # the adapter does something
    np.testing.assert_allclose(np.asarray(merged_out), np.asarray(lora_out), atol=2e-5)


def _step(model, accum=1, lr=1e-2, max_grad_norm=1.0):
    oc = OptimConfig(lr, total_steps=100, max_grad_norm=max_grad_norm)
    opt = make_optimizer(oc)
    return opt, make_train_step(model, LC, opt, make_schedule(oc))


def _reshape(batch, k):
    return {key: v.reshape(k, v.shape[0] // k, *v.shape[1:]) for key, v in batch.items()}


@pytest.mark.parametrize("k", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_accumulation_equals_one_big_batch(tiny_models, k):
    model = tiny_models["llama"]
    _, _, lora = _setup(model)
    batch = copy_batch(8)
    # unequal target counts per micro-batch: token weighting must not become a mean of means
    batch["loss_mask"][0, 10:] = 0
    batch["loss_mask"][7, 9:] = 0
    # SGD(lr=1): the update is the gradient itself, compared without Adam's g/|g| amplification
    opt = optax.sgd(1.0)
    step = make_train_step(model, LC, opt, optax.constant_schedule(1.0))
    big, m_big = step(init_state(lora, opt, 0), model.params, _reshape(batch, 1))
    acc, m_acc = step(init_state(lora, opt, 0), model.params, _reshape(batch, k))
    assert float(m_big["tokens"]) == float(m_acc["tokens"]) == batch["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_big["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(acc.lora), jax.tree_util.tree_leaves(big.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_loss_falls_and_frozen_weights_never_change(tiny_models, family):
    model = tiny_models[family]
    _, _, lora = _setup(model)
    before = [np.array(x) for x in jax.tree_util.tree_leaves(model.params)]
    opt, step = _step(model, lr=3e-2)
    state = init_state(lora, opt, 0)
    batch = _reshape(copy_batch(8), 2)
    losses = []
    for _ in range(50):
        state, m = step(state, model.params, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    after = jax.tree_util.tree_leaves(model.params)
    assert all(np.array_equal(b, np.asarray(a)) for b, a in zip(before, after))
    assert int(state.step) == 50


def test_pytorch_safetensors_load_without_torch(tiny_models, tmp_path):
    from flax_lora.models import hub, load_model

    for name in ("gpt2", "llama"):
        model = tiny_models[name]
        folder = hub.save_pt_safetensors(tmp_path / name, model.params, model.config)
        loaded = load_model(str(folder))
        batch = copy_batch(1)
        a, b = _base(model, batch), _base(model, batch, loaded.params)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
