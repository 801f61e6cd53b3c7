"""A scanned layer's backward residuals kept as integer bits on XLA:CPU, so the layer loop stays bf16.

Under ``nn.scan`` JAX stacks every residual the backward needs ([L, ...] buffers written one
layer at a time with ``dynamic-update-slice`` and read back with ``dynamic-slice``). XLA:CPU has
no bf16 version of those two ops: it wraps each in converts, so every layer rewrites the whole
stacked buffer as float32 and back (quadratic in the layer count), and the backward loop reads a
float32 copy of every stack made up front. Integer stacks have none of that. :func:`layer_vjp`
gives a layer function its own VJP whose residuals (the pullback of ``jax.vjp``) are stored with
bf16 leaves bitcast to int16, a free reinterpretation, and bitcast back in the backward: the same
values, the same backward computation, only the loop's bookkeeping changes.

Gradients flow to the adapter and the layer input only; the frozen weights and the rest (masks,
rope tables, PRNG keys) get none, as LoRA needs. The decoder port uses it for scanned bf16
layers on the CPU backend (:func:`wanted`); elsewhere JAX's own VJP is already right.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from flax_lora.matmul import native_bf16_layers

_BF16 = jnp.dtype(jnp.bfloat16)
PACKED = jnp.dtype(jnp.int16)  # bf16 residual bits; uint16 is taken by kernels' storage view (matmul.as_storage)


def wanted(dtype) -> bool:
    """Whether a scanned layer computing in ``dtype`` should pack its residuals (bf16 on XLA:CPU)."""
    return native_bf16_layers(dtype)


def pack(tree):
    """bf16 leaves of ``tree`` as their int16 bits; other leaves as they are."""
    return jax.tree_util.tree_map(lambda x: lax.bitcast_convert_type(x, PACKED) if _is(x, _BF16) else x, tree)


def unpack(tree):
    """Inverse of :func:`pack`."""
    return jax.tree_util.tree_map(lambda x: lax.bitcast_convert_type(x, _BF16) if _is(x, PACKED) else x, tree)


def _is(x, dtype) -> bool:
    return getattr(x, "dtype", None) == dtype


def layer_vjp(f: Callable) -> Callable:
    """``f(frozen, adapter, x, *rest) -> y`` with a VJP that differentiates ``adapter`` and ``x``
    only and keeps its residuals packed (module doc)."""

    @jax.custom_vjp
    def g(frozen, adapter, x, rest):
        return f(frozen, adapter, x, *rest)

    def fwd(frozen, adapter, x, rest):
        y, pullback = jax.vjp(lambda a, h: f(frozen, a, h, *rest), adapter, x)
        return y, pack(pullback)

    def bwd(pullback, gy):
        d_adapter, dx = unpack(pullback)(gy)
        return None, d_adapter, dx, None

    g.defvjp(fwd, bwd)
    return lambda frozen, adapter, x, *rest: g(frozen, adapter, x, rest)
