"""benchmarks/bench.py's fast random params: the exact tree ``load_llama`` makes, filled per leaf."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench  # noqa: E402


def _tiny_config():
    return bench.llama_config(bench.PRESETS["tiny"], 32)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_random_params_match_load_llama_tree(scan, dtype):
    from flax_lora.models.llama import LlamaForCausalLM, load_llama

    cfg = _tiny_config()
    want = jax.eval_shape(lambda: load_llama(cfg, dtype, dtype, scan=scan, remat=scan)[1])
    module = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype, scan=scan, remat=scan)
    got = bench.random_params(module, seed=0, std=cfg.initializer_range)
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


def test_hashed_normal_is_normal_ish_deterministic_and_keyed():
    from flax_lora.models.llama import LlamaForCausalLM

    normal = bench._hashed_normal_fn()
    x = np.asarray(normal(jnp.uint32(1), jnp.uint32(2), (512, 1024), jnp.float32, 0.02))
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 0.02) < 2e-4
    assert 2.5 < ((x / x.std()) ** 4).mean() < 3.0  # kurtosis: a normal's is 3, a uniform's 1.8
    assert abs(np.corrcoef(x[:, 1:].ravel(), x[:, :-1].ravel())[0, 1]) < 0.01  # neighbours independent
    assert abs(np.corrcoef(x[1:].ravel(), x[:-1].ravel())[0, 1]) < 0.01
    np.testing.assert_array_equal(x, normal(jnp.uint32(1), jnp.uint32(2), (512, 1024), jnp.float32, 0.02))

    cfg = _tiny_config()
    module = LlamaForCausalLM(cfg, scan=True)
    p0, p0b, p1 = (flatten_dict(bench.random_params(module, seed=s)) for s in (0, 0, 1))
    emb = ("model", "embed_tokens", "embedding")
    q, k = ("model", "layers", "stack", "self_attn", "q_proj", "kernel"), ("model", "layers", "stack", "self_attn", "k_proj", "kernel")
    np.testing.assert_array_equal(p0[emb], p0b[emb])
    assert not np.allclose(p0[emb], p1[emb])
    assert not np.allclose(p0[q][0], p0[q][1])  # layers differ
    assert not np.allclose(p0[q][..., : p0[k].shape[-1]], p0[k])  # leaves differ


def test_bench_step_runs_on_fast_params():
    res = bench.run_jax(bench.PRESETS["tiny"], batch=1, seq=16, accum=1, r=4, alpha=8.0, targets=["q_proj", "v_proj"],
                        precision="fp32", scan=True, remat=False, quantization="none", steps=1, warmup=0,
                        memory_analysis=False)
    assert res["init"] == "fast" and res["recompiles_after_first_step"] == 0
    # random tied weights of std 0.02: logits near 0, loss near log(vocab)
    assert abs(res["first_loss"] - np.log(bench.PRESETS["tiny"]["vocab"])) < 0.5
