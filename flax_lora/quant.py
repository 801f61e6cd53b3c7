"""int8 weight-only quantization of the frozen linear weights (the guide's ``load_in_8bit``).

:func:`quantize_params` is a params transform: every linear ``kernel`` (flax ``nn.Dense``
[..., in, out], GPT-2 ``FlaxConv1D`` [out, in]; stacked scan layers included) except the
output head becomes int8 with a float32 absmax scale per output channel stored beside it as
``kernel_scale``. Embeddings, norms, biases and ``lm_head`` stay in the compute dtype.

The matmul is ``(x @ int8_kernel.astype(dtype)) * scale``: the int8 -> compute-dtype convert is
exact (|q| <= 127) and fuses into the dot, the per-output-channel scale is applied to the output.
:func:`quantized_call` computes it; the LoRA interceptor (``flax_lora.lora``) routes any linear
that owns a ``kernel_scale`` through it, so the train step, evaluation and generation run on
quantized weights unchanged; :func:`quant_active` does the same without an adapter.

This module is also the entry point for the other frozen-weight formats: :func:`quantize_as`
applies a run's ``quantization`` (``int8`` here, ``nf4`` / ``nf4-dq`` in :mod:`flax_lora.nf4`)
and :func:`frozen_call` picks the forward of a quantized linear for the interceptors.
"""

from __future__ import annotations

import contextlib
import functools
from functools import partial
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

SCALE = "kernel_scale"
SKIP = ("lm_head",)  # the output projection stays in the compute dtype (as load_in_8bit)
CONV1D_CLASSES = ("FlaxConv1D", "Conv1D")  # GPT-2's linears, kernel [out, in]: transformers' Flax class, the port's


def quantize_kernel(kernel: jax.Array, out_axis: int) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scale per output channel): symmetric absmax over the input axis."""
    k = kernel.astype(jnp.float32)
    in_axis = -2 if out_axis == -1 else -1
    amax = jnp.max(jnp.abs(k), axis=in_axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(k / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, in_axis)


def quantize_params(params: Mapping, conv1d_paths: Iterable[str] = (), skip: Iterable[str] = SKIP) -> dict:
    """``params`` with linear kernels in int8 plus ``kernel_scale`` (see module docstring).

    ``conv1d_paths``: module paths whose kernel is [out, in] (GPT-2's Conv1D). Each kernel goes
    through the same compiled function as :func:`leaf_quantizer` (loading by shards) uses.
    """
    conv1d = {tuple(p.split("/")) for p in conv1d_paths}
    skip = tuple(skip)
    out = {}
    for key, x in flatten_dict(dict(params)).items():
        mod = key[:-1]
        if quantizes(key, x.shape, "int8", mod in conv1d, skip):
            out.update({mod + (k,): v for k, v in _quantizer("int8", mod in conv1d)(x).items()})
        else:
            out[key] = x
    return unflatten_dict(out)


def quantizes(path: tuple[str, ...], shape: tuple[int, ...], method: str, conv1d: bool = False,
              skip: Iterable[str] = SKIP) -> bool:
    """Whether the leaf at ``path`` is a linear kernel that ``method`` stores quantized: every
    kernel but the skipped (the head); NF4 also needs an even block of inputs (nf4.block_size)."""
    if method == "none" or path[-1] != "kernel" or len(shape) < 2 or any(s in path[:-1] for s in skip):
        return False
    if method == "int8":
        return True
    from flax_lora import nf4

    return nf4.block_size(shape[-1 if conv1d else -2]) is not None


def _quantize_leaf(x: jax.Array, method: str, conv1d: bool) -> dict:
    """One kernel's stored leaves by name (``kernel`` and its scales) in ``method``'s format."""
    if method == "int8":
        q, s = quantize_kernel(x, out_axis=-2 if conv1d else -1)
        return {"kernel": q, SCALE: s}
    from flax_lora import nf4

    return nf4.encode_kernel(x, conv1d, method == "nf4-dq")


@functools.lru_cache(maxsize=None)
def _quantizer(method: str, conv1d: bool, out_shardings: tuple | None = None):
    """The compiled :func:`_quantize_leaf` (one per format and output placement; jit's own cache
    then keeps one program per kernel shape, so stacked or per-layer kernels compile once)."""
    fn = partial(_quantize_leaf, method=method, conv1d=conv1d)
    return jax.jit(fn, out_shardings=dict(out_shardings)) if out_shardings else jax.jit(fn)


def leaf_quantizer(method: str, sharding_for=None, conv1d_paths: Iterable[str] = ()):
    """``transform(path, leaf) -> {path: array}`` for :func:`flax_lora.models.weights.load_params`:
    a linear kernel in ``method``'s format the moment it is loaded, anything else unchanged
    (None for ``none``). So the float kernels never all exist at once.

    ``sharding_for(path, shape)`` places the stored leaves. The quantization runs where the
    kernel's shards are: a kernel split along its output axis (what
    :meth:`flax_lora.training.parallel.DataParallel.sharding_for` picks when it divides) is
    quantized by each device on its own columns with no communication, and the result equals the
    whole kernel's bit for bit: int8 scales are per output column, NF4's absmax per 64 input rows
    of one column. nf4-dq's per-layer mean and groups of 256 absmax values span columns: XLA
    gathers those small arrays (1/64 of the weights). A kernel split along its input axis (the
    output axis did not divide) is still exact: XLA reduces the scales across the shards.
    """
    if method == "none":
        return None
    conv1d = {tuple(p.split("/")) for p in conv1d_paths}

    def transform(path, leaf):
        mod = path[:-1]
        if not quantizes(path, tuple(leaf.shape), method, mod in conv1d):
            return {path: leaf}
        placed = None
        if sharding_for is not None:
            shapes = jax.eval_shape(partial(_quantize_leaf, method=method, conv1d=mod in conv1d), leaf)
            placed = tuple(sorted((k, sharding_for(mod + (k,), tuple(v.shape))) for k, v in shapes.items()))
        return {mod + (k,): v for k, v in _quantizer(method, mod in conv1d, placed)(leaf).items()}

    return transform


def is_quantized(module: nn.Module) -> bool:
    return module.has_variable("params", SCALE)


def quantized_call(module: nn.Module, x: jax.Array) -> jax.Array:
    """A quantized ``nn.Dense`` / ``FlaxConv1D`` forward: (x @ dequant(q)) * scale + bias."""
    q = module.get_variable("params", "kernel")
    scale = module.get_variable("params", SCALE)
    dtype = getattr(module, "dtype", None) or x.dtype
    conv1d = type(module).__name__ in CONV1D_CLASSES  # kernel [out, in]
    y = _int8_matmul(x.astype(dtype), q, scale.astype(jnp.float32), conv1d)
    if module.has_variable("params", "bias"):
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


def _dims(x, conv1d):
    return (((x.ndim - 1,), (1 if conv1d else 0,)), ((), ()))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int8_matmul(x, q, scale, conv1d):
    y = lax.dot_general(x, q.astype(x.dtype), _dims(x, conv1d), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def _int8_fwd(x, q, scale, conv1d):
    # residuals are the int8 kernel and its scale, not the dequantised copy: saving that (what
    # plain autodiff does) would keep every layer's full-precision kernel alive for the backward
    return _int8_matmul(x, q, scale, conv1d), (q, scale)


def _int8_bwd(conv1d, res, g):
    q, scale = res
    dtype = g.dtype  # the output's dtype is the input's
    gs = (g.astype(jnp.float32) * scale).astype(dtype)  # d/dy (y * scale) = scale
    w = q.astype(dtype)  # [in, out] (dense) or [out, in] (conv1d)
    dims = (((gs.ndim - 1,), (0 if conv1d else 1,)), ((), ()))
    dx = lax.dot_general(gs, w, dims, preferred_element_type=jnp.float32).astype(dtype)
    # the kernel and scales are frozen: no gradient (int8 has a float0 cotangent)
    return dx, np.zeros(q.shape, jax.dtypes.float0), jnp.zeros_like(scale)


_int8_matmul.defvjp(_int8_fwd, _int8_bwd)


METHODS = ("int8", "nf4", "nf4-dq")  # the frozen-weight formats besides "none"


def quantize_as(params: Mapping, method: str, conv1d_paths: Iterable[str] = ()) -> Mapping:
    """``params`` in a run's frozen-weight format: ``none`` (unchanged), ``int8``, ``nf4`` or
    ``nf4-dq`` (NF4 with double-quantized scales, :mod:`flax_lora.nf4`)."""
    if method == "none":
        return params
    if method == "int8":
        return quantize_params(params, conv1d_paths)
    if method in ("nf4", "nf4-dq"):
        from flax_lora import nf4

        return nf4.quantize_params(params, conv1d_paths, double_quant=method == "nf4-dq")
    raise ValueError(f"unknown quantization {method!r}; expected none or one of {', '.join(METHODS)}")


def frozen_call(module: nn.Module):
    """The forward ``f(module, x)`` of a linear whose frozen kernel is quantized (int8:
    :func:`quantized_call`; NF4: :func:`flax_lora.nf4.nf4_call`), None for any other module."""
    if is_quantized(module):
        return quantized_call
    from flax_lora import nf4  # imported once; later calls are a dict lookup at trace time

    return nf4.nf4_call if nf4.is_nf4(module) else None


def make_interceptor():
    """Routes quantized linears (int8 or NF4) through their forward; others run unchanged."""

    def intercept(next_fun, args, kwargs, context):
        call = frozen_call(context.module) if context.method_name == "__call__" else None
        if call is not None:
            return call(context.module, args[0])
        return next_fun(*args, **kwargs)

    return intercept


@contextlib.contextmanager
def quant_active():
    """Context in which ``module.apply`` runs quantized params without an adapter."""
    with nn.intercept_methods(make_interceptor()):
        yield


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
