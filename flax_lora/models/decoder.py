"""The project's decoder port: one Flax (linen) causal LM for the Llama family and every family
built like it, each difference a field of :class:`Family`.

Families: llama (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama), mistral, qwen2, qwen3 (per-head q/k
RMSNorm), gemma (Gemma 1: (1 + w) RMSNorm, scaled embedding, GELU-tanh, tied), gemma2
(soft-capping, alternating sliding windows, pre+post norms, (1 + w) RMSNorm, scaled embedding,
GELU-tanh, ``query_pre_attn_scalar``), gemma3_text (Gemma 2's layout, q/k norms, local/global
rope per layer), phi3 (fused ``qkv_proj`` / ``gate_up_proj``, partial rotary,
longrope; Phi-4-mini), smollm3 (layers without rope), olmo2 (norms after attention and MLP, q/k
norms over the full projections). Rotary embeddings: :mod:`flax_lora.models.rope`.

The parameter tree is PyTorch's, so LoRA targets are PEFT's names and the torch key of every
parameter is its path with ``/`` -> ``.``; with ``scan=True`` (every layer alike) the layers are
one ``nn.scan`` stacked under ``model/layers/stack`` (:mod:`flax_lora.models.stacking`).

Precision: matmuls in ``dtype``, attention scores, softmax, rope and RMSNorm statistics in float32,
logits in float32. Attention dropout is not implemented (0 in every supported checkpoint).

Packed rows (``lora train --packing``): ``segment_ids`` [B, T] (1, 2, ... per example, 0 on
padding) confine attention to each example (causal within it, nothing across) and the caller's
``position_ids`` restart at 0 for each, so every example gets the logits it gets alone in a row.
They always take the explicit-score path (see :func:`_fused_attention`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
from jax import lax

from flax_lora import matmul, residuals
from flax_lora.errors import UserError
from flax_lora.lora import DROPOUT_RNG, LORA
from flax_lora.models import rope as R
from flax_lora.models.stacking import STACK


@dataclass(frozen=True)
class Family:
    """What sets a family's decoder apart from Llama's (the defaults)."""

    norms: Literal["pre", "sandwich", "post"] = "pre"  # pre: Llama; sandwich: Gemma 2/3; post: OLMo 2
    norm_style: Literal["llama", "gemma", "olmo"] = "llama"  # how the weight meets the float32 statistics
    qk_norm: Literal[None, "head", "full"] = None  # Qwen3/Gemma 3: per head; OLMo 2: whole projection
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden)
    qkv_bias: bool = False  # Qwen2


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm="head"),
    "smollm3": Family(),
    "gemma": Family(norm_style="gemma", embed_scale=True),  # Gemma 1: Llama's layout, Gemma's norms and embedding
    "gemma2": Family(norms="sandwich", norm_style="gemma", embed_scale=True),
    "gemma3_text": Family(norms="sandwich", norm_style="gemma", qk_norm="head", embed_scale=True),
    "phi3": Family(fused=True),
    "olmo2": Family(norms="post", norm_style="olmo", qk_norm="full"),
}
MODEL_TYPES = tuple(FAMILIES)
ACTIVATIONS = {"silu": nn.silu, "gelu": partial(nn.gelu, approximate=False), "gelu_pytorch_tanh": nn.gelu,
               "gelu_new": nn.gelu}


class LayerSpec(NamedTuple):
    """What may differ between a family's layers."""

    window: int | None  # sliding-window attention (None: full causal)
    rope: Literal["global", "local", "none"]


def family_of(config) -> Family:
    if config.model_type not in FAMILIES:
        raise UserError(f"model_type {config.model_type!r} has no port; supported: {', '.join(MODEL_TYPES)}")
    return FAMILIES[config.model_type]


def layer_specs(config) -> list[LayerSpec]:
    """Each layer's window and rope, as PyTorch decides them."""
    n, t = config.num_hidden_layers, config.model_type
    window = getattr(config, "sliding_window", None)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    if t in ("mistral", "phi3"):
        windows = [window] * n
    elif t == "llama" or t == "olmo2":
        windows = [None] * n
    else:  # qwen2, qwen3, smollm3, gemma2, gemma3_text: per layer type
        windows = [window if kind == "sliding_attention" else None for kind in types]
    if t == "smollm3":
        ropes = ["global" if use else "none" for use in config.no_rope_layers]
    elif t == "gemma3_text":
        ropes = ["local" if kind == "sliding_attention" else "global" for kind in types]
    else:
        ropes = ["global"] * n
    return [LayerSpec(w, r) for w, r in zip(windows, ropes)]


def ropes_of(config) -> dict[str, R.Rope]:
    """The rotary embeddings the layers use, by kind."""
    out = {"global": R.rope_of(config)}
    if config.model_type == "gemma3_text":
        out["local"] = R.rope_of(config, "sliding_attention")
    return out


def check_config(config) -> None:
    """Options a port does not implement are refused by name, never ignored."""
    family_of(config)
    R.scaling_of(config)
    if getattr(config, "attention_dropout", 0.0):
        raise UserError(f"attention_dropout {config.attention_dropout} is not implemented (training keeps it at 0)")
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in ACTIVATIONS:
        raise UserError(f"hidden activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")


def _fused_attention(dtype, head_dim: int) -> str | None:
    """Which attention kernel to trace: None for explicit scores, else a ``jax.nn.dot_product_attention``
    implementation. ``LORA_ATTENTION``: ``xla`` (explicit scores), ``auto`` (jax picks), ``cudnn``.
    Unset: cuDNN flash attention on GPUs in bf16/fp16 for head sizes cuDNN takes (no [B, H, T, T]
    scores: faster and far smaller; figures in benchmarks/RESULTS.md), explicit scores elsewhere.

    Packed rows never take it: jax 0.10's public fused attention takes one length per row, not
    several examples (cuDNN's packed layout is private and Hopper-only; Pallas' segment-aware
    ``mha`` is an example kernel without grouped-query heads), and none could be run without a GPU.
    Soft-capped scores (Gemma 2) do not take it either: the fused kernels have no soft-cap."""
    impl = os.environ.get("LORA_ATTENTION")
    if impl is not None:
        return None if impl == "xla" else impl
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else None


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics; ``style`` says how the weight is applied, as each family's
    PyTorch code does: llama ``w * x.to(dtype)``, gemma ``(x * (1 + w)).to(dtype)`` in float32,
    olmo ``(w * x).to(dtype)`` in float32."""

    eps: float
    style: str = "llama"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.style == "gemma" else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)

        def norm(x, weight):
            x32 = x.astype(jnp.float32)
            x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            if self.style == "gemma":
                return (x32 * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
            if self.style == "olmo":
                return (weight.astype(jnp.float32) * x32).astype(self.dtype)
            return weight.astype(self.dtype) * x32.astype(self.dtype)

        # Recomputed in the backward pass: autodiff saves x (compute dtype), not a float32 copy
        # (less memory traffic under scan; benchmarks/RESULTS.md). Same ops, same values.
        return jax.checkpoint(norm, prevent_cse=False)(x, weight)


def _dense(features, bias, dtype, param_dtype, config, name):
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, dot_general=matmul.dot_general,
                    promote_dtype=matmul.promote_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def _norm(config, family: Family, name: str, **kw) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, family.norm_style, name=name, **kw)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, rope, optional q/k norms, window and soft-cap."""

    config: Any
    spec: LayerSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_cache: bool = False

    def _qkv(self, x):
        cfg, fam = self.config, family_of(self.config)
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, R.head_dim(cfg)
        bias = fam.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        dense = partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype, config=cfg)
        if fam.fused:
            qkv = dense((nh + 2 * nkv) * hd, bias, name="qkv_proj")(x)
            return qkv[..., :nh * hd], qkv[..., nh * hd:(nh + nkv) * hd], qkv[..., (nh + nkv) * hd:]
        return (dense(nh * hd, bias, name="q_proj")(x), dense(nkv * hd, bias, name="k_proj")(x),
                dense(nkv * hd, bias, name="v_proj")(x))

    def _project(self, x, tables):
        """q, k, v [B, T, heads, hd] in the compute dtype: projected, normed, rotated."""
        cfg, fam = self.config, family_of(self.config)
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, R.head_dim(cfg)
        b, t, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = self._qkv(x)
        if fam.qk_norm == "full":
            q, k = _norm(cfg, fam, "q_norm", **kw)(q), _norm(cfg, fam, "k_norm", **kw)(k)
        q, k, v = q.reshape(b, t, nh, hd), k.reshape(b, t, nkv, hd), v.reshape(b, t, nkv, hd)
        if fam.qk_norm == "head":
            q, k = _norm(cfg, fam, "q_norm", **kw)(q), _norm(cfg, fam, "k_norm", **kw)(k)
        if self.spec.rope != "none":
            cos, sin = tables[self.spec.rope]
            q, k = R.rotate(q, cos, sin), R.rotate(k, cos, sin)
        return q.astype(self.dtype), k.astype(self.dtype), v

    @nn.compact
    def __call__(self, x, attention_mask, tables, segment_ids=None):
        cfg = self.config
        nh, hd = cfg.num_attention_heads, R.head_dim(cfg)
        b, t, _ = x.shape
        q, k, v = self._project(x, tables)
        scale = (getattr(cfg, "query_pre_attn_scalar", None) or hd) ** -0.5
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        out_bias = bool(getattr(cfg, "attention_bias", False)) and not family_of(cfg).qkv_bias
        o_proj = _dense(cfg.hidden_size, out_bias, self.dtype, self.param_dtype, cfg, "o_proj")
        cached = self.has_variable("cache", "cached_key") or self.init_cache
        if cached and segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are for training; the KV cache takes one sequence per row")
        impl = _fused_attention(self.dtype, hd)
        if impl and not cached and softcap is None and segment_ids is None:
            # fused (flash) attention, e.g. cuDNN on GPUs: no [B, H, T, T] scores in memory. Right
            # padding (the trainer's): key_value_seq_lengths masks the padded keys.
            lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
            window = None if self.spec.window is None else (self.spec.window - 1, 0)
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
                                               local_window_size=window,
                                               implementation=None if impl == "auto" else impl)
            return o_proj(out.reshape(b, t, nh * hd))
        offset = jnp.zeros((), jnp.int32)
        if cached:
            k, v, offset = self._update_cache(k, v)
        allowed = _allowed(t, k.shape[1], offset, self.spec.window, attention_mask, segment_ids)
        out = _explicit_attention(q, k, v, allowed, scale, softcap, self.dtype)
        return o_proj(out.reshape(b, t, nh * hd))

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


def _explicit_attention(q, k, v, allowed, scale, softcap, dtype):
    """Attention through explicit scores [B, KV, G, T, S] in float32: scaled, soft-capped, masked."""
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nh // nkv, hd)
    scores = matmul.einsum("btkgd,bskd->bkgts", q, k, jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return matmul.einsum("bkgts,bskd->btkgd", probs, v, dtype)


class MLP(nn.Module):
    """Gated MLP ``down(act(gate) * up)``; Phi-3 keeps gate and up in one ``gate_up_proj``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bias = bool(getattr(cfg, "mlp_bias", False))
        act = ACTIVATIONS[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
        dense = partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype, config=cfg)
        if family_of(cfg).fused:
            gate, up = jnp.split(dense(2 * cfg.intermediate_size, bias, name="gate_up_proj")(x), 2, axis=-1)
        else:
            gate = dense(cfg.intermediate_size, bias, name="gate_proj")(x)
            up = dense(cfg.intermediate_size, bias, name="up_proj")(x)
        # Recomputed in the backward pass: autodiff keeps gate and up, not every intermediate of the
        # activation (fewer [B, T, intermediate] residuals; benchmarks/RESULTS.md).
        h = jax.checkpoint(lambda g, u: act(g) * u, prevent_cse=False)(gate, up)
        return dense(cfg.hidden_size, bias, name="down_proj")(h)


class DecoderLayer(nn.Module):
    """Attention and MLP with the family's norms: pre (Llama), sandwich (Gemma), post (OLMo 2)."""

    config: Any
    spec: LayerSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, tables, segment_ids=None):
        cfg, fam = self.config, family_of(self.config)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: _norm(cfg, fam, name, **kw)  # noqa: E731
        module = Attention(cfg, self.spec, init_cache=self.init_cache, name="self_attn", **kw)
        attn = lambda h: module(h, attention_mask, tables, segment_ids)  # noqa: E731
        mlp = MLP(cfg, name="mlp", **kw)
        if fam.norms == "pre":
            x = x + attn(norm("input_layernorm")(x))
            return x + mlp(norm("post_attention_layernorm")(x))
        if fam.norms == "sandwich":
            x = x + norm("post_attention_layernorm")(attn(norm("input_layernorm")(x)))
            return x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
        x = x + norm("post_attention_layernorm")(attn(x))
        return x + norm("post_feedforward_layernorm")(mlp(x))


_LAYER_RNGS = (DROPOUT_RNG, "dropout")  # the streams a layer may draw from (LoRA dropout, dropout)


class _ScanLayer(DecoderLayer):
    """A decoder layer as ``nn.scan``'s body: (carry, output); bf16 on XLA:CPU keeps its backward
    residuals packed as integers (:mod:`flax_lora.residuals`) when training."""

    def __call__(self, x, attention_mask, tables, segment_ids=None):  # noqa: D102
        if self.init_cache or self.is_initializing() or not residuals.wanted(self.dtype):
            return super().__call__(x, attention_mask, tables, segment_ids), None
        return self._packed(x, attention_mask, tables, segment_ids), None

    def _packed(self, x, attention_mask, tables, segment_ids):
        """The same layer as a pure function of this slice's variables, under :func:`residuals.layer_vjp`."""
        layer = DecoderLayer(self.config, self.spec, self.dtype, self.param_dtype, parent=None)
        names = [n for n in _LAYER_RNGS if self.has_rng(n)]
        keys = tuple(self.make_rng(n) for n in names)

        def apply(params, lora, h, attention_mask, tables, segment_ids, keys):
            variables = {"params": params} if lora is None else {"params": params, LORA: lora}
            return layer.apply(variables, h, attention_mask, tables, segment_ids, rngs=dict(zip(names, keys)))

        return residuals.layer_vjp(apply)(self.variables["params"], self.variables.get(LORA), x,
                                          attention_mask, tables, segment_ids, keys)


class LayerCollection(nn.Module):
    """The decoder layers: one ``nn.scan`` when every layer is alike and ``scan`` is asked, else unrolled."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, tables, output_hidden_states: bool = False, segment_ids=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_cache=self.init_cache)
        specs = layer_specs(cfg)
        hidden = []
        if self.scan:
            if len(set(specs)) > 1:
                raise UserError("scan=True needs every layer alike (windows, rope); use scan=False")
            cls = nn.remat(_ScanLayer, prevent_cse=False) if self.remat else _ScanLayer
            stack = nn.scan(cls, variable_axes={"params": 0, "lora": 0, "cache": 0},
                            split_rngs={"params": True, "lora_dropout": True, "dropout": True},
                            in_axes=(nn.broadcast,) * (2 if segment_ids is None else 3),
                            length=cfg.num_hidden_layers)
            if not self.is_initializing():  # stacked bf16 kernels sliced as uint16 on XLA:CPU (matmul.as_storage)
                stack = nn.map_variables(stack, "params", trans_in_fn=matmul.as_storage)
            extra = () if segment_ids is None else (segment_ids,)
            x, _ = stack(cfg, specs[0], name=STACK, **kw)(x, attention_mask, tables, *extra)
            return x, hidden
        cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        for i, spec in enumerate(specs):
            if output_hidden_states:
                hidden.append(x)
            x = cls(cfg, spec, name=str(i), **kw)(x, attention_mask, tables, segment_ids)
        return x, hidden


@struct.dataclass
class CausalLMOutput:
    """What ``return_dict=True`` returns (``.logits`` [B, T, V] float32, ``.hidden_states``); a pytree."""

    logits: jax.Array
    hidden_states: tuple | None = None


class DecoderLM(nn.Module):
    """Causal LM with HF Flax causal LMs' call signature and output (``.logits`` [B, T, V] float32).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype of freshly initialised params.
    ``segment_ids`` (an addition to HF's signature) marks packed rows' examples (module docstring);
    pass ``position_ids`` restarting per example with them.
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
        model = _Backbone(cfg, self.dtype, self.param_dtype, self.scan, self.remat, init_cache, name="model")
        x, hidden, emb = model(input_ids, attention_mask, position_ids, output_hidden_states, segment_ids)
        if getattr(cfg, "tie_word_embeddings", False):
            logits = jnp.einsum("bth,vh->btv", x, emb.astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            logits = _dense(cfg.vocab_size, False, self.dtype, self.param_dtype, cfg, "lm_head")(x)
        logits = softcap(logits.astype(jnp.float32), getattr(cfg, "final_logit_softcapping", None))
        hidden_states = tuple(hidden) + (x,) if output_hidden_states else None
        if not return_dict:
            return (logits,) + ((hidden_states,) if output_hidden_states else ())
        return CausalLMOutput(logits, hidden_states)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); unchanged when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class _Backbone(nn.Module):
    """``model``: embed_tokens -> layers -> norm; also returns the embedding (for a tied lm_head)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan: bool = False
    remat: bool = False
    init_cache: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, output_hidden_states=False, segment_ids=None):
        cfg, fam = self.config, family_of(self.config)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), name="embed_tokens")
        x = embed(input_ids.astype(jnp.int32))
        if fam.embed_scale:
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
        kinds = {s.rope for s in layer_specs(cfg)} - {"none"}
        tables = {kind: R.cos_sin(r, position_ids) for kind, r in ropes_of(cfg).items() if kind in kinds}
        layers = LayerCollection(cfg, self.dtype, self.param_dtype, self.scan, self.remat, self.init_cache,
                                 name="layers")
        x, hidden = layers(x, attention_mask, tables, output_hidden_states, segment_ids)
        x = _norm(cfg, fam, "norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x, hidden, embed.embedding


# ----------------------------------------------------------------------------- loading


def load_config(path):
    """The transformers config of a checkpoint directory, checked to be a family this port covers."""
    from pathlib import Path

    from transformers import AutoConfig

    from flax_lora.models.hub import read_config_json

    raw = read_config_json(Path(path), str(path), MODEL_TYPES)
    if raw["model_type"] not in FAMILIES:
        raise UserError(f"{path}: model_type {raw['model_type']!r} is not one of {', '.join(MODEL_TYPES)}")
    return AutoConfig.for_model(**raw)


def load_decoder(path_or_config, dtype=jnp.float32, param_dtype=jnp.float32, *, scan: bool = False,
                 remat: bool = False, seed: int = 0, config=None, placement=None):
    """(module, params, config) from a PyTorch safetensors checkpoint dir, or a config (random init).

    Params are in ``param_dtype``, stacked when ``scan`` (every layer alike); ``config`` overrides the
    directory's config.json. A checkpoint is read leaf by leaf straight into the model's layout
    (:func:`flax_lora.models.weights.load_params`); ``placement`` (a
    :class:`flax_lora.training.parallel.FrozenPlan`) decides from the shapes where each leaf lives
    (sharded over the devices: each reads only its slice) and quantizes it as it is made.
    """
    from pathlib import Path

    from flax_lora.models.stacking import stack_layers

    from_dir = isinstance(path_or_config, (str, Path))
    if from_dir:
        config = config if config is not None else load_config(path_or_config)
    else:
        config = path_or_config
    check_config(config)
    scan = scan and len(set(layer_specs(config))) == 1
    module = DecoderLM(config, dtype=dtype, param_dtype=param_dtype, scan=scan, remat=remat)
    if from_dir:
        return module, _read_params(path_or_config, module, placement), config
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(module.clone(scan=False, remat=False).init)(jax.random.PRNGKey(seed), ids)["params"]
    if scan:
        params = stack_layers(params, config.num_hidden_layers)
    return module, params, config


def _read_params(folder, module, placement):
    """``module``'s params read from ``folder`` in its own layout (stacked when it scans)."""
    from flax_lora.models.base import param_shapes
    from flax_lora.models.weights import load_params

    template = param_shapes(module)
    if placement is None:
        return load_params(folder, template, dtype=module.param_dtype)
    placement.decide(template)
    return load_params(folder, template, dtype=module.param_dtype, sharding_for=placement.sharding_for,
                       transform=placement.transform)


def load_causal_lm(source: str, config=None, *, dtype=jnp.float32, scan: bool = False, remat: bool = False,
                   placement=None):
    """Registry loader: a Hub id or folder -> ``CausalLM`` (frozen params in the compute dtype,
    placed and quantized as ``placement`` says; see :func:`load_decoder`)."""
    from flax_lora.models.base import CausalLM, param_shapes
    from flax_lora.models.hub import resolve

    folder = resolve(source)
    module, params, config = load_decoder(folder, dtype, dtype, scan=scan, remat=remat, config=config,
                                          placement=placement)
    shapes = None if module.scan else param_shapes(module)  # linears are found on the float shapes
    return CausalLM(module, params, config, config.model_type, source, dtype, layers_stacked=module.scan,
                    linear_shapes=shapes)


def causal_lm_from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config"):
    """A random-initialised ``CausalLM`` of any family this port covers (tests, demos)."""
    from flax_lora.models.base import CausalLM

    module, params, config = load_decoder(config, dtype, dtype, seed=seed)
    return CausalLM(module, params, config, config.model_type, source, dtype)
