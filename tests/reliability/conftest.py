"""One persistent JAX compilation cache for the session: in-process runs and subprocesses share it."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    import jax

    cache = tmp_path_factory.mktemp("jax_cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache
