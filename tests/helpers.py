"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # the tiny models' vocabulary (conftest.tiny_models)


def copy_batch(n: int, half: int = 8, seed: int = 0):
    """A learnable batch: the second half of each row copies the first; targets are the copy."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, 2 * half))
    ids[:, half:] = ids[:, :half]
    loss_mask = np.zeros_like(ids)
    loss_mask[:, half:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(jax_cache=None, **extra) -> dict[str, str]:
    """The environment for a `lora`/python subprocess: the project importable, offline, the session's
    JAX cache when given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    if jax_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def host_devices_env(devices: int) -> dict[str, str]:
    """The environment for a subprocess that sees ``devices`` forced CPU devices and no cluster."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("LORA_COORDINATOR", "LORA_NUM_PROCESSES", "LORA_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


def run_config(model, data, output, **overrides):
    """A RunConfig as `lora train --model M --data D` builds it without an advice file (the advisor
    asked for this model and data), with ``overrides`` as flags; ``model``/``data`` None: the demo."""
    from flax_lora.training.config import advice_for, config_from_advice

    model, data = (None if x is None else str(x) for x in (model, data))
    advice, _ = advice_for(model, data)
    return config_from_advice(advice, model=model, data=data, output=str(output), overrides=overrides)
