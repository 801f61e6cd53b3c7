"""QLoRA's NormalFloat-4 (NF4) frozen weights, with optional double quantization (``nf4-dq``).

:func:`quantize_params` is a params transform, like :func:`flax_lora.quant.quantize_params`
(int8): every linear ``kernel`` (flax ``nn.Dense`` [..., in, out], GPT-2 ``FlaxConv1D``
[..., out, in]; stacked scan layers included) except the output head is stored as

- ``kernel``: uint8 [..., in / 2, out], two 4-bit codes per byte, always input-major (Conv1D
  kernels are transposed once, here). Byte ``i`` holds row ``i`` in its low nibble and row
  ``i + in / 2`` in its high nibble, so unpacking is a concatenate, not an interleave.
- the absmax of each block of :data:`BLOCK` (64) consecutive input rows of each output column:
  ``kernel_absmax`` float32 [..., in / 64, out] (``nf4``), or double-quantized (``nf4-dq``, as
  the QLoRA paper): the mean of a layer's absmax values subtracted (``kernel_absmax_mean``
  [...]), the rest in int8 (``kernel_absmax_q`` [..., n / 256, 256]) with one float32 absmax
  scale per :data:`DQ_BLOCK` (256) of them (``kernel_absmax_scale`` [..., n / 256]).

A code indexes :data:`LEVELS`, the 16 NF4 values: ``w ~ LEVELS[code] * absmax``. Per parameter
that is 4 + 32/64 = 4.5 bits (``nf4``) or 4 + 8/64 + 32/(64*256) ~ 4.13 bits (``nf4-dq``):
0.281x and 0.258x of bf16. The paper stores the second-level values as FP8; int8 here: the
mean-subtracted absmax values are spread evenly, where a uniform grid is finer than FP8's three
mantissa bits. Embeddings, norms, biases and ``lm_head`` stay in the compute dtype; a kernel
whose input size has no even block of at least :data:`MIN_BLOCK` rows stays too.

The matmul (:func:`nf4_call`, routed by the LoRA interceptor like int8's) unpacks, looks up
and scales one layer's kernel inside the jitted step, next to its dot, and emits it in the
compute dtype: the dequantized kernel is a temporary of that layer, never a copy of all frozen
weights. Its custom VJP keeps the stored arrays (packed codes and scales) as residuals and
dequantizes again in the backward, so autodiff does not save every layer's dequantized kernel
for the backward (what plain differentiation of ``x @ dequant(q)`` would do).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

BLOCK = 64  # input rows per absmax scale (the QLoRA paper's block size)
DQ_BLOCK = 256  # absmax values per second-level scale (nf4-dq)
MIN_BLOCK = 16  # below this a block's fp32 scale costs more than it saves: keep the kernel as is
SKIP = ("lm_head",)  # the output projection stays in the compute dtype (as int8 and bitsandbytes)
ABSMAX = "kernel_absmax"
DQ_NAMES = ("kernel_absmax_q", "kernel_absmax_scale", "kernel_absmax_mean")


def normal_float_levels(bits: int = 4, offset: float = 0.9677083) -> np.ndarray:
    """The NormalFloat levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.

    As the QLoRA paper (and bitsandbytes' ``create_normal_map``) builds them: 2^(bits-1)
    positive quantiles and 2^(bits-1) - 1 negative ones of equal probability mass between
    ``1 - offset`` and ``offset``, plus 0, divided by the largest. The asymmetry buys the exact
    zero that a symmetric 2^bits-level grid would lack. ``offset`` is the paper's (the midpoint
    of 1 - 1/(2*15) and 1 - 1/(2*16)).
    """
    ppf = NormalDist().inv_cdf
    n = 2 ** (bits - 1)
    pos = [ppf(offset + (0.5 - offset) * i / n) for i in range(n)]  # linspace(offset, 0.5, n + 1)[:-1]
    neg = [-ppf(offset + (0.5 - offset) * i / (n - 1)) for i in range(n - 1)]
    levels = np.array(sorted(pos + [0.0] + neg), np.float64)
    return (levels / levels.max()).astype(np.float32)


LEVELS = normal_float_levels()  # float32[16], ascending; LEVELS[7] == 0
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2  # rounding to the nearest level = counting midpoints below


def block_size(n_in: int) -> int | None:
    """Input rows per absmax block for a kernel with ``n_in`` inputs: :data:`BLOCK` when it
    divides ``n_in``, else the largest even common divisor (tiny test models), None below
    :data:`MIN_BLOCK` (the kernel is not quantized)."""
    b = math.gcd(n_in, BLOCK)
    return b if b >= MIN_BLOCK and n_in % 2 == 0 else None


def pack(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., in, out] (values 0-15) -> uint8 [..., in / 2, out]: row i in the low
    nibble, row i + in / 2 in the high one."""
    half = codes.shape[-2] // 2
    lo, hi = codes[..., :half, :], codes[..., half:, :]
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack(packed: jax.Array) -> jax.Array:
    """The inverse of :func:`pack`: uint8 [..., in / 2, out] -> codes [..., in, out]."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=-2)


def encode(w: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(packed codes, float32 absmax [in / block, out]) of a 2-D input-major kernel [in, out]."""
    n_in, n_out = w.shape
    blocks = w.astype(jnp.float32).reshape(n_in // block, block, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None, :]
    codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed).astype(jnp.uint8)
    return pack(codes.reshape(n_in, n_out)), absmax


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int8 [n / 256, 256], float32 scale [n / 256], float32 mean []) of one kernel's absmax
    values: the mean subtracted (they are all positive, so the rest is centred on 0), then
    symmetric int8 absmax quantization in blocks of :data:`DQ_BLOCK` (the last one zero-padded)."""
    flat = absmax.reshape(-1).astype(jnp.float32)
    mean = jnp.mean(flat)
    pad = -flat.size % DQ_BLOCK
    groups = jnp.pad(flat - mean, (0, pad)).reshape(-1, DQ_BLOCK)
    amax = jnp.max(jnp.abs(groups), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(groups / scale[:, None]), -127, 127).astype(jnp.int8)
    return q, scale, mean


def double_dequantize(q: jax.Array, scale: jax.Array, mean: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 absmax of ``shape`` [..., in / block, out] back from :func:`double_quantize`'s
    arrays (leading stacked-layer dims allowed)."""
    lead = q.shape[:-2]
    flat = (q.astype(jnp.float32) * scale[..., None]).reshape(lead + (-1,))
    n = math.prod(shape[len(lead):])
    return flat[..., :n].reshape(shape) + mean.reshape(lead + (1, 1))


def absmax_of(packed: jax.Array, scales: tuple) -> jax.Array:
    """The float32 absmax [..., in / block, out] from the stored scale arrays (nf4 or nf4-dq)."""
    if len(scales) == 1:
        return scales[0].astype(jnp.float32)
    n_in, n_out = 2 * packed.shape[-2], packed.shape[-1]
    return double_dequantize(*scales, packed.shape[:-2] + (n_in // block_size(n_in), n_out))


def dequantize(packed: jax.Array, scales: tuple, dtype) -> jax.Array:
    """The kernel [..., in, out] in ``dtype``: unpack, look each code up in :data:`LEVELS`,
    multiply by its block's absmax (in float32, one rounding to ``dtype`` at the end)."""
    codes = unpack(packed)
    n_in, n_out = codes.shape[-2:]
    amax = absmax_of(packed, scales)
    lead = codes.shape[:-2]
    vals = jnp.asarray(LEVELS).at[codes].get(mode="promise_in_bounds")  # codes are 0-15
    vals = vals.reshape(lead + (amax.shape[-2], -1, n_out)) * amax[..., :, None, :]
    return vals.reshape(lead + (n_in, n_out)).astype(dtype)


def encode_kernel(kernel: jax.Array, conv1d: bool, double_quant: bool) -> dict:
    """One kernel's stored leaves (see the module docstring); leading stacked dims are
    encoded one layer at a time (``lax.map``) so the float32 temporaries stay one layer big."""
    w = jnp.swapaxes(kernel, -1, -2) if conv1d else kernel
    block = block_size(w.shape[-2])

    def one(w2):
        packed, absmax = encode(w2, block)
        if not double_quant:
            return {"kernel": packed, ABSMAX: absmax}
        return {"kernel": packed, **dict(zip(DQ_NAMES, double_quantize(absmax)))}

    lead = w.shape[:-2]
    if not lead:
        return one(w)
    out = lax.map(one, w.reshape((-1,) + w.shape[-2:]))
    return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}


_encode_jit = jax.jit(encode_kernel, static_argnums=(1, 2))


def quantize_params(params: Mapping, conv1d_paths: Iterable[str] = (), skip: Iterable[str] = SKIP, *,
                    double_quant: bool = False) -> dict:
    """``params`` with linear kernels in NF4 (``double_quant``: nf4-dq); see the module docstring.

    ``conv1d_paths``: module paths whose kernel is [out, in] (GPT-2's Conv1D). Works on arrays
    and under ``jax.eval_shape`` (abstract params: shapes and bytes without computing).
    """
    conv1d = {tuple(p.split("/")) for p in conv1d_paths}
    skip = tuple(skip)
    out = {}
    for key, x in flatten_dict(dict(params)).items():
        mod = key[:-1]
        is_conv = mod in conv1d
        n_in = x.shape[-1 if is_conv else -2] if x.ndim >= 2 else 0
        if key[-1] == "kernel" and x.ndim >= 2 and not any(s in mod for s in skip) and block_size(n_in):
            out.update({mod + (k,): v for k, v in _encode_jit(x, is_conv, double_quant).items()})
        else:
            out[key] = x
    return unflatten_dict(out)


def dequantize_params(params: Mapping, dtype=jnp.float32) -> dict:
    """NF4 kernels back to float input-major [..., in, out] kernels in ``dtype`` (a Conv1D
    kernel comes back [in, out], not [out, in]); for checks and merged exports."""
    flat = flatten_dict(dict(params))
    out = {}
    for key, x in flat.items():
        mod = key[:-1]
        if key[-1] in (ABSMAX,) + DQ_NAMES:
            continue
        names = (ABSMAX,) if mod + (ABSMAX,) in flat else DQ_NAMES
        if key[-1] == "kernel" and mod + (names[0],) in flat:
            x = dequantize(x, tuple(flat[mod + (n,)] for n in names), dtype)
        out[key] = x
    return unflatten_dict(out)


def is_nf4(module: nn.Module) -> bool:
    """Whether ``module`` is a linear whose kernel :func:`quantize_params` stored in NF4."""
    return module.has_variable("params", ABSMAX) or module.has_variable("params", DQ_NAMES[0])


def nf4_call(module: nn.Module, x: jax.Array) -> jax.Array:
    """An NF4 ``nn.Dense`` / ``FlaxConv1D`` forward: x @ dequant(kernel) + bias, in the module's
    compute dtype (both kinds are stored input-major, so one path serves them)."""
    names = (ABSMAX,) if module.has_variable("params", ABSMAX) else DQ_NAMES
    packed = module.get_variable("params", "kernel")
    scales = tuple(module.get_variable("params", n) for n in names)
    dtype = getattr(module, "dtype", None) or x.dtype
    y = nf4_matmul(x.astype(dtype), packed, scales)
    if module.has_variable("params", "bias"):
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


def _dot(a, w, contract_w: int):
    dims = (((a.ndim - 1,), (contract_w,)), ((), ()))
    return lax.dot_general(a, w, dims, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def nf4_matmul(x: jax.Array, packed: jax.Array, scales: tuple) -> jax.Array:
    """``x @ dequantize(packed, scales)`` in ``x``'s dtype (float32 accumulation)."""
    return _dot(x, dequantize(packed, scales, x.dtype), 0)


def _nf4_fwd(x, packed, scales):
    # residuals are the stored arrays: under a layer scan they are the scanned params themselves
    # (no copy); saving the dequantized kernel instead would keep every layer's for the backward
    return nf4_matmul(x, packed, scales), (packed, scales)


def _no_grad(a):
    """A zero cotangent for a frozen stored array (float0 for the integer ones)."""
    if jnp.issubdtype(a.dtype, jnp.integer):
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


def _nf4_bwd(res, g):
    packed, scales = res
    dx = _dot(g, dequantize(packed, scales, g.dtype), 1)  # g @ W^T, the kernel dequantized again
    return dx, _no_grad(packed), tuple(_no_grad(s) for s in scales)


nf4_matmul.defvjp(_nf4_fwd, _nf4_bwd)
