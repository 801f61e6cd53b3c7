"""Tiny random-init models of three families, built once per session (compiles are the cost).

Init std 0.2, not 0.02: with frozen random weights the (frozen) output embedding bounds how
far LoRA can move the logits, and 0.02 caps them near uniform.
"""

from __future__ import annotations


import numpy as np
import pytest


VOCAB = 64


def _configs():
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    return {
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2),
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }


@pytest.fixture(scope="session")
def tiny_models():
    from flax_lora.models import hf

    return {name: hf.from_config(cfg, seed=0, source=f"tiny-{name}") for name, cfg in _configs().items()}


@pytest.fixture(scope="session", params=["gpt2", "llama", "opt"])
def family(request):
    return request.param


def copy_batch(n: int, half: int = 8, seed: int = 0):
    """A learnable batch: the second half of each row copies the first; targets are the copy."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, 2 * half))
    ids[:, half:] = ids[:, :half]
    loss_mask = np.zeros_like(ids)
    loss_mask[:, half:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


@pytest.fixture(scope="session", autouse=True)
def _fast_backend(tmp_path_factory):
    """No Hub retries offline; compiled executables shared across the runs of a session."""
    import os

    import jax

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's model folder and data files (written once)."""
    from flax_lora.demo import materialize

    return materialize(tmp_path_factory.mktemp("demo"))
