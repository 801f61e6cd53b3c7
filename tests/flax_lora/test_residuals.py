"""Scanned bf16 layers on XLA:CPU keep their backward residuals as integer bits: same gradients,
no float32 rewrite of the stacked residual buffers (issue 14)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora import matmul, residuals

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the packing is for XLA:CPU")


def test_pack_round_trips_bf16_bits_and_leaves_the_rest():
    x = jnp.asarray([1.0, -2.5, np.inf, 3e-39], jnp.bfloat16)
    tree = {"x": x, "bits": jnp.arange(3, dtype=matmul.STORAGE), "f": jnp.ones(2, jnp.float32), "n": None}
    packed = residuals.pack(tree)
    assert packed["x"].dtype == residuals.PACKED and packed["bits"].dtype == matmul.STORAGE
    assert packed["f"].dtype == jnp.float32 and packed["n"] is None
    back = residuals.unpack(packed)
    np.testing.assert_array_equal(np.asarray(back["x"]).view(np.uint16), np.asarray(x).view(np.uint16))
    assert back["bits"].dtype == matmul.STORAGE


def test_layer_vjp_gives_the_adapter_and_input_gradients_and_none_to_the_rest():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(k[0], (8, 8), jnp.bfloat16)
    a = {"a": jax.random.normal(k[1], (8, 2), jnp.bfloat16), "b": jax.random.normal(k[2], (2, 8), jnp.bfloat16)}
    x = jax.random.normal(k[3], (3, 8), jnp.bfloat16)
    scale = jnp.float32(0.5)

    def layer(w, a, x, s):
        h = x @ w + (x @ a["a"]) @ a["b"]
        return jnp.tanh(h.astype(jnp.float32) * s).astype(jnp.bfloat16)

    def loss(f, w, a, x):
        return jnp.sum(f(w, a, x, scale).astype(jnp.float32) ** 2)

    ours = jax.grad(loss, (1, 2, 3))(residuals.layer_vjp(layer), w, a, x)
    ref = jax.grad(loss, (1, 2, 3))(layer, w, a, x)
    for got, want in zip(jax.tree_util.tree_leaves(ours[1:]), jax.tree_util.tree_leaves(ref[1:])):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not np.any(np.asarray(ours[0], np.float32))  # the frozen weight: no gradient


def _step_hlo(monkeypatch, packed: bool) -> str:
    from flax_lora.perf.compiled import compile_step, parse_case

    if not packed:
        monkeypatch.setattr(residuals, "wanted", lambda dtype: False)
    return compile_step(parse_case("tiny:3:32:bf16")).as_text()


def _converted_stack_updates(hlo: str) -> list[str]:
    """``dynamic-update-slice`` instructions whose stacked buffer is first converted (XLA:CPU's way
    with a bf16 stack: convert all of it to float32, update one layer, convert it all back)."""
    return [ln for ln in hlo.splitlines() if re.search(r" dynamic-update-slice\(%convert", ln)]


@pytest.mark.slow
def test_the_scanned_bf16_step_converts_no_residual_stack(monkeypatch):
    assert not _converted_stack_updates(_step_hlo(monkeypatch, packed=True))
    assert _converted_stack_updates(_step_hlo(monkeypatch, packed=False))  # what the packing removes


def test_packed_and_plain_scanned_steps_train_the_same_adapter(monkeypatch):
    from flax_lora.lora import LoraConfig
    from flax_lora.perf.shapes import PRESETS
    from flax_lora.perf.throughput import build_model
    from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    ids = np.random.default_rng(0).integers(0, PRESETS["tiny"]["vocab"], (1, 2, 16), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    adapters = []
    for packed in (True, False):
        if not packed:
            monkeypatch.setattr(residuals, "wanted", lambda dtype: False)
        model, params, lora, _ = build_model(PRESETS["tiny"], seq=16, precision="bf16", scan=True, remat=False,
                                             quantization="none", r=4, targets=["q_proj", "v_proj"])
        oc = OptimConfig(1e-2, total_steps=10)
        opt = make_optimizer(oc)
        step = make_train_step(model, LoraConfig(r=4, alpha=8), opt, make_schedule(oc))
        state = init_state(lora, opt, 0)
        for _ in range(2):
            state, _ = step(state, params, batch)
        adapters.append(state.lora)
    for a, b in zip(jax.tree_util.tree_leaves(adapters[0]), jax.tree_util.tree_leaves(adapters[1])):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert any(np.any(np.asarray(b, np.float32)) for b in jax.tree_util.tree_leaves(adapters[0]))  # it trained
