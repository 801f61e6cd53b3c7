"""Golden parity of the project's ports (the decoder port, GPT-2's) on every family's fixture: logits
within 1e-5 of PyTorch's (float32) and greedy generation identical, unrolled and (where every layer
is alike) scanned. The fixtures were made with transformers 4.57 and are read here with whichever
transformers is installed (4.57 or 5.x)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.models.decoder import load_decoder
from flax_lora.models.gpt2 import load_gpt2
from flax_lora.models.stacking import stack_layers, unstack_layers
from flax_lora.models.weights import read_checkpoint, torch_to_flax

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.npz").is_file())
TOL = 1e-5


def load_port(folder: Path, **kw):
    """(module, params, config) of a fixture on its port: GPT-2's, or the decoder port."""
    gpt2 = json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
    return (load_gpt2 if gpt2 else load_decoder)(folder, **kw)


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    module, params, config = load_port(FIXTURES / request.param)
    return request.param, module, params, config, dict(np.load(FIXTURES / request.param / "golden.npz"))


def test_every_family_has_a_fixture():
    from flax_lora.models.registry import PORT_TYPES

    types = {json.loads((FIXTURES / n / "config.json").read_text())["model_type"] for n in NAMES}
    assert types == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2",
                     "gpt2"} == set(PORT_TYPES)


def test_scanned_logits_match_pytorch(loaded):
    """The scanned port (``lora train`` loads it so) gives the unrolled one's logits, where every layer is alike."""
    name, _, _, config, golden = loaded
    module, params, _ = load_port(FIXTURES / name, scan=True)
    if not module.scan:
        pytest.skip("layers differ (windows or rope): never scanned")
    logits = module.apply({"params": params}, jnp.asarray(golden["input_ids"])).logits
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=TOL, rtol=0, err_msg=name)


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


@pytest.mark.slow
def test_remat_and_scan_give_same_logits():
    name = "llama_theta_gqa_headdim"
    g = dict(np.load(FIXTURES / name / "golden.npz"))
    ids = jnp.asarray(g["input_ids"])
    module, params, _ = load_decoder(FIXTURES / name)
    ref = module.apply({"params": params}, ids).logits
    for scan, remat in [(False, True), (True, False), (True, True)]:
        m, p, _ = load_decoder(FIXTURES / name, scan=scan, remat=remat)
        if scan:
            assert p["model"]["layers"]["stack"]["self_attn"]["q_proj"]["kernel"].shape[0] == 2
        out = m.apply({"params": p}, ids).logits
        np.testing.assert_allclose(out, ref, atol=1e-5)
        if scan and remat:  # and gradients flow through remat inside scan the same way
            g_ref = jax.grad(lambda pp: module.apply({"params": pp}, ids).logits.mean())(params)
            g_out = unstack_layers(jax.grad(lambda pp: m.apply({"params": pp}, ids).logits.mean())(p))
            for a, b in zip(jax.tree_util.tree_leaves(g_out), jax.tree_util.tree_leaves(g_ref)):
                np.testing.assert_allclose(a, b, atol=1e-6)


def test_stack_unstack_roundtrip_and_partial_lora():
    _, params, _ = load_decoder(FIXTURES / "mistral_window")
    back = unstack_layers(stack_layers(params))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    lora = {"model": {"layers": {"1": {"self_attn": {"q_proj": {"a": jnp.ones((32, 2)), "b": jnp.ones((2, 64))}}}}}}
    stacked = stack_layers(lora, num_layers=2, fill_missing=True)
    a = stacked["model"]["layers"]["stack"]["self_attn"]["q_proj"]["a"]
    assert a.shape == (2, 32, 2) and float(a[0].sum()) == 0.0 and float(a[1].sum()) == 64.0
    with pytest.raises(Exception, match="layer 0"):
        stack_layers(lora, num_layers=2)


def test_bf16_compute_close_to_fp32():
    name = "qwen2_bias_tied"
    g = dict(np.load(FIXTURES / name / "golden.npz"))
    module, params, _ = load_decoder(FIXTURES / name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    logits = module.apply({"params": params}, jnp.asarray(g["input_ids"])).logits
    assert logits.dtype == jnp.float32
    assert float(np.abs(np.asarray(logits) - g["logits"]).max()) < 0.05


def test_tied_checkpoint_has_no_lm_head_and_untied_does():
    _, tied, _ = load_decoder(FIXTURES / "qwen2_bias_tied")
    _, untied, _ = load_decoder(FIXTURES / "llama_theta_gqa_headdim")
    assert "lm_head" not in tied and "lm_head" in untied
    assert "bias" in tied["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert "bias" not in tied["model"]["layers"]["0"]["self_attn"]["o_proj"]


def test_shape_mismatch_names_the_tensor(tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM, load_config

    config = load_config(FIXTURES / "llama_theta_gqa_headdim")
    config.head_dim = 8  # what transformers' FlaxLlama assumes (hidden / heads)
    with pytest.raises(UserError, match=r"self_attn\.[kq]_proj\.weight has shape"):
        torch_to_flax(read_checkpoint(FIXTURES / "llama_theta_gqa_headdim"), param_shapes(DecoderLM(config)))


@pytest.mark.slow
def test_lora_under_remat_and_scan():
    """The LoRA interceptor reaches Dense layers inside nn.remat and nn.scan (stacked adapter)."""
    from flax_lora.lora import discover_linears, init_lora, lora_active, select_targets

    name = "llama_theta_gqa_headdim"
    ids = jnp.asarray(dict(np.load(FIXTURES / name / "golden.npz"))["input_ids"])
    module, params, _ = load_decoder(FIXTURES / name)
    linears = discover_linears(lambda p: module.apply({"params": p}, ids), params)
    lora = init_lora(select_targets(linears, ["q_proj", "down_proj"]), 4, jax.random.PRNGKey(0))
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # non-zero B

    def run(m, p, l):
        with lora_active(2.0):
            return m.apply({"params": p, "lora": l}, ids).logits

    ref = run(module, params, lora)
    assert float(jnp.abs(ref - module.apply({"params": params}, ids).logits).max()) > 1e-3
    m, p, _ = load_decoder(FIXTURES / name, scan=True, remat=True)
    np.testing.assert_allclose(run(m, p, stack_layers(lora, 2)), ref, atol=1e-5)
    g_ref = jax.grad(lambda l: run(module, params, l).mean())(lora)
    g_scan = unstack_layers(jax.grad(lambda l: run(m, p, l).mean())(stack_layers(lora, 2)))
    for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
