"""Sampling inside the jitted decoders (``sample=True``): temperature 0 and a tiny top-p give the
greedy tokens, a seed reproduces its tokens (and the cached and uncached paths draw alike, step by
step with the same keys), different seeds at a high temperature differ, the nucleus keeps the
likeliest tokens holding top-p; generation stops at any of several stop tokens."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lora.evaluation.evaluator import Evaluator
from flax_lora.evaluation.generate import Sampling, make_greedy, make_greedy_cached, sample_next
from flax_lora.lora import LoraConfig

VOCAB = 64
NEW = 8
LENGTHS = np.array([3, 9, 5], np.int32)
LORA_CFG = LoraConfig(r=4, alpha=8.0)
MAKERS = {"uncached": make_greedy, "cached": make_greedy_cached}
pick = jax.jit(sample_next)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig

    from flax_lora.models import decoder as llama

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
    return llama.causal_lm_from_config(cfg)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    buf = np.zeros((len(LENGTHS), 12 + NEW), np.int32)
    for i, n in enumerate(LENGTHS):
        buf[i, :n] = rng.integers(3, VOCAB, n)
    return buf, LENGTHS


@pytest.fixture(scope="module")
def decoders(tiny):
    """Each path's greedy and sampling decoder, compiled once for the module."""
    return {name: (make(tiny, LORA_CFG, NEW, None), make(tiny, LORA_CFG, NEW, None, sample=True))
            for name, make in MAKERS.items()}


def _run(tiny, gen, batch, sampling=None):
    how = sampling.args() if sampling is not None else ()
    return tuple(np.asarray(x) for x in jax.device_get(gen(tiny.params, {}, *batch, *how)))


def test_sample_next_limits():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    best = np.argmax(logits, axis=-1)
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(pick(logits, key, 0.0, 1.0), best)  # temperature 0: argmax
        np.testing.assert_array_equal(pick(logits, key, 5.0, 1e-6), best)  # tiny nucleus: the top token
    draws = pick(jnp.zeros((256, 50)), jax.random.PRNGKey(1), 1.0, 1.0)
    assert len(np.unique(draws)) > 25  # a flat distribution is sampled across the vocabulary


def test_top_p_keeps_the_nucleus_and_its_proportions():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 4))
    key = jax.random.PRNGKey(7)
    assert set(np.unique(pick(logits, key, 1.0, 0.7)).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(np.unique(pick(logits, key, 1.0, 0.85)).tolist()) == {0, 1, 2}
    counts = np.bincount(np.asarray(pick(logits, key, 1.0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(MAKERS))
def test_temperature_zero_and_tiny_top_p_are_greedy(tiny, batch, decoders, path):
    greedy, sampler = decoders[path]
    want = _run(tiny, greedy, batch)
    for sampling in (Sampling(0.0, 1.0, 3), Sampling(1.0, 1e-6, 3)):
        got = _run(tiny, sampler, batch, sampling)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"{path}: {sampling}")


@pytest.mark.slow
def test_seeds_reproduce_and_differ_and_both_paths_draw_alike(tiny, batch, decoders):
    hot = {seed: Sampling(3.0, 1.0, seed) for seed in (0, 1)}
    runs = {(path, seed): _run(tiny, decoders[path][1], batch, s) for path in MAKERS for seed, s in hot.items()}
    for key, (buf, lengths) in runs.items():
        again = _run(tiny, decoders[key[0]][1], batch, hot[key[1]])
        np.testing.assert_array_equal(again[0], buf, err_msg=f"{key}: same seed, other tokens")
        assert (lengths == LENGTHS + NEW).all()  # no stop tokens: every row runs all steps
    assert not np.array_equal(runs["uncached", 0][0], runs["uncached", 1][0])  # hot: seeds differ somewhere
    greedy = _run(tiny, decoders["uncached"][0], batch)[0]
    assert not np.array_equal(runs["uncached", 0][0], greedy)
    for seed in hot:  # step k draws with fold_in(key, k) on both paths
        np.testing.assert_array_equal(runs["cached", seed][0], runs["uncached", seed][0])


@pytest.mark.slow
@pytest.mark.parametrize("path", list(MAKERS))
def test_any_of_several_stop_ids_ends_a_row(tiny, batch, decoders, path):
    buf, lengths = _run(tiny, decoders[path][0], batch)
    gens = [buf[i, LENGTHS[i]:lengths[i]].tolist() for i in range(len(LENGTHS))]
    stops = (gens[0][2], gens[1][4])  # row 0 ends at its 3rd token (or before), row 1 by its 5th
    got_buf, got_len = _run(tiny, MAKERS[path](tiny, LORA_CFG, NEW, stops), batch)
    for i, gen in enumerate(gens):
        first = next((j for j, t in enumerate(gen) if t in stops), None)
        want = NEW if first is None else first + 1
        assert got_len[i] == LENGTHS[i] + want, (path, i, gen, stops)
        np.testing.assert_array_equal(got_buf[i, :got_len[i]], buf[i, :got_len[i]])
    assert got_len[0] <= LENGTHS[0] + 3 and got_len[1] <= LENGTHS[1] + 5


@pytest.mark.slow
def test_evaluator_samples_per_batch_and_cuts_at_its_stop_ids(tiny, batch):
    tok = SimpleNamespace(pad_id=0, eos_id=None)
    prompts = [batch[0][i, :n] for i, n in enumerate(LENGTHS)]
    ev = Evaluator(tiny, LORA_CFG, tok, [], max_length=12, batch_size=2, max_new_tokens=NEW)
    greedy = ev.generate({}, tiny.params, prompts)
    assert ev.generate({}, tiny.params, prompts, Sampling(0.0, 0.5, 9)) == greedy  # temperature 0: the greedy decoder
    assert list(ev._gen) == [(NEW, True)]
    hot = ev.generate({}, tiny.params, prompts, Sampling(3.0, 1.0, 9))
    assert hot == ev.generate({}, tiny.params, prompts, Sampling(3.0, 1.0, 9)) and hot != greedy
    assert list(ev._gen) == [(NEW, True), (NEW, True, "sample")]  # one compile for every setting and batch
    stop = greedy[0][2]
    cut = Evaluator(tiny, LORA_CFG, tok, [], max_length=12, batch_size=2, max_new_tokens=NEW, stop_ids=[stop])
    out = cut.generate({}, tiny.params, prompts)
    assert out[0] == greedy[0][:greedy[0].index(stop)] and all(stop not in o for o in out)
