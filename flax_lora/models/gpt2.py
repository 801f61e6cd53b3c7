"""The project's GPT-2 port: a Flax (linen) causal LM with GPT-2's layout, needing no model class
of transformers (whose Flax classes ended with 4.57).

GPT-2: learned position embeddings (``wpe``), LayerNorm before attention and MLP, attention q/k/v
fused in one ``c_attn``, ``gelu_new`` (the tanh GELU), output head tied to ``wte`` (unless the
config unties it). The linears are GPT-2's ``Conv1D`` (:class:`Conv1D`): PyTorch stores their
weight [in, out], this port stores the kernel [out, in] as transformers' Flax GPT-2 did, so the
params tree, its PyTorch mapping (:mod:`flax_lora.models.weights`: a 2-D kernel is the torch
weight transposed), int8/NF4 (``conv1d`` kind) and the adapters (PEFT names ``c_attn``,
``c_proj``, ``c_fc``; ``fan_in_fan_out``) are those of transformers' class, and a random init
from a seed gives the same weights it gave.

What the decoder port (:mod:`flax_lora.models.decoder`) offers, this one does too, with the same
call signature: ``scan`` (the blocks as one ``nn.scan``, stacked under ``transformer/h/stack``),
``remat``, packed rows (``segment_ids``), HF's Flax KV-cache protocol (``init_cache``), the fused
loss (``output_hidden_states``: the last is the ``ln_f`` output) and its attention kernels
(explicit float32 scores; cuDNN flash attention on GPUs in half precision).

Precision: matmuls and LayerNorm in ``dtype`` (as transformers' Flax GPT-2), attention scores and
softmax in float32, logits in float32. Dropout of the base model is not applied (training keeps it
off: LoRA dropout is the adapter's).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_lora import matmul
from flax_lora.errors import UserError
from flax_lora.models.decoder import ACTIVATIONS, CausalLMOutput, _allowed, _explicit_attention, _fused_attention
from flax_lora.models.stacking import STACK

MODEL_TYPES = ("gpt2",)
CONV1D_INIT_STD = 0.02  # transformers' Flax Conv1D ignores initializer_range


def check_config(config) -> None:
    """Options this port does not implement are refused by name, never ignored."""
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"model_type {config.model_type!r} is not GPT-2")
    if getattr(config, "add_cross_attention", False):
        raise UserError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder part, not a causal LM")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UserError("scale_attn_by_inverse_layer_idx is not implemented by the GPT-2 port")
    if config.activation_function not in ACTIVATIONS:
        raise UserError(f"activation {config.activation_function!r} is not supported ({', '.join(ACTIVATIONS)})")


class Conv1D(nn.Module):
    """GPT-2's linear: ``x @ kernel.T + bias`` with the kernel stored [out, in] (transformers'
    ``FlaxConv1D`` layout; LoRA and quantization know it as kind ``conv1d``)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, self.dtype)
        kernel = self.param("kernel", nn.initializers.normal(CONV1D_INIT_STD), (self.features, x.shape[-1]),
                            self.param_dtype)
        y = matmul.linear(x, kernel, self.dtype, w_in=1)  # bf16 on XLA:CPU: the native bf16 dots (flax_lora.matmul)
        if self.use_bias:
            y = y + jnp.asarray(self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype), self.dtype)
        return y


class Attention(nn.Module):
    """Causal multi-head attention from the fused ``c_attn``, out through ``c_proj``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, segment_ids=None):
        cfg = self.config
        nh = cfg.num_attention_heads
        hd = cfg.hidden_size // nh
        b, t, _ = x.shape
        conv = partial(Conv1D, dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = jnp.split(conv(3 * cfg.hidden_size, name="c_attn")(x), 3, axis=-1)
        q, k, v = (y.reshape(b, t, nh, hd) for y in (q, k, v))
        scale = hd ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        c_proj = conv(cfg.hidden_size, name="c_proj")
        cached = self.has_variable("cache", "cached_key") or self.init_cache
        if cached and segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are for training; the KV cache takes one sequence per row")
        impl = _fused_attention(self.dtype, hd)
        if impl and not cached and segment_ids is None:
            lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
                                               implementation=None if impl == "auto" else impl)
            return c_proj(out.reshape(b, t, nh * hd))
        offset = jnp.zeros((), jnp.int32)
        if cached:
            k, v, offset = self._update_cache(k, v)
        allowed = _allowed(t, k.shape[1], offset, None, attention_mask, segment_ids)
        out = _explicit_attention(q, k, v, allowed, scale, None, self.dtype)
        return c_proj(out.reshape(b, t, nh * hd))

    def _update_cache(self, k, v):
        """HF Flax KV-cache protocol: ``init_cache`` creates it, later calls append to it."""
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        ci = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:
            return k, v, jnp.zeros((), jnp.int32)
        idx = ci.value
        ck.value = lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, idx, 0, 0))
        cv.value = lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, idx, 0, 0))
        ci.value = idx + k.shape[1]
        return ck.value, cv.value, idx


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        conv = partial(Conv1D, dtype=self.dtype, param_dtype=self.param_dtype)
        inner = getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        return conv(cfg.hidden_size, name="c_proj")(ACTIVATIONS[cfg.activation_function](conv(inner, name="c_fc")(x)))


class Block(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, segment_ids=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = partial(nn.LayerNorm, epsilon=cfg.layer_norm_epsilon, **kw)
        attn = Attention(cfg, init_cache=self.init_cache, name="attn", **kw)
        x = x + attn(ln(name="ln_1")(x), attention_mask, segment_ids)
        return x + MLP(cfg, name="mlp", **kw)(ln(name="ln_2")(x))


class _ScanBlock(Block):
    def __call__(self, x, attention_mask, segment_ids=None):  # noqa: D102 - (carry, output) for nn.scan
        return super().__call__(x, attention_mask, segment_ids), None


class Blocks(nn.Module):
    """``h``: the blocks, unrolled (``h/<i>``) or, with ``scan``, one ``nn.scan`` (``h/stack``)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, output_hidden_states: bool = False, segment_ids=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_cache=self.init_cache)
        hidden = []
        if self.scan:
            cls = nn.remat(_ScanBlock, prevent_cse=False) if self.remat else _ScanBlock
            extra = () if segment_ids is None else (segment_ids,)
            stack = nn.scan(cls, variable_axes={"params": 0, "lora": 0, "cache": 0},
                            split_rngs={"params": True, "lora_dropout": True, "dropout": True},
                            in_axes=(nn.broadcast,) * (1 + len(extra)), length=cfg.num_hidden_layers)
            x, _ = stack(cfg, name=STACK, **kw)(x, attention_mask, *extra)
            return x, hidden
        cls = nn.remat(Block) if self.remat else Block
        for i in range(cfg.num_hidden_layers):
            if output_hidden_states:
                hidden.append(x)
            x = cls(cfg, name=str(i), **kw)(x, attention_mask, segment_ids)
        return x, hidden


class _Transformer(nn.Module):
    """``transformer``: wte + wpe -> blocks -> ln_f; also returns ``wte`` (the tied head)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, output_hidden_states=False, segment_ids=None):
        cfg = self.config
        embed = partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                        embedding_init=nn.initializers.normal(cfg.initializer_range))
        wte = embed(cfg.vocab_size, name="wte")
        x = wte(input_ids.astype(jnp.int32)) + embed(cfg.max_position_embeddings, name="wpe")(position_ids.astype(jnp.int32))
        blocks = Blocks(cfg, self.dtype, self.param_dtype, self.scan, self.remat, self.init_cache, name="h")
        x, hidden = blocks(x, attention_mask, output_hidden_states, segment_ids)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(x)
        return x, hidden, wte.embedding


class GPT2LM(nn.Module):
    """GPT-2 causal LM with the decoder port's call signature and output (``.logits`` [B, T, V] float32).

    ``segment_ids`` marks packed rows' examples (see :mod:`flax_lora.models.decoder`); pass
    ``position_ids`` restarting per example with them.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = True, segment_ids=None):
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        body = _Transformer(cfg, self.dtype, self.param_dtype, self.scan, self.remat, init_cache, name="transformer")
        x, hidden, wte = body(input_ids, attention_mask, position_ids, output_hidden_states, segment_ids)
        if getattr(cfg, "tie_word_embeddings", True):
            logits = jnp.einsum("bth,vh->btv", x, wte.astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_range), name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        hidden_states = tuple(hidden) + (x,) if output_hidden_states else None
        if not return_dict:
            return (logits,) + ((hidden_states,) if output_hidden_states else ())
        return CausalLMOutput(logits, hidden_states)


# ----------------------------------------------------------------------------- loading


def load_gpt2(path_or_config, dtype=jnp.float32, param_dtype=jnp.float32, *, scan: bool = False,
              remat: bool = False, seed: int = 0, config=None):
    """(module, params, config) from a PyTorch safetensors checkpoint dir, or a config (random init,
    the weights transformers' Flax GPT-2 drew from the same seed). Params in ``param_dtype``,
    stacked when ``scan``; ``config`` overrides the directory's config.json."""
    from pathlib import Path

    from flax_lora.models.base import param_shapes
    from flax_lora.models.stacking import stack_layers

    from_dir = isinstance(path_or_config, (str, Path))
    if from_dir:
        config = config if config is not None else load_config(path_or_config)
    else:
        config = path_or_config
    check_config(config)
    module = GPT2LM(config, dtype=dtype, param_dtype=param_dtype, scan=scan, remat=remat)
    flat_module = module.clone(scan=False, remat=False)
    if from_dir:
        from flax_lora.models.weights import read_checkpoint, torch_to_flax

        tied = ("transformer", "wte", "embedding")
        params = torch_to_flax(read_checkpoint(path_or_config), param_shapes(flat_module), dtype=param_dtype,
                               tied_embedding=tied)
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        params = jax.jit(lambda rng: flat_module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])(
            jax.random.split(jax.random.PRNGKey(seed))[0])  # transformers' init_weights: (params, dropout) split
    if scan:
        params = stack_layers(params, config.num_hidden_layers)
    return module, params, config


def load_config(path):
    """The config of a GPT-2 checkpoint directory (refused when it is another family)."""
    from pathlib import Path

    from flax_lora.models.hub import config_from_json, read_config_json

    raw = read_config_json(Path(path), str(path), MODEL_TYPES)
    if raw["model_type"] not in MODEL_TYPES:
        raise UserError(f"{path}: model_type {raw['model_type']!r} is not gpt2")
    return config_from_json(raw, str(path))


def load_causal_lm(source: str, config=None, *, dtype=jnp.float32, scan: bool = False, remat: bool = False):
    """Registry loader: a Hub id or folder -> ``CausalLM`` (frozen params in the compute dtype)."""
    from flax_lora.models.base import CausalLM
    from flax_lora.models.hub import resolve

    module, params, config = load_gpt2(resolve(source), dtype, dtype, scan=scan, remat=remat, config=config)
    return CausalLM(module, params, config, config.model_type, source, dtype, layers_stacked=module.scan)


def causal_lm_from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config"):
    """A random-initialised GPT-2 ``CausalLM`` (tests, the demo)."""
    from flax_lora.models.base import CausalLM

    module, params, config = load_gpt2(config, dtype, dtype, seed=seed)
    return CausalLM(module, params, config, config.model_type, source, dtype)
