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
        """All linear modules of the model (path -> LinearInfo), found without computing."""
        from flax_lora.lora import discover_linears

        ids = jnp.zeros((1, 8), jnp.int32)
        return discover_linears(lambda p: self.logits({"params": p}, ids, jnp.ones_like(ids)), self.params)

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


def load_model(source: str, *, dtype=jnp.float32, config=None) -> CausalLM:
    """Load a causal LM from a Hub id or a local folder, frozen weights cast to ``dtype``."""
    from flax_lora.models import hf

    config = config if config is not None else hf.load_config(source)
    loader = REGISTRY.get(config.model_type, hf.load_hf)
    return loader(source, config, dtype=dtype)


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
