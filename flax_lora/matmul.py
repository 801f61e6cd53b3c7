"""Dense matmuls in bf16 that stay on XLA:CPU's native bf16 path, forward and backward.

XLA:CPU compiles a ``bf16 x bf16 -> bf16`` dot as two converts of the operands to float32 and a
float32 dot: the compiled HLO shows ``convert`` fusions feeding a ``__ynn_fusion`` dot whose
parameters are f32. The same dot asked for a float32 result (``preferred_element_type``) runs
on the bf16 operands directly, which on CPUs with AVX512-BF16 is the fast path. Autodiff of
``dot(..., preferred_element_type=f32).astype(bf16)`` would hand the backward dots a float32
cotangent and upcast them again, so :func:`dense` carries its own VJP whose backward dots also
take bf16 operands and accumulate in float32. Values are those of the plain bf16 dot (XLA
accumulates in float32 either way and rounds once to bf16).

:func:`dot_general` is what the port's ``nn.Dense`` layers and the LoRA path call: it takes this
route for bf16 on the CPU backend and is ``lax.dot_general`` everywhere else (GPUs run bf16 dots
natively). ``LORA_BF16_DOTS=xla`` turns it all off and ``=dots`` keeps only the dots (no uint16
kernels, no packed residuals: :mod:`flax_lora.residuals`), to compare (``benchmarks/bf16_ab.py``).

Scanned layers add a second upcast: XLA:CPU cannot dynamic-slice bf16, so it converts each
stacked [L, in, out] bf16 kernel to float32 once, outside the layer loop (a float32 copy of the
frozen weights, written every step), and slices that. :func:`as_storage` views such stacks as
uint16 (a free bitcast), so the loop slices integers; :func:`dense` takes the uint16 slice
directly, bitcasts it back next to its dot and keeps the uint16 slice as the backward's
residual (the scan then saves nothing per layer: the residual is its own input slice).
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_BF16 = jnp.dtype(jnp.bfloat16)
STORAGE = jnp.dtype(jnp.uint16)  # bf16 kernels viewed as their bits (see the module doc)


def native_bf16(*dtypes) -> bool:
    """Whether dots on these operand dtypes take :func:`dense`'s route (bf16 on XLA:CPU)."""
    return (all(jnp.dtype(d) == _BF16 for d in dtypes) and jax.default_backend() == "cpu"
            and os.environ.get("LORA_BF16_DOTS") != "xla")


def native_bf16_layers(dtype) -> bool:
    """Whether scanned bf16 layers on XLA:CPU also get uint16 kernel stacks (:func:`storage_view`)
    and packed residuals (:mod:`flax_lora.residuals`): :func:`native_bf16`, unless
    ``LORA_BF16_DOTS=dots`` keeps only the dots (for A/B runs)."""
    return native_bf16(dtype) and os.environ.get("LORA_BF16_DOTS") != "dots"


def _dot(a, b, contract_a, contract_b, dtype):
    dims = ((contract_a, contract_b), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(dtype)


def _weights(w):
    return lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == STORAGE else w


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, w_in: int = 0) -> jax.Array:
    """``x[..., in] @ w[in, out]`` (``w_in=1``: ``w`` is [out, in], GPT-2's Conv1D layout) in
    ``x``'s dtype with float32 accumulation (see the module doc); ``w`` may be a bf16 kernel's
    uint16 view (:func:`as_storage`)."""
    return _dot(x, _weights(w), (x.ndim - 1,), (w_in,), x.dtype)


def _dense_fwd(x, w, w_in):
    return dense(x, w, w_in), (x, w)


def _dense_bwd(w_in, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _dot(g, _weights(w), (g.ndim - 1,), (1 - w_in,), x.dtype)  # g @ w.T
    if w.dtype == STORAGE:  # a frozen kernel's bits: no gradient
        return dx, np.zeros(w.shape, jax.dtypes.float0)
    lead = tuple(range(x.ndim - 1))
    dw = _dot(x, g, lead, lead, w.dtype)  # x.T @ g over every leading axis; unused for frozen kernels
    return dx, (dw if w_in == 0 else dw.T)


dense.defvjp(_dense_fwd, _dense_bwd)


def linear(x: jax.Array, kernel: jax.Array, dtype, w_in: int = 0) -> jax.Array:
    """``x @ kernel`` (``w_in=1``: ``x @ kernel.T``) computed in ``dtype``: through :func:`dense`
    for bf16 on the CPU or a uint16 kernel view, else one ``lax.dot_general``."""
    x = jnp.asarray(x, dtype)
    if kernel.dtype == STORAGE or native_bf16(dtype):
        return dense(x, kernel if kernel.dtype == STORAGE else jnp.asarray(kernel, dtype), w_in)
    return lax.dot_general(x, jnp.asarray(kernel, dtype), (((x.ndim - 1,), (w_in,)), ((), ())))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for ``nn.Dense(dot_general=...)``: a Dense-shaped bf16 dot on the CPU
    goes through :func:`dense`, anything else straight to XLA."""
    (contract_l, contract_r), batch = dimension_numbers
    dense_shaped = (tuple(contract_l) == (lhs.ndim - 1,) and tuple(contract_r) == (0,) and rhs.ndim == 2
                    and batch == ((), ()) and preferred_element_type is None)
    if dense_shaped and (rhs.dtype == STORAGE or native_bf16(lhs.dtype, rhs.dtype)):
        return dense(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """``jnp.einsum(spec, a, b)``, the result in ``out_dtype`` (default ``a``'s dtype); bf16 operands on the CPU keep bf16 operands in the backward dots too (the
    cotangent rounded to bf16 first, as flash attention rounds its score gradients). ``spec``
    has two operands and no index that only one term carries (attention's contractions)."""
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if native_bf16(a.dtype, b.dtype):
        return _einsum(spec, out_dtype, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=None if out_dtype == a.dtype else out_dtype)


def _einsum_plain(spec, out_dtype, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


_einsum = jax.custom_vjp(_einsum_plain, nondiff_argnums=(0, 1))


def _einsum_fwd(spec, out_dtype, a, b):
    return _einsum_plain(spec, out_dtype, a, b), (a, b)


def _einsum_bwd(spec, out_dtype, res, g):
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(a.dtype)
    return (_einsum_plain(f"{out},{sb}->{sa}", a.dtype, g, b), _einsum_plain(f"{sa},{out}->{sb}", b.dtype, a, g))


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def promote_dtype(*args, dtype=None, inexact=True):
    """``nn.Dense``'s operand promotion, leaving a kernel's uint16 view (:func:`as_storage`) as it is."""
    from flax.linen.dtypes import promote_dtype as flax_promote

    if any(a is not None and getattr(a, "dtype", None) == STORAGE for a in args):
        return tuple(a if a is None or a.dtype == STORAGE else jnp.asarray(a, dtype) for a in args)
    return flax_promote(*args, dtype=dtype, inexact=inexact)


def _stacked_bf16_kernel(path, leaf) -> bool:
    return (getattr(path[-1], "key", None) == "kernel" and getattr(leaf, "ndim", 0) >= 3
            and getattr(leaf, "dtype", None) == _BF16)


def as_storage(params):
    """Stacked bf16 kernels (``.../kernel`` leaves of 3 or more axes) viewed as uint16, on XLA:CPU
    only; every other leaf as it is (see the module doc)."""
    if not native_bf16(jnp.bfloat16):
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: lax.bitcast_convert_type(x, STORAGE) if _stacked_bf16_kernel(path, x) else x, params)


def storage_view(params):
    """:func:`as_storage` done once, outside the step: a jitted step that bitcasts the stacks itself
    writes a copy of every stacked kernel each call (XLA:CPU materializes the bitcast). On one
    CPU device the view shares the kernel's buffer (``device_put`` of a numpy view does not copy);
    leaves spread over several devices are left for the step to view. A leaf not committed to its
    device stays uncommitted (else the step would compile again once its outputs come back committed)."""
    if not native_bf16_layers(jnp.bfloat16):
        return params

    def view(path, leaf):
        if _stacked_bf16_kernel(path, leaf) and len(leaf.sharding.device_set) == 1:
            return jax.device_put(np.asarray(leaf).view(np.uint16), leaf.sharding if leaf.committed else None)
        return leaf

    return jax.tree_util.tree_map_with_path(view, params)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a 2-D ``w`` (the LoRA path's A and B), through :func:`dense` where it applies."""
    return dense(x, w) if native_bf16(x.dtype, w.dtype) else x @ w
