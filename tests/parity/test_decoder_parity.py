"""Golden parity of the decoder port on every family's fixture: logits within 1e-5 of PyTorch's
(float32) and greedy generation identical, unrolled and (where every layer is alike) scanned."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.models.decoder import load_decoder

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.npz").is_file())
TOL = 1e-5


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    module, params, config = load_decoder(FIXTURES / request.param)
    return request.param, module, params, config, dict(np.load(FIXTURES / request.param / "golden.npz"))


def test_every_family_has_a_fixture():
    types = {json.loads((FIXTURES / n / "config.json").read_text())["model_type"] for n in NAMES}
    assert types == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2"}


def test_logits_match_pytorch(loaded):
    name, module, params, _, golden = loaded
    logits = module.apply({"params": params}, jnp.asarray(golden["input_ids"])).logits
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=TOL, rtol=0, err_msg=name)


def test_greedy_matches_pytorch(loaded):
    name, module, params, _, golden = loaded
    if "greedy" not in golden:
        pytest.skip("logits-only fixture")
    ids = golden["input_ids"]
    steps = golden["greedy"].shape[1] - ids.shape[1]
    buf = jnp.zeros((ids.shape[0], ids.shape[1] + steps), jnp.int32).at[:, :ids.shape[1]].set(ids)
    logits_fn = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    for i in range(ids.shape[1], ids.shape[1] + steps):
        buf = buf.at[:, i].set(logits_fn(params, buf)[:, i - 1].argmax(-1))
    np.testing.assert_array_equal(np.asarray(buf), golden["greedy"], err_msg=name)
