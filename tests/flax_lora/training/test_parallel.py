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
