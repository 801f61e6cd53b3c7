"""Data parallel pieces that need no devices: the multi-host configuration and the FSDP split rule
(the training runs over devices and processes are in tests/scale)."""

from __future__ import annotations

import pytest


def test_partial_multihost_config_is_a_user_error(monkeypatch):
    from flax_lora.errors import UserError
    from flax_lora.training.parallel import init_distributed

    monkeypatch.setenv("LORA_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("LORA_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("LORA_PROCESS_ID", raising=False)
    with pytest.raises(UserError, match="process count"):
        init_distributed()


def test_fsdp_splits_the_largest_divisible_dim_not_the_layer_axis():
    from flax_lora.training.parallel import _fsdp_spec

    assert tuple(_fsdp_spec((30, 576, 1536), 4, stacked=True)) == (None, None, "data")
    assert tuple(_fsdp_spec((49152, 576), 4, stacked=False)) == ("data", None)
    assert tuple(_fsdp_spec((7,), 4, stacked=False)) == ()
    assert tuple(_fsdp_spec((8, 3), 4, stacked=True)) == ()


def test_kernels_split_along_their_output_axis_when_it_divides():
    from flax_lora.training.parallel import _fsdp_spec, _preferred_axis

    kernel = ("model", "layers", "stack", "mlp", "down_proj", "kernel")
    assert _preferred_axis(kernel, 3) == 2 and _preferred_axis(kernel[:-1] + ("kernel_absmax",), 3) == 2
    assert _preferred_axis(("model", "embed_tokens", "embedding"), 2) == 0
    assert _preferred_axis(("model", "layers", "stack", "input_layernorm", "weight"), 2) == 1
    # down_proj [L, 2816, 1024]: the output axis (torch rows), not the larger input axis
    assert tuple(_fsdp_spec((8, 2816, 1024), 4, stacked=True, prefer=2)) == (None, None, "data")
    # an output axis the count does not divide: the largest one it does; none: whole
    assert tuple(_fsdp_spec((96, 32), 3, stacked=False, prefer=1)) == ("data", None)
    assert tuple(_fsdp_spec((32, 32), 3, stacked=False, prefer=1)) == ()


def test_the_frozen_plan_on_one_device_and_the_simulated_device_size(monkeypatch):
    import jax
    import jax.numpy as jnp

    from flax_lora.errors import UserError
    from flax_lora.training.parallel import FrozenPlan, device_bytes_limit

    params = {"a": {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
    plan = FrozenPlan(shard=True, quantization="int8")
    plan.decide(params)
    assert plan.decided and plan.dp is None and not plan.auto  # one device: plain arrays, nothing to split
    assert plan.frozen_bytes == 64 * 32 + 32 * 4  # priced in int8 (+ a float32 scale per output) before loading
    assert plan.sharding_for(("a", "kernel"), (64, 32)) is None and plan.notes(params) == []
    monkeypatch.setenv("LORA_DEVICE_MEMORY_GB", "0.5")
    assert device_bytes_limit() == 2**29
    monkeypatch.setenv("LORA_DEVICE_MEMORY_GB", "lots")
    with pytest.raises(UserError, match="expected a number of GiB"):
        device_bytes_limit()
