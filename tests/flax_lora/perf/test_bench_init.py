"""flax_lora.perf.shapes: benchmark shapes and the fast random params (the exact tree ``load_decoder``
makes, filled per leaf); flax_lora.perf.throughput: the benchmark's step on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_lora.perf import shapes


def _tiny_config():
    return shapes.llama_config(shapes.PRESETS["tiny"], 32)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_random_params_match_load_llama_tree(scan, dtype):
    from flax_lora.models.decoder import DecoderLM, load_decoder

    cfg = _tiny_config()
    want = jax.eval_shape(lambda: load_decoder(cfg, dtype, dtype, scan=scan, remat=scan)[1])
    module = DecoderLM(cfg, dtype=dtype, param_dtype=dtype, scan=scan, remat=scan)
    got = shapes.random_params(module, seed=0, std=cfg.initializer_range)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), (_, w) in zip(flatten_dict(got).items(), flatten_dict(want).items()):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), path
    flat = flatten_dict(got)
    if scan:
        assert ("model", "layers", "stack", "self_attn", "q_proj", "kernel") in flat
    for path, v in flat.items():
        v = np.asarray(v, np.float32)
        if path[-1] == "weight":  # RMSNorm
            np.testing.assert_array_equal(v, 1.0)
        else:
            assert abs(v.mean()) < 0.1 * cfg.initializer_range, path
            assert abs(v.std() / cfg.initializer_range - 1) < 0.1, path


@pytest.mark.slow
def test_hashed_normal_is_normal_ish_deterministic_and_keyed():
    from flax_lora.models.decoder import DecoderLM

    normal = shapes.hashed_normal
    x = np.asarray(normal(jnp.uint32(1), jnp.uint32(2), (512, 1024), jnp.float32, 0.02))
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 0.02) < 2e-4
    assert 2.5 < ((x / x.std()) ** 4).mean() < 3.0  # kurtosis: a normal's is 3, a uniform's 1.8
    assert abs(np.corrcoef(x[:, 1:].ravel(), x[:, :-1].ravel())[0, 1]) < 0.01  # neighbours independent
    assert abs(np.corrcoef(x[1:].ravel(), x[:-1].ravel())[0, 1]) < 0.01
    np.testing.assert_array_equal(x, normal(jnp.uint32(1), jnp.uint32(2), (512, 1024), jnp.float32, 0.02))

    cfg = _tiny_config()
    module = DecoderLM(cfg, scan=True)
    p0, p0b, p1 = (flatten_dict(shapes.random_params(module, seed=s)) for s in (0, 0, 1))
    emb = ("model", "embed_tokens", "embedding")
    q, k = ("model", "layers", "stack", "self_attn", "q_proj", "kernel"), ("model", "layers", "stack", "self_attn", "k_proj", "kernel")
    np.testing.assert_array_equal(p0[emb], p0b[emb])
    assert not np.allclose(p0[emb], p1[emb])
    assert not np.allclose(p0[q][0], p0[q][1])  # layers differ
    assert not np.allclose(p0[q][..., : p0[k].shape[-1]], p0[k])  # leaves differ


@pytest.mark.parametrize("tied", [True, False])
def test_llama_params_counts_the_model(tied):
    from flax_lora.lora import count_params
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM

    shape = {**shapes.PRESETS["tiny"], "tied_embeddings": tied}
    module = DecoderLM(shapes.llama_config(shape, 32), scan=False)
    assert shapes.llama_params(shape) == count_params(param_shapes(module))


def test_target_linears_are_per_layer_for_a_scanned_module():
    from flax_lora.models.decoder import DecoderLM

    cfg = _tiny_config()
    got = shapes.target_linears(DecoderLM(cfg, scan=True), cfg, ["q_proj", "v_proj"], jnp.float32)
    assert sorted(got) == [f"model/layers/{i}/self_attn/{m}" for i in range(2) for m in ("q_proj", "v_proj")]


@pytest.mark.slow
def test_bench_step_runs_on_fast_params():
    from flax_lora.perf.throughput import run_jax

    res = run_jax(shapes.PRESETS["tiny"], batch=1, seq=16, accum=1, r=4, alpha=8.0, targets=["q_proj", "v_proj"],
                  precision="fp32", scan=True, remat=False, quantization="none", steps=1, warmup=0,
                  memory_analysis=True)
    assert res["init"] == "fast" and res["recompiles_after_first_step"] == 0
    assert res["xla_peak_gb"] > 0 and "generated_code_gb" in res
    # random tied weights of std 0.02: logits near 0, loss near log(vocab)
    assert abs(res["first_loss"] - np.log(shapes.PRESETS["tiny"]["vocab"])) < 0.5
