"""Frozen causal LMs behind one interface (:class:`CausalLM`), found by ``model_type``.

``base`` the interface, ``registry`` model_type -> loader, ``hub`` where checkpoints, configs
and tokenizers come from, ``weights`` safetensors without torch, ``stacking`` the scanned-layer
layout, ``decoder`` and ``gpt2`` the project's ports, ``rope`` their rotary embeddings, ``hf``
transformers' Flax classes for the legacy families (the ``flax-legacy`` extra: transformers < 5).
"""

from flax_lora.models.base import CausalLM
from flax_lora.models.registry import load_config, load_model, load_tokenizer

__all__ = ["CausalLM", "load_config", "load_model", "load_tokenizer"]
