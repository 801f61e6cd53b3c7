"""Benchmark model shapes and fast random frozen params for the project's Llama port.

``PRESETS`` are the Llama shapes the benchmarks run (SmolLM2-135M, Llama-3.2-1B, a tiny one for
CPU tests); :func:`llama_config` turns one into a transformers ``LlamaConfig``, and
:func:`bench_config` also takes any model of the advisor's catalog (the other families).

:func:`random_params` gives a module's frozen params fast: the exact tree ``module.init`` gives
(from ``jax.eval_shape``, so a scanned module gets its stacked leaves directly), each leaf
filled on the device by a small jitted counter hash instead of the model's jitted flax init of
the unrolled layers, which is a long compile for any shape (timings in
``benchmarks/RESULTS.md``, "The benchmark's model build"). Step speed does not depend on the
values.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from functools import partial

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from flax_lora.lora import LinearInfo, discover_linears
from flax_lora.models.base import CausalLM, param_shapes
from flax_lora.targets import resolve_targets

PRESETS = {
    "smollm2-135m": dict(hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate=1536, vocab=49152,
                         head_dim=64, tied_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate=8192, vocab=128256,
                     head_dim=64, tied_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128, vocab=512,
                 head_dim=16, tied_embeddings=True, rope_theta=10000.0),
}


def llama_config(shape: dict, seq: int):
    """A transformers ``LlamaConfig`` of ``shape`` (a ``PRESETS`` entry) for sequences of ``seq``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=max(seq, 2048), tie_word_embeddings=shape["tied_embeddings"],
        rope_theta=shape["rope_theta"], initializer_range=0.02,
    )


def family_config(model_shape, seq: int):
    """A transformers config of a catalog model (an advisor ``ModelShape``: Qwen3, Gemma 2/3, Phi-3,
    SmolLM3, OLMo 2, ...) for sequences of ``seq``: its real sizes, the family's own defaults for
    the rest (soft-caps, sliding windows, norms), as ``AutoConfig.for_model`` gives them."""
    from transformers import AutoConfig

    s = model_shape
    return AutoConfig.for_model(
        s.model_type, vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
        head_dim=s.head_dim, max_position_embeddings=max(seq, 2048), tie_word_embeddings=s.tied_embeddings,
        initializer_range=0.02, rope_scaling=None,
    )


def bench_config(preset: str, seq: int):
    """The config of a benchmark case's model: a ``PRESETS`` Llama shape, or any model in the
    advisor's catalog (by name or alias, e.g. ``qwen3-0.6b``, ``gemma2-2b``)."""
    if preset in PRESETS:
        return llama_config(PRESETS[preset], seq)
    return family_config(catalog_shape(preset), seq)


def catalog_shape(preset: str):
    """The advisor's ``ModelShape`` of a catalog model; ValueError if the catalog lacks it."""
    from advisor.catalog import lookup

    shape = lookup(preset)
    if shape is None:
        raise ValueError(f"{preset!r} is neither a benchmark preset ({', '.join(PRESETS)}) nor in the advisor's catalog")
    return shape


def llama_params(shape: dict) -> int:
    """Parameter count of a Llama of ``shape`` (embedding, decoder layers, final norm, lm_head if untied)."""
    h, L, v, m = shape["hidden"], shape["n_layers"], shape["vocab"], shape["intermediate"]
    q, kv = shape["n_heads"] * shape["head_dim"], shape["n_kv_heads"] * shape["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * m + 2 * h
    return L * layer + v * h * (1 if shape["tied_embeddings"] else 2) + h


def flat_linears(model: CausalLM, shapes) -> dict[str, LinearInfo]:
    """The linears of ``model`` (an unscanned ``CausalLM``) traced on abstract params ``shapes``."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return discover_linears(lambda p: model.logits({"params": p}, ids, jnp.ones_like(ids)), shapes)


def target_linears(module, config, targets: Iterable[str], dtype) -> dict[str, LinearInfo]:
    """The per-layer linears of a Llama ``module`` that LoRA targets ``targets`` (module names) select.

    Resolved on the unscanned, non-remat clone of the module, so adapters are made per layer
    (``model/layers/<i>/...``) and stacked afterwards for a scanned module.
    """
    flat = CausalLM(module.clone(scan=False, remat=False), None, config, "llama", "bench", dtype)
    return resolve_targets(flat_linears(flat, param_shapes(flat.module)), "llama", modules=list(targets))


_MIX = (0x7FEB352D, 0x846CA68B)  # "lowbias32" (C. Wellons): a cheap, well-mixing 32-bit hash


def _mix32(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX[0])
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MIX[1])
    return x ^ (x >> 16)


@partial(jax.jit, static_argnums=(2, 3, 4))
def hashed_normal(a, b, shape: tuple[int, ...], dtype, std: float):
    """A deterministic ~N(0, ``std``) array of ``shape``, computed where it lands.

    Element (row, col) of the array viewed as [prod(shape[:-1]), shape[-1]] is
    ``mix(mix(row + a) ^ (col + b))``; its four bytes summed (Irwin-Hall, 4 uniforms: mean 0,
    exact std, kurtosis 2.7 vs a normal's 3) are the value. A counter hash instead of
    ``jax.random``: threefry's normals are slow on a CPU, this runs at memory speed on any
    device, and a (shape, dtype) compiles once. Same values on every backend, so first losses
    compare across machines. ``a`` and ``b`` are uint32 keys.
    """
    rows = 1
    for d in shape[:-1]:
        rows *= d
    cols = shape[-1] if shape else 1
    r = lax.broadcasted_iota(jnp.uint32, (rows, cols), 0)
    c = lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
    x = _mix32(_mix32(r + a) ^ (c + b))
    s = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
    # sum of 4 uniform bytes: mean 4 * 127.5, variance 4 * (256**2 - 1) / 12
    v = (s.astype(jnp.float32) - 510.0) * (std / (4 * (256**2 - 1) / 12) ** 0.5)
    return v.astype(dtype).reshape(shape)


def random_params(module, *, seed: int = 0, std: float = 0.02) -> dict:
    """Random params of exactly the tree, shapes and dtypes ``module.init`` gives, made fast.

    The tree comes from ``param_shapes`` (``jax.eval_shape`` of the init: traced, nothing
    computed), so a scanned module gets its stacked ``model/layers/stack/...`` [L, ...] leaves
    directly. Each leaf is then filled on the default device by its own small jitted
    computation: RMSNorm ``weight``/``scale`` ones, ``bias`` zeros, everything else (kernels,
    embeddings) ~N(0, ``std``) from :func:`hashed_normal` keyed by ``seed`` and the leaf's path.
    The benchmarks measure step speed, not model quality: these are not the model's exact
    initialisers, only their shapes and scales.
    """
    out = {}
    for path, leaf in flatten_dict(param_shapes(module)).items():
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if path[-1] in ("weight", "scale"):
            out[path] = jnp.ones(shape, dtype)
        elif path[-1] == "bias":
            out[path] = jnp.zeros(shape, dtype)
        else:
            name = f"{seed}/" + "/".join(path)
            a, b = (jnp.uint32(zlib.crc32(f"{name}#{i}".encode())) for i in range(2))
            out[path] = hashed_normal(a, b, shape, dtype, float(std))
    return unflatten_dict(out)
