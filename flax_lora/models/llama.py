"""A faithful Flax (linen) port of the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5,
SmolLM/SmolLM2, TinyLlama.

It fixes what transformers 4.57's FlaxLlama/FlaxMistral get wrong (RoPE base fixed at 10000,
``rope_scaling`` and ``head_dim`` ignored, random ``lm_head`` for tied embeddings, no remat, no
Qwen2) and keeps their parameter tree, so LoRA target names are PEFT's and the PyTorch key of
every parameter is its path with ``/`` -> ``.``::

    model/embed_tokens/embedding                      [V, H]
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel  [in, out]   (+ bias for Qwen2 q/k/v)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel
    model/layers/<i>/{input,post_attention}_layernorm/weight
    model/norm/weight
    lm_head/kernel                                    absent when embeddings are tied

With ``scan=True`` the layers are one ``nn.scan`` and their params are stacked
``model/layers/stack/...`` [L, ...]; :func:`stack_layers` / :func:`unstack_layers` convert
any tree that mirrors params (the LoRA tree too). Files on disk always use the per-layer layout.

Precision: matmuls in ``dtype`` (e.g. bfloat16), attention scores, softmax, RoPE and RMSNorm
statistics in float32, logits returned in float32.

Mistral/Qwen2 sliding-window attention is applied (windows may differ per layer unless
``scan=True``). RoPE types: default, linear, dynamic (stateless: uses this call's largest
position, where PyTorch keeps grown frequencies until a short input resets them), llama3.
Attention dropout is not implemented (0 in every supported checkpoint).

Packed rows (``lora train --packing``): ``segment_ids`` [B, T] (1, 2, ... per example, 0 on
padding) confine attention to each example (causal within it, nothing across) and the caller's
``position_ids`` restart at 0 for each, so every example gets the logits it gets alone in a row.
Packed rows always take the explicit-score path (see :func:`_fused_attention`).
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_lora.errors import UserError
from flax_lora.models.base import CausalLM, param_shapes
from flax_lora.models.hub import read_config_json, resolve
from flax_lora.models.stacking import STACK, stack_layers

MODEL_TYPES = ("llama", "mistral", "qwen2")


# ----------------------------------------------------------------------------- config helpers


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_bias(config) -> bool:
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def _o_bias(config) -> bool:
    return config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))


def layer_windows(config) -> list[int | None]:
    """Sliding-window size per layer (None = full causal attention), as PyTorch decides it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return [window] * n
    if config.model_type == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        return [window if t == "sliding_attention" else None for t in types]
    return [None] * n


def _rope_scaling(config) -> dict:
    rs = dict(getattr(config, "rope_scaling", None) or {})
    rs.setdefault("rope_type", rs.get("type", "default"))
    if rs["rope_type"] not in ("default", "linear", "dynamic", "llama3"):
        raise UserError(f"rope_scaling type {rs['rope_type']!r} is not supported (default, linear, dynamic, llama3)")
    return rs


def rope_inv_freq(config) -> np.ndarray:
    """Static inverse frequencies [head_dim/2] (float32), as transformers' ROPE_INIT_FUNCTIONS."""
    dim = int(head_dim(config) * getattr(config, "partial_rotary_factor", 1.0))
    base = float(getattr(config, "rope_theta", 10000.0))
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    rs = _rope_scaling(config)
    if rs["rope_type"] == "linear":
        inv = inv / rs["factor"]
    elif rs["rope_type"] == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(config, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, head_dim] in float32 for the given positions."""
    rs = _rope_scaling(config)
    inv = jnp.asarray(rope_inv_freq(config))
    if rs["rope_type"] == "dynamic":
        dim = inv.shape[0] * 2
        max_pos = config.max_position_embeddings
        seq = jnp.maximum(jnp.max(position_ids) + 1, max_pos).astype(jnp.float32)
        base = float(getattr(config, "rope_theta", 10000.0))
        base = base * ((rs["factor"] * seq / max_pos) - (rs["factor"] - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def _fused_attention(dtype, head_dim: int) -> str | None:
    """Which attention kernel to trace: None for explicit scores, else a
    ``jax.nn.dot_product_attention`` implementation.

    ``LORA_ATTENTION`` overrides: ``xla`` (explicit scores), ``auto`` (jax picks), ``cudnn``
    (flash attention on NVIDIA GPUs, bf16/fp16). Unset: cuDNN flash attention on GPUs in
    bf16/fp16 where cuDNN supports the head size, explicit scores elsewhere: flash attention
    never materialises the [B, H, T, T] scores, so it is both faster and far smaller on GPUs
    (measured figures: benchmarks/RESULTS.md, "GPU").

    Packed rows (``segment_ids``) never take this kernel: they use explicit scores with the
    segment mask on every backend, GPUs included, so on a GPU packing gives up flash attention
    (the advisor's memory model counts the [B, H, T, T] scores then). jax 0.10.2 has no
    maintained segment-aware fused kernel: ``jax.nn.dot_product_attention`` takes one
    ``query_seq_lengths``/``key_value_seq_lengths`` per row (right padding, not several
    examples), cuDNN's packed layout (``q_offsets``/``kv_offsets``) is only reachable through
    the private ``jax._src.cudnn.fused_attention_stablehlo`` and needs Hopper, and Pallas'
    ``jax.experimental.pallas.ops.gpu.attention.mha`` (``segment_ids``) is an example kernel
    without grouped-query heads. None of them could be run here (no GPU), so none is used.
    """
    impl = os.environ.get("LORA_ATTENTION")
    if impl is not None:
        return None if impl == "xla" else impl
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else None


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with float32 statistics (PyTorch's order)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)

        def norm(x, weight):
            x32 = x.astype(jnp.float32)
            x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return weight.astype(self.dtype) * x32.astype(self.dtype)

        # Recomputed in the backward pass, so autodiff saves x (compute dtype), not its float32
        # copy: with scanned layers every saved value is an [L, ...] stack written, zero-filled
        # and read back, so a smaller residual is less memory traffic (figures:
        # benchmarks/RESULTS.md). Same values: the same ops run again.
        return jax.checkpoint(norm, prevent_cse=False)(x, weight)


def _dense(features, bias, dtype, param_dtype, config, name):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def _allowed(t: int, s: int, offset, window: int | None, attention_mask, segment_ids) -> jax.Array:
    """Which keys each query sees, broadcastable to the scores [B, KV, G, T, S]: causal (from
    ``offset``, the cache position), within ``window``, not padding, and, for packed rows
    (``segment_ids`` [B, T]), only keys of the query's own example."""
    q_idx = offset + jnp.arange(t)[:, None]
    k_idx = jnp.arange(s)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed &= k_idx > q_idx - window
    if segment_ids is None:
        return allowed[None, None, None] & (attention_mask[:, None, None, None, :s] > 0)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return allowed[None, None, None] & same[:, None, None]


class Attention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    window: int | None = None
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, cos, sin, segment_ids=None):
        cfg = self.config
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
        b, t, _ = x.shape
        dense = partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype, config=cfg)
        q = dense(nh * hd, _qkv_bias(cfg), name="q_proj")(x).reshape(b, t, nh, hd)
        k = dense(nkv * hd, _qkv_bias(cfg), name="k_proj")(x).reshape(b, t, nkv, hd)
        v = dense(nkv * hd, _qkv_bias(cfg), name="v_proj")(x).reshape(b, t, nkv, hd)
        q = _rotate(q, cos, sin).astype(self.dtype)
        k = _rotate(k, cos, sin).astype(self.dtype)

        cached = self.has_variable("cache", "cached_key") or self.init_cache
        if cached and segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are for training; the KV cache takes one sequence per row")
        impl = _fused_attention(self.dtype, hd)
        if impl and not cached and self.window is None and segment_ids is None:
            # fused (flash) attention, e.g. cuDNN on GPUs: no [B, H, T, T] scores in memory.
            # Right padding (the trainer's): key_value_seq_lengths masks the padded keys.
            lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                               implementation=None if impl == "auto" else impl)
            return dense(cfg.hidden_size, _o_bias(cfg), name="o_proj")(out.reshape(b, t, nh * hd))

        offset = jnp.zeros((), jnp.int32)
        if cached:
            k, v, offset = self._update_cache(k, v)
        allowed = _allowed(t, k.shape[1], offset, self.window, attention_mask, segment_ids)

        g = nh // nkv
        q = q.reshape(b, t, nkv, g, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (hd**-0.5)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, nh * hd)
        return dense(cfg.hidden_size, _o_bias(cfg), name="o_proj")(out)

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
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bias = bool(getattr(cfg, "mlp_bias", False))
        dense = partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype, config=cfg)
        act = {"silu": nn.silu, "gelu": partial(nn.gelu, approximate=False), "gelu_pytorch_tanh": nn.gelu}
        if cfg.hidden_act not in act:
            raise UserError(f"hidden_act {cfg.hidden_act!r} is not supported")
        gate = dense(cfg.intermediate_size, bias, name="gate_proj")(x)
        up = dense(cfg.intermediate_size, bias, name="up_proj")(x)
        # Recomputed in the backward pass, so autodiff saves gate and up for it, not also
        # sigmoid(gate), its derivative and silu(gate): 2 instead of 5 [B, T, intermediate]
        # residuals per layer (stacks when scanned), less memory traffic and a lower peak
        # (figures: benchmarks/RESULTS.md).
        h = jax.checkpoint(lambda g, u: act[cfg.hidden_act](g) * u, prevent_cse=False)(gate, up)
        return dense(cfg.hidden_size, bias, name="down_proj")(h)


class DecoderLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    window: int | None = None
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, cos, sin, segment_ids=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        x = x + Attention(cfg, window=self.window, init_cache=self.init_cache, name="self_attn", **kw)(
            h, attention_mask, cos, sin, segment_ids
        )
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + MLP(cfg, name="mlp", **kw)(h)


class _ScanLayer(DecoderLayer):
    def __call__(self, x, attention_mask, cos, sin, segment_ids=None):  # noqa: D102 - (carry, output) for nn.scan
        return super().__call__(x, attention_mask, cos, sin, segment_ids), None


class LayerCollection(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, cos, sin, output_hidden_states: bool = False, segment_ids=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_cache=self.init_cache)
        windows = layer_windows(cfg)
        hidden = []
        if self.scan:
            if len(set(windows)) > 1:
                raise UserError("scan=True needs the same attention window in every layer; use scan=False")
            cls = nn.remat(_ScanLayer, prevent_cse=False) if self.remat else _ScanLayer
            stack = nn.scan(
                cls,
                variable_axes={"params": 0, "lora": 0, "cache": 0},
                split_rngs={"params": True, "lora_dropout": True, "dropout": True},
                in_axes=(nn.broadcast,) * (3 if segment_ids is None else 4),
                length=cfg.num_hidden_layers,
            )
            extra = () if segment_ids is None else (segment_ids,)
            x, _ = stack(cfg, window=windows[0], name=STACK, **kw)(x, attention_mask, cos, sin, *extra)
            return x, hidden
        cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        for i in range(cfg.num_hidden_layers):
            if output_hidden_states:
                hidden.append(x)
            extra = () if segment_ids is None else (segment_ids,)
            x = cls(cfg, window=windows[i], name=str(i), **kw)(x, attention_mask, cos, sin, *extra)
        return x, hidden


class LlamaForCausalLM(nn.Module):
    """Causal LM with HF FlaxLlamaForCausalLM's call signature and output (``.logits`` [B,T,V] fp32).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype of freshly initialised params.
    ``segment_ids`` (an addition to HF's signature) marks packed rows' examples, see the module
    docstring; pass ``position_ids`` restarting per example with them.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        deterministic: bool = True,
        init_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        segment_ids=None,
    ):
        from transformers.modeling_flax_outputs import FlaxCausalLMOutput

        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        model = _Backbone(cfg, self.dtype, self.param_dtype, self.scan, self.remat, init_cache, name="model")
        x, hidden, emb = model(input_ids, attention_mask, position_ids, output_hidden_states, segment_ids)
        if getattr(cfg, "tie_word_embeddings", False):
            logits = jnp.einsum("bth,vh->btv", x, emb.astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            logits = _dense(cfg.vocab_size, False, self.dtype, self.param_dtype, cfg, "lm_head")(x)
        logits = logits.astype(jnp.float32)
        hidden_states = tuple(hidden) + (x,) if output_hidden_states else None
        if not return_dict:
            return (logits,) + ((hidden_states,) if output_hidden_states else ())
        return FlaxCausalLMOutput(logits=logits, hidden_states=hidden_states, attentions=None)


class _Backbone(nn.Module):
    """``model``: embed_tokens -> layers -> norm; also returns the embedding (for tied lm_head)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, output_hidden_states=False, segment_ids=None):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="embed_tokens",
        )
        x = embed(input_ids.astype(jnp.int32))
        cos, sin = rope_cos_sin(cfg, position_ids)
        layers = LayerCollection(
            cfg, self.dtype, self.param_dtype, self.scan, self.remat, self.init_cache, name="layers"
        )
        x, hidden = layers(x, attention_mask, cos, sin, output_hidden_states, segment_ids)
        x = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return x, hidden, embed.embedding


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path):
    """transformers config of a checkpoint directory, checked to be a supported Llama family."""
    from transformers import AutoConfig

    raw = read_config_json(Path(path), str(path), MODEL_TYPES)
    if raw["model_type"] not in MODEL_TYPES:
        raise UserError(f"{path}: model_type {raw['model_type']!r} is not one of {', '.join(MODEL_TYPES)}")
    return AutoConfig.for_model(**raw)


def load_llama(
    path_or_config,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    *,
    scan: bool = False,
    remat: bool = False,
    seed: int = 0,
    config=None,
):
    """(module, params, config) from a PyTorch safetensors checkpoint dir, or a config (random init).

    Params are in ``param_dtype`` (bfloat16 or float32), stacked when ``scan``. ``config``
    overrides the directory's config.json.
    """
    if isinstance(path_or_config, (str, Path)):
        config = config if config is not None else load_config(path_or_config)
    else:
        config = path_or_config
        if config.model_type not in MODEL_TYPES:
            raise UserError(f"model_type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    module = LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, scan=scan, remat=remat)
    flat_module = module.clone(scan=False, remat=False)
    if isinstance(path_or_config, (str, Path)):
        from flax_lora.models.weights import read_checkpoint, torch_to_flax

        params = torch_to_flax(read_checkpoint(path_or_config), param_shapes(flat_module), dtype=param_dtype)
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        ids = jnp.zeros((1, 1), jnp.int32)
        params = jax.jit(flat_module.init)(jax.random.PRNGKey(seed), ids)["params"]
    if scan:
        params = stack_layers(params, config.num_hidden_layers)
    return module, params, config


def load_causal_lm(source: str, config=None, *, dtype=jnp.float32, scan: bool = False, remat: bool = False):
    """Registry loader (``flax_lora.models.REGISTRY``): a Hub id or folder -> ``CausalLM``.

    Frozen params are stored in the compute ``dtype``, like the transformers-backed loader.
    """
    folder = resolve(source)
    config = config if config is not None else load_config(folder)
    scan = scan and len(set(layer_windows(config))) == 1  # scan needs one attention window for all layers
    module, params, config = load_llama(folder, dtype, dtype, scan=scan, remat=remat, config=config)
    return CausalLM(module, params, config, config.model_type, source, dtype, layers_stacked=scan)


def causal_lm_from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config"):
    """A random-initialised ``CausalLM`` of the Llama family (tests, demos)."""
    module, params, config = load_llama(config, dtype, dtype, seed=seed)
    return CausalLM(module, params, config, config.model_type, source, dtype)


def hf_wrapper(module: LlamaForCausalLM, params: Mapping | None = None):
    """A transformers ``FlaxPreTrainedModel`` around ``module``, for HF's ``generate`` (KV cache)."""
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaPreTrainedModel

    class FlaxLlamaFamilyForCausalLM(FlaxLlamaPreTrainedModel):
        module_class = LlamaForCausalLM

        def prepare_inputs_for_generation(self, input_ids, max_length, attention_mask=None):
            b, t = input_ids.shape
            cache = self.init_cache(b, max_length)
            ext = jnp.ones((b, max_length), dtype="i4")
            if attention_mask is not None:
                pos = attention_mask.cumsum(axis=-1) - 1
                ext = lax.dynamic_update_slice(ext, attention_mask.astype("i4"), (0, 0))
            else:
                pos = jnp.broadcast_to(jnp.arange(t, dtype="i4")[None], (b, t))
            return {"past_key_values": cache, "attention_mask": ext, "position_ids": pos}

        def update_inputs_for_generation(self, model_outputs, model_kwargs):
            model_kwargs["past_key_values"] = model_outputs.past_key_values
            model_kwargs["position_ids"] = model_kwargs["position_ids"][:, -1:] + 1
            return model_kwargs

        def init_cache(self, batch_size, max_length):
            ids = jnp.ones((batch_size, max_length), jnp.int32)
            shapes = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), ids, init_cache=True))["cache"]
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    wrapper = FlaxLlamaFamilyForCausalLM(
        module.config, dtype=module.dtype, _do_init=False, param_dtype=module.param_dtype, scan=module.scan, remat=module.remat
    )
    if params is not None:
        wrapper.params = params
    return wrapper
