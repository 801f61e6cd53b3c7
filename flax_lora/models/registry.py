"""model_type -> loader: which implementation loads a checkpoint.

The project's own ports serve the families they cover (:mod:`flax_lora.models.decoder`: the Llama
family, Gemma 1/2/3, Qwen, Phi-3, SmolLM3, OLMo 2; :mod:`flax_lora.models.gpt2`); OPT, GPT-Neo,
GPT-J and BLOOM run on transformers' Flax classes (:mod:`flax_lora.models.hf`), which only
transformers < 5 has: the ``flax-legacy`` extra. Every loader returns a
:class:`~flax_lora.models.base.CausalLM`. To add a family: write its port (or a ``Family`` entry),
then list its ``model_type`` values here.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax.numpy as jnp

from flax_lora.errors import UserError
from flax_lora.models import decoder, gpt2, hf, hub
from flax_lora.models.base import CausalLM

# model_type -> loader(source, config, *, dtype[, scan, remat]) -> CausalLM
REGISTRY: dict[str, Callable[..., CausalLM]] = {
    **{t: hf.load_hf for t in hf.SUPPORTED},
    **{t: decoder.load_causal_lm for t in decoder.MODEL_TYPES},
    **{t: gpt2.load_causal_lm for t in gpt2.MODEL_TYPES},
}
PORT_TYPES = decoder.MODEL_TYPES + gpt2.MODEL_TYPES  # the families on the project's own code
# model_type -> random-init CausalLM (tests, the demo, benchmarks)
FROM_CONFIG: dict[str, Callable[..., CausalLM]] = {
    **{t: hf.from_config for t in hf.SUPPORTED},
    **{t: decoder.causal_lm_from_config for t in decoder.MODEL_TYPES},
    **{t: gpt2.causal_lm_from_config for t in gpt2.MODEL_TYPES},
}


def load_model(source: str, *, dtype=jnp.float32, config=None, scan: bool = False, remat: bool = False,
               placement=None) -> CausalLM:
    """Load a causal LM from a Hub id or a local folder, frozen weights cast to ``dtype``.

    ``scan``: run the decoder layers as one scanned layer (one layer to compile, not L) where
    the family's loader can (the ports); elsewhere it is ignored (``layers_stacked`` says
    which). ``remat``: recompute each layer's activations in the backward pass (gradient
    checkpointing); a family without it is a UserError. ``placement``
    (:class:`flax_lora.training.parallel.FrozenPlan`): where the frozen leaves are made and in what
    format, for a loader that reads by leaves (the decoder port); any other loader ignores it and
    ``placement.decided`` stays False (the caller places the whole params afterwards).
    """
    config = config if config is not None else load_config(source)
    loader = REGISTRY.get(config.model_type, hf.load_hf)
    takes = inspect.signature(loader).parameters
    kwargs = {}
    if "scan" in takes:
        kwargs["scan"] = scan
    if remat:
        if "remat" not in takes:
            raise UserError(f"gradient checkpointing (--remat) is not available for model type {config.model_type!r} "
                            f"(transformers' Flax class has none); it is for {', '.join(PORT_TYPES)}")
        kwargs["remat"] = True
    if placement is not None and "placement" in takes:
        kwargs["placement"] = placement
    return loader(source, config, dtype=dtype, **kwargs)


def from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config") -> CausalLM:
    """A random-initialised :class:`CausalLM` of ``config``'s family, on its port where it has one."""
    return FROM_CONFIG.get(config.model_type, hf.from_config)(config, dtype=dtype, seed=seed, source=source)


def load_config(source: str):
    """The transformers config of a model folder or Hub id (remote code refused)."""
    return hub.load_config(source, supported=tuple(REGISTRY))


def load_tokenizer(source: str):
    """The model's tokenizer, with a pad token (remote code refused)."""
    return hub.load_tokenizer(source, supported=tuple(REGISTRY))


