"""Session fixtures shared by every suite: offline hubs, one JAX compilation cache (in-process
runs and subprocesses share it), tiny random-init models of three families, the demo's files;
tests marked ``legacy`` (transformers' Flax classes) skip where transformers 5 is installed.

Init std 0.2, not 0.02: with frozen random weights the (frozen) output embedding bounds how
far LoRA can move the logits, and 0.02 caps them near uniform.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import TEST_XLA_FLAGS, VOCAB

if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # before any test starts JAX's CPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def _configs():
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    return {
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2),
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }


class _Built(dict):
    """Each tiny model built on first use (OPT only where the legacy extra is installed)."""

    def __missing__(self, name):
        from flax_lora.models.registry import from_config

        self[name] = from_config(_configs()[name], seed=0, source=f"tiny-{name}")
        return self[name]


@pytest.fixture(scope="session")
def tiny_models(jax_cache):
    """GPT-2 and Llama on the project's ports, OPT on transformers' Flax class (legacy)."""
    return _Built()


@pytest.fixture(scope="session", params=["gpt2", "llama", pytest.param("opt", marks=pytest.mark.legacy)])
def family(request):
    return request.param


def legacy_available() -> bool:
    """Whether transformers' Flax classes can be there (transformers < 5: the flax-legacy extra)."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0]) < 5


def pytest_collection_modifyitems(config, items):
    """Tests marked ``legacy`` need transformers' Flax classes: skipped with transformers 5."""
    if legacy_available():
        return
    skip = pytest.mark.skip(reason='transformers 5 has no Flax classes (legacy path: pip install "lora[flax-legacy]")')
    for item in items:
        if "legacy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """No Hub retries: tests never reach the network. CPU runs train in fp32 whatever the CPU
    (``lora train`` would pick bf16 on CPUs with bf16 dots): results do not depend on the machine."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("LORA_CPU_PRECISION", "fp32")


@pytest.fixture(scope="session", autouse=True)
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for the session (subprocesses get it through the environment)."""
    import jax

    cache = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory, jax_cache):
    """The demo's model folder and data files (written once)."""
    from flax_lora.demo import materialize

    return materialize(tmp_path_factory.mktemp("demo"))
