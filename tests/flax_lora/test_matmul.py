"""bf16 matmuls on XLA:CPU: same values as the plain dots, and bf16 operands in every compiled dot."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora import matmul as M

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 route is for XLA:CPU")


def dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every ``dot`` instruction's operands in compiled HLO text."""
    types, out = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
        if d:
            out.append((types.get(d.group(1), "?"), types.get(d.group(2), "?")))
    return out


def _inputs(dtype=jnp.bfloat16):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(k1, (2, 5, 16), dtype), jax.random.normal(k2, (16, 8), dtype),
            jax.random.normal(k3, (2, 5, 8), jnp.float32))


def test_dense_equals_the_plain_bf16_dot_forward_and_backward():
    x, w, t = _inputs()

    def loss(x, w, dot):
        return jnp.sum(dot(x, w).astype(jnp.float32) * t)

    np.testing.assert_array_equal(np.asarray(M.dense(x, w), np.float32), np.asarray(x @ w, np.float32))
    ours, plain = jax.grad(loss, (0, 1))(x, w, M.dense), jax.grad(loss, (0, 1))(x, w, lambda a, b: a @ b)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_the_compiled_backward_keeps_bf16_operands():
    x, w, t = _inputs()

    def loss(x, w, dot):
        return jnp.sum(dot(x, w).astype(jnp.float32) * t)

    ours = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2).lower(x, w, M.dense).compile().as_text()
    plain = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2).lower(x, w, lambda a, b: a @ b).compile().as_text()
    assert dot_operand_types(ours) and all(ops == ("bf16", "bf16") for ops in dot_operand_types(ours))
    assert ("f32", "f32") in dot_operand_types(plain)  # what the route avoids: XLA:CPU upcasts bf16 dots


def test_einsum_matches_float32_reference_within_bf16_rounding():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(k1, (2, 6, 2, 3, 8), jnp.bfloat16)
    k = jax.random.normal(k2, (2, 6, 2, 8), jnp.bfloat16)
    t = jax.random.normal(k3, (2, 2, 3, 6, 6), jnp.float32)
    spec = "btkgd,bskd->bkgts"

    def loss(q, k, f):
        return jnp.sum(f(q, k) * t)

    ours = jax.value_and_grad(loss, (0, 1))(q, k, lambda a, b: M.einsum(spec, a, b, jnp.float32))
    ref = jax.value_and_grad(loss, (0, 1))(q.astype(jnp.float32), k.astype(jnp.float32),
                                           lambda a, b: jnp.einsum(spec, a, b))
    np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=0.05, atol=0.1)


def test_float32_and_opt_out_take_plain_dots(monkeypatch):
    x, w, _ = _inputs(jnp.float32)
    assert not M.native_bf16(x.dtype, w.dtype)
    assert M.native_bf16(jnp.bfloat16, jnp.bfloat16)
    monkeypatch.setenv("LORA_BF16_DOTS", "xla")
    assert not M.native_bf16(jnp.bfloat16, jnp.bfloat16)


def test_a_kernels_uint16_view_computes_the_same_and_has_no_gradient():
    x, w, t = _inputs()
    bits = M.as_storage({"stack": {"kernel": w[None]}, "norm": {"weight": w[0]}})
    assert bits["stack"]["kernel"].dtype == M.STORAGE and bits["norm"]["weight"].dtype == jnp.bfloat16
    u = bits["stack"]["kernel"][0]
    np.testing.assert_array_equal(np.asarray(M.dense(x, u), np.float32), np.asarray(M.dense(x, w), np.float32))
    gx = jax.grad(lambda x: jnp.sum(M.dense(x, u).astype(jnp.float32) * t))(x)
    np.testing.assert_array_equal(np.asarray(gx, np.float32),
                                  np.asarray(jax.grad(lambda x: jnp.sum((x @ w).astype(jnp.float32) * t))(x), np.float32))
    kernel, bias = M.promote_dtype(u, w[0], dtype=jnp.bfloat16)
    assert kernel.dtype == M.STORAGE and bias.dtype == jnp.bfloat16


@pytest.mark.slow
def test_the_bf16_train_step_has_no_float32_dot_and_no_float32_weights():
    """The whole train step (tiny Llama shape, scanned layers, LoRA on q/k/v/o, fused loss): every
    dot of the compiled program, forward and backward, takes bf16 operands, and no float32 copy
    of a stacked kernel exists (issue 14's causes of slow bf16 on XLA:CPU)."""
    from flax_lora.perf.compiled import compile_step, parse_case

    hlo = compile_step(parse_case("tiny:2:32:bf16")).as_text()
    ops = dot_operand_types(hlo)
    assert ops and all(o == ("bf16", "bf16") for o in ops), sorted(set(ops))
    stacked = [line for line in hlo.splitlines() if re.search(r"= f32\[2,(64|128),(32|64|128)\]", line)]
    assert not stacked, stacked[:3]


def test_storage_view_shares_the_kernels_buffer_and_leaves_the_rest():
    x, w, _ = _inputs()
    stacked = jax.device_put(jnp.stack([w, w + 1]))
    params = {"stack": {"kernel": stacked, "bias": stacked[:, 0]}, "embed": {"kernel": w}}
    view = M.storage_view(params)
    kernel = view["stack"]["kernel"]
    assert kernel.dtype == M.STORAGE and kernel.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer()
    assert view["stack"]["bias"] is params["stack"]["bias"] and view["embed"]["kernel"] is w
    np.testing.assert_array_equal(np.asarray(M.dense(x, kernel[1]), np.float32),
                                  np.asarray(M.dense(x, w + 1), np.float32))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_each_ports_scanned_layers_compute_the_same_on_the_uint16_view(name):
    """What `lora train` passes its step on a CPU in bf16 (storage_view): the same logits as the
    bf16 kernels, on the decoder port's Dense and on GPT-2's [out, in] Conv1D."""
    from flax_lora.models.registry import from_config
    from flax_lora.models.stacking import stack_layers
    from tests.conftest import _configs

    m = from_config(_configs()[name], dtype=jnp.bfloat16)
    module, params = m.module.clone(scan=True), stack_layers(m.params)
    view = M.storage_view(params)
    assert M.STORAGE in {x.dtype for x in jax.tree_util.tree_leaves(view)}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    run = jax.jit(lambda p: module.apply({"params": p}, ids, jnp.ones_like(ids)).logits)
    np.testing.assert_array_equal(np.asarray(run(view)), np.asarray(run(params)))
