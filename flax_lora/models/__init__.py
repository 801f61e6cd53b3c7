"""Frozen causal language models behind one interface, and the model_type -> loader registry.

``load_model(name_or_path)`` reads the config, looks its ``model_type`` up in ``REGISTRY`` and
calls that loader; every loader returns a :class:`CausalLM`. transformers' Flax classes are the
default implementation (``flax_lora.models.hf``); a faithful port of a family registers itself
with ``@register("llama", "mistral", ...)`` and wins over the default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

# model_type -> loader(source, config, *, dtype) -> CausalLM
REGISTRY: dict[str, Callable[..., "CausalLM"]] = {}


def register(*model_types: str):
    """Decorator: make ``fn(source, config, *, dtype) -> CausalLM`` the loader of these model types."""

    def deco(fn):
        for t in model_types:
            REGISTRY[t] = fn
        return fn

    return deco


@dataclass
class CausalLM:
    """A frozen causal LM: a Flax module, its params, and how to call it.

    ``logits(variables, input_ids, attention_mask)`` hides each family's call signature:
    position ids are derived from the mask (right padding), families without them (BLOOM)
    get none. ``variables`` is ``{"params": ..., "lora": ...}``; run it inside
    ``flax_lora.lora.lora_active`` for the adapter to take effect.
    """

    module: Any  # flax.linen.Module
    params: Any  # frozen weights, in the compute dtype
    config: Any  # transformers PretrainedConfig
    model_type: str
    source: str  # Hub id or local folder (or "demo")
    dtype: Any = jnp.float32  # compute dtype of the frozen weights and matmuls
    layers_stacked: bool = False  # params (and adapters) hold the decoder layers stacked [L, ...] (scan)
    takes_position_ids: bool = field(init=False)

    def __post_init__(self):
        self.takes_position_ids = "position_ids" in inspect.signature(type(self.module).__call__).parameters

    def logits(self, variables, input_ids, attention_mask, *, rngs=None) -> jax.Array:
        """Logits [B, T, V] (the model's dtype) for right-padded ``input_ids`` [B, T]."""
        kwargs = {}
        if self.takes_position_ids:
            kwargs["position_ids"] = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
        out = self.module.apply(
            variables,
            input_ids.astype(jnp.int32),
            attention_mask.astype(jnp.int32),
            deterministic=True,  # base-model dropout off; LoRA dropout is the interceptor's
            return_dict=False,
            rngs=rngs,
            **kwargs,
        )
        return out[0]

    def linears(self):
        """All linear modules of the model (path -> LinearInfo), found without computing.

        Always per layer (``model/layers/3/self_attn/q_proj``), stacked layers too: adapters,
        targets and exports name layers the same way whether the model scans or not.
        """
        from flax_lora.lora import discover_linears

        ids = jnp.zeros((1, 8), jnp.int32)
        if self.layers_stacked:
            from flax_lora.models.llama import param_shapes

            flat = CausalLM(self.module.clone(scan=False, remat=False), None, self.config, self.model_type,
                            self.source, self.dtype)
            return discover_linears(lambda p: flat.logits({"params": p}, ids, jnp.ones_like(ids)),
                                    param_shapes(flat.module))
        return discover_linears(lambda p: self.logits({"params": p}, ids, jnp.ones_like(ids)), self.params)

    def stack_lora(self, lora):
        """A per-layer adapter tree in this model's layout (stacked [L, ...] when the layers scan).

        A layer without an adapter gets zeros: an exact zero delta that stays zero in training
        (its gradients are zero), dropped again by :meth:`unstack_lora`'s ``keep``.
        """
        if not self.layers_stacked or not lora:
            return lora
        from flax_lora.models.llama import stack_layers

        return stack_layers(lora, self.config.num_hidden_layers, fill_missing=True)

    def unstack_lora(self, lora, keep=None):
        """The per-layer adapter tree of ``lora`` (this model's layout), only the ``keep`` modules if given."""
        from flax.traverse_util import flatten_dict, unflatten_dict

        if self.layers_stacked:
            from flax_lora.models.llama import unstack_layers

            lora = unstack_layers(lora)
        if keep is None:
            return lora
        keep = set(keep)
        return unflatten_dict({k: v for k, v in flatten_dict(dict(lora)).items() if "/".join(k[:-1]) in keep})

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the position embeddings allow (None: no limit known)."""
        for name in ("n_positions", "max_position_embeddings"):
            if getattr(self.config, name, None):
                return int(getattr(self.config, name))
        return None

    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.config, "eos_token_id", None)
        return eos[0] if isinstance(eos, (list, tuple)) else eos


def load_model(source: str, *, dtype=jnp.float32, config=None, scan: bool = False, remat: bool = False) -> CausalLM:
    """Load a causal LM from a Hub id or a local folder, frozen weights cast to ``dtype``.

    ``scan``: run the decoder layers as one scanned layer (one layer to compile, not L) where
    the family's loader can (the Llama port); elsewhere it is ignored (``layers_stacked`` says
    which). ``remat``: recompute each layer's activations in the backward pass (gradient
    checkpointing); a family without it is a UserError.
    """
    from flax_lora.models import hf

    config = config if config is not None else hf.load_config(source)
    loader = REGISTRY.get(config.model_type, hf.load_hf)
    takes = inspect.signature(loader).parameters
    kwargs = {}
    if "scan" in takes:
        kwargs["scan"] = scan
    if remat:
        if "remat" not in takes:
            from flax_lora.errors import UserError

            raise UserError(f"gradient checkpointing (--remat) is not available for model type {config.model_type!r} "
                            "(transformers' Flax class has none); it is for llama, mistral and qwen2")
        kwargs["remat"] = True
    return loader(source, config, dtype=dtype, **kwargs)


def load_tokenizer(source: str):
    from flax_lora.models import hf

    return hf.load_tokenizer(source)


def _register_defaults() -> None:
    from flax_lora.models import hf

    for t in hf.SUPPORTED:
        REGISTRY.setdefault(t, hf.load_hf)


_register_defaults()


def _register_ports() -> None:
    """Faithful ports win over transformers' Flax classes (llama, mistral, qwen2)."""
    from flax_lora.models import llama

    for t in llama.MODEL_TYPES:
        REGISTRY[t] = llama.load_causal_lm


_register_ports()
