"""The one interface every model family implements: a frozen causal LM and how to call it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.models.stacking import stack_layers, unstack_layers

PACKED_KEYS = ("segment_ids", "position_ids")  # what a packed batch adds (flax_lora.data.batch.collate_packed)


def packed_inputs(batch) -> dict:
    """The packed batch's ``segment_ids`` and ``position_ids`` as int32 (empty for an unpacked batch)."""
    return {k: batch[k].astype(jnp.int32) for k in PACKED_KEYS if k in batch}


def param_shapes(module) -> dict:
    """Abstract params tree (``jax.ShapeDtypeStruct`` leaves) of a flax ``module`` -- nothing computed."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]


@dataclass
class CausalLM:
    """A frozen causal LM: a Flax module, its params, and how to call it.

    ``logits(variables, input_ids, attention_mask)`` hides each family's call signature:
    position ids are derived from the mask (right padding), families without them (BLOOM)
    get none. ``variables`` is ``{"params": ..., "lora": ...}``; run it inside
    ``flax_lora.lora.lora_active`` for the adapter to take effect.

    Packed rows (several examples per row, ``lora train --packing``) need a module whose call
    takes ``segment_ids`` (the Llama-family port); transformers' Flax classes take only a
    [B, T] padding mask, so they cannot keep one example's attention off another's.
    """

    module: Any  # flax.linen.Module
    params: Any  # frozen weights, in the compute dtype
    config: Any  # transformers PretrainedConfig
    model_type: str
    source: str  # Hub id or local folder (or "demo")
    dtype: Any = jnp.float32  # compute dtype of the frozen weights and matmuls
    layers_stacked: bool = False  # params (and adapters) hold the decoder layers stacked [L, ...] (scan)
    linear_shapes: Any = None  # abstract float params to find the linears on (params quantized while loading)
    takes_position_ids: bool = field(init=False)
    takes_segment_ids: bool = field(init=False)  # can train packed rows (attention confined per example)

    def __post_init__(self):
        params = inspect.signature(type(self.module).__call__).parameters
        self.takes_position_ids = "position_ids" in params
        self.takes_segment_ids = "segment_ids" in params

    def check_packing(self, packing: bool) -> bool:
        """``packing``, or a one-line UserError when it is asked for and this family cannot do it."""
        if packing and not self.takes_segment_ids:
            raise UserError(f"--packing needs a family on the project's decoder port; {self.model_type} runs "
                            "on transformers' Flax class, which cannot confine attention to each packed example")
        return packing

    def logits(self, variables, input_ids, attention_mask, *, rngs=None, segment_ids=None,
               position_ids=None) -> jax.Array:
        """Logits [B, T, V] (the model's dtype) for right-padded ``input_ids`` [B, T].

        Packed rows: ``segment_ids`` [B, T] (1, 2, ... per example, 0 on padding) confine
        attention to each example, ``position_ids`` restart at 0 for each (both from
        :func:`packed_inputs`).
        """
        kwargs = {}
        if segment_ids is not None:
            self.check_packing(True)
            kwargs["segment_ids"] = segment_ids.astype(jnp.int32)
        if position_ids is not None and self.takes_position_ids:
            kwargs["position_ids"] = position_ids.astype(jnp.int32)
        elif self.takes_position_ids:
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
            flat = CausalLM(self.module.clone(scan=False, remat=False), None, self.config, self.model_type,
                            self.source, self.dtype)
            return discover_linears(lambda p: flat.logits({"params": p}, ids, jnp.ones_like(ids)),
                                    param_shapes(flat.module))
        shapes = self.params if self.linear_shapes is None else self.linear_shapes
        return discover_linears(lambda p: self.logits({"params": p}, ids, jnp.ones_like(ids)), shapes)

    def stack_lora(self, lora):
        """A per-layer adapter tree in this model's layout (stacked [L, ...] when the layers scan).

        A layer without an adapter gets zeros: an exact zero delta that stays zero in training
        (its gradients are zero), dropped again by :meth:`unstack_lora`'s ``keep``.
        """
        if not self.layers_stacked or not lora:
            return lora
        return stack_layers(lora, self.config.num_hidden_layers, fill_missing=True)

    def unstack_lora(self, lora, keep=None):
        """The per-layer adapter tree of ``lora`` (this model's layout), only the ``keep`` modules if given."""
        if self.layers_stacked:
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


