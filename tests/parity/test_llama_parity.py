"""Golden parity: our Flax Llama family vs PyTorch transformers logits stored in fixtures/ (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.models.llama import hf_wrapper, load_llama
from flax_lora.models.stacking import stack_layers, unstack_layers
from flax_lora.models.weights import read_checkpoint, torch_to_flax

FIXTURES = Path(__file__).parent / "fixtures"
ALL = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.npz").is_file())
MODEL_TYPE = {n: json.loads((FIXTURES / n / "config.json").read_text())["model_type"] for n in ALL}
NAMES = [n for n in ALL if MODEL_TYPE[n] in ("llama", "mistral", "qwen2")]  # the Llama-family port's
TOL = 1e-4


def _golden(name):
    return dict(np.load(FIXTURES / name / "golden.npz"))


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    module, params, config = load_llama(FIXTURES / request.param)
    return request.param, module, params, config


def _greedy(module, params, ids, steps):
    """Greedy decoding by full recomputation (independent of the KV-cache path).

    One fixed-length buffer: causal attention makes the not-yet-written tail irrelevant.
    """
    t = ids.shape[1]
    buf = jnp.zeros((ids.shape[0], t + steps), jnp.int32).at[:, :t].set(ids)
    logits_fn = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    for i in range(t, t + steps):
        buf = buf.at[:, i].set(logits_fn(params, buf)[:, i - 1].argmax(-1))
    return np.asarray(buf)


def test_fixtures_exist():
    assert len(NAMES) >= 6
    assert {MODEL_TYPE[n] for n in NAMES} == {"llama", "mistral", "qwen2"}
    # golden fixtures of the newer families (issue 12; their ports are tested as they land)
    assert {"qwen3", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2"} <= set(MODEL_TYPE.values())


def test_logits_match_pytorch(loaded):
    name, module, params, _ = loaded
    g = _golden(name)
    logits = np.asarray(module.apply({"params": params}, jnp.asarray(g["input_ids"])).logits)
    assert logits.dtype == np.float32 and logits.shape == g["logits"].shape
    diff = float(np.abs(logits - g["logits"]).max())
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff < TOL


def test_greedy_matches_pytorch(loaded):
    name, module, params, _ = loaded
    g = _golden(name)
    if "greedy" not in g:
        pytest.skip("logits-only fixture")
    steps = g["greedy"].shape[1] - g["input_ids"].shape[1]
    np.testing.assert_array_equal(_greedy(module, params, jnp.asarray(g["input_ids"]), steps), g["greedy"])


@pytest.mark.parametrize("name", ["qwen2_bias_tied", "mistral_window"])
def test_cached_generate_matches_pytorch(name):
    """transformers' FlaxGenerationMixin.generate over our module (KV cache, sliding window)."""
    module, params, _ = load_llama(FIXTURES / name)
    g = _golden(name)
    ids = jnp.asarray(g["input_ids"])
    model = hf_wrapper(module)
    eos = next(i for i in range(module.config.vocab_size) if i not in g["greedy"])  # never emitted
    out = model.generate(ids, params=params, max_new_tokens=g["greedy"].shape[1] - ids.shape[1],
                         do_sample=False, pad_token_id=0, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(out.sequences), g["greedy"])


@pytest.mark.slow
def test_remat_and_scan_give_same_logits():
    name = "llama_theta_gqa_headdim"
    g = _golden(name)
    ids = jnp.asarray(g["input_ids"])
    module, params, _ = load_llama(FIXTURES / name)
    ref = module.apply({"params": params}, ids).logits
    for scan, remat in [(False, True), (True, False), (True, True)]:
        m, p, _ = load_llama(FIXTURES / name, scan=scan, remat=remat)
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
    _, params, _ = load_llama(FIXTURES / "mistral_window")
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
    g = _golden(name)
    module, params, _ = load_llama(FIXTURES / name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    logits = module.apply({"params": params}, jnp.asarray(g["input_ids"])).logits
    assert logits.dtype == jnp.float32
    assert float(np.abs(np.asarray(logits) - g["logits"]).max()) < 0.05


def test_tied_checkpoint_has_no_lm_head_and_untied_does():
    _, tied, _ = load_llama(FIXTURES / "qwen2_bias_tied")
    _, untied, _ = load_llama(FIXTURES / "llama_theta_gqa_headdim")
    assert "lm_head" not in tied and "lm_head" in untied
    assert "bias" in tied["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert "bias" not in tied["model"]["layers"]["0"]["self_attn"]["o_proj"]


def test_shape_mismatch_names_the_tensor(tmp_path):
    from flax_lora.errors import UserError
    from flax_lora.models.base import param_shapes
    from flax_lora.models.llama import LlamaForCausalLM, load_config

    config = load_config(FIXTURES / "llama_theta_gqa_headdim")
    config.head_dim = 8  # what transformers' FlaxLlama assumes (hidden / heads)
    with pytest.raises(UserError, match=r"self_attn\.[kq]_proj\.weight has shape"):
        torch_to_flax(read_checkpoint(FIXTURES / "llama_theta_gqa_headdim"), param_shapes(LlamaForCausalLM(config)))


def test_lora_under_remat_and_scan():
    """The LoRA interceptor reaches Dense layers inside nn.remat and nn.scan (stacked adapter)."""
    from flax_lora.lora import discover_linears, init_lora, lora_active, select_targets

    name = "llama_theta_gqa_headdim"
    ids = jnp.asarray(_golden(name)["input_ids"])
    module, params, _ = load_llama(FIXTURES / name)
    linears = discover_linears(lambda p: module.apply({"params": p}, ids), params)
    lora = init_lora(select_targets(linears, ["q_proj", "down_proj"]), 4, jax.random.PRNGKey(0))
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # non-zero B

    def run(m, p, l):
        with lora_active(2.0):
            return m.apply({"params": p, "lora": l}, ids).logits

    ref = run(module, params, lora)
    assert float(jnp.abs(ref - module.apply({"params": params}, ids).logits).max()) > 1e-3
    m, p, _ = load_llama(FIXTURES / name, scan=True, remat=True)
    np.testing.assert_allclose(run(m, p, stack_layers(lora, 2)), ref, atol=1e-5)
    g_ref = jax.grad(lambda l: run(module, params, l).mean())(lora)
    g_scan = unstack_layers(jax.grad(lambda l: run(m, p, l).mean())(stack_layers(lora, 2)))
    for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
