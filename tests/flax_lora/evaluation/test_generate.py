"""KV-cached greedy decoding (``make_greedy_cached``) gives exactly the tokens of the uncached
decoder (``make_greedy``), for the ports (Llama, GPT-2, Gemma: layer loop, ``nn.scan``, sliding
window) and transformers' Flax families (legacy), with an adapter that changes the output, prompts of different
lengths in one batch, and an eos that stops some rows early; ``Evaluator.generate`` uses it
where the model supports it and falls back where it does not."""

from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.evaluation.evaluator import Evaluator
from flax_lora.evaluation.generate import kv_cache_support, make_greedy, make_greedy_cached
from flax_lora.lora import LoraConfig, init_lora

VOCAB = 64
NEW = 10
PROMPT = 16  # prompt block of the buffer: [B, PROMPT + NEW]
LENGTHS = np.array([3, 16, 7, 1, 11, 5], np.int32)
LORA_CFG = LoraConfig(r=4, alpha=8.0)


def _llama_base():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)


def _build(name):
    from transformers import LlamaConfig, MistralConfig

    from flax_lora.models import CausalLM
    from flax_lora.models.registry import from_config
    from flax_lora.models.stacking import stack_layers

    if name in ("llama", "llama-scan", "mistral-window"):
        cfg = MistralConfig(**_llama_base(), sliding_window=5) if name == "mistral-window" else LlamaConfig(**_llama_base())
    else:
        cfg = _legacy_or_gpt2_config(name.removesuffix("-scan"))
    m = from_config(cfg)
    if name.endswith("-scan"):
        module = m.module.clone(scan=True)
        return CausalLM(module, stack_layers(m.params, cfg.num_hidden_layers), cfg, cfg.model_type, "tiny"), m
    return m, m


def _legacy_or_gpt2_config(name):
    from transformers import BloomConfig, GemmaConfig, GPT2Config, GPTJConfig, GPTNeoConfig, OPTConfig

    return {
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, initializer_range=0.2),
        "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                                 max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.2),
        "bloom": lambda: BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=VOCAB, initializer_range=0.2),
        "gpt_neo": lambda: GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                        attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=64,
                                        initializer_range=0.2),
        "gptj": lambda: GPTJConfig(n_layer=2, n_embd=32, n_head=2, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                   initializer_range=0.2),
        "gemma": lambda: GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=16, intermediate_size=64, vocab_size=VOCAB, initializer_range=0.2,
                                     hidden_activation="gelu_pytorch_tanh"),
    }[name]()


def _adapter(flat_model, model):
    """An adapter on every linear but lm_head with B != 0 (so it changes the output); stacked for scan."""
    targets = {p: i for p, i in flat_model.linears().items() if not p.endswith("lm_head")}
    tree = flatten_dict(init_lora(targets, LORA_CFG.r, jax.random.PRNGKey(1)))
    keys = jax.random.split(jax.random.PRNGKey(2), len(tree))
    tree = {k: (0.3 * jax.random.normal(key, v.shape) if k[-1] == "b" else v) for key, (k, v) in zip(keys, sorted(tree.items()))}
    lora = unflatten_dict(tree)
    if model.module is not flat_model.module and getattr(model.module, "scan", False):
        from flax_lora.models.stacking import stack_layers

        lora = stack_layers(lora, model.config.num_hidden_layers)
    return lora


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).astype(np.int32) for n in LENGTHS]


def _buffer(prompts, width):
    buf = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    return buf, np.asarray([len(p) for p in prompts], np.int32)


def _pick_eos(res, lens):
    """A token some rows generate before their last step and others never do (so some stop early)."""
    gens = [res[i, lens[i]:lens[i] + NEW - 1].tolist() for i in range(len(lens))]
    counts = np.bincount(np.concatenate([np.unique(g) for g in gens]), minlength=VOCAB)
    for tok in np.argsort(-counts, kind="stable"):
        if 0 < counts[tok] < len(lens):
            return int(tok)
    raise AssertionError(f"no token stops only some rows: {gens}")


LEGACY = ("opt", "bloom", "gpt_neo", "gptj")  # transformers' Flax classes (the flax-legacy extra)
FAMILIES = ["llama", "llama-scan", "mistral-window", "gpt2", "gpt2-scan", "gemma", *LEGACY]
CHUNKED = ("llama-scan", "mistral-window", "gpt2", "bloom")  # chunked prefill: the ports and HF's cache style


FAST = ("llama", "gpt2", "opt")  # the two ports and transformers' cache; the other families run with -m slow


def _marks(name):
    return [m for m, on in ((pytest.mark.slow, name not in FAST), (pytest.mark.legacy, name in LEGACY)) if on]


@pytest.fixture(scope="module", params=[pytest.param(f, marks=_marks(f)) for f in FAMILIES])
def case(request):
    model, flat = _build(request.param)
    return request.param, model, _adapter(flat, model)


def test_cached_greedy_matches_uncached(case):
    name, model, lora = case
    assert kv_cache_support(model) is None, name
    buf, lens = _buffer(_prompts(), PROMPT + NEW)

    free = make_greedy(model, LORA_CFG, NEW, None)
    ref, ref_len = jax.device_get(free(model.params, lora, buf, lens))
    assert (ref_len == lens + NEW).all()

    # the adapter matters: without it (B = 0) the continuation is different
    no_adapter = jax.tree_util.tree_map(jnp.zeros_like, lora)
    base, _ = jax.device_get(free(model.params, no_adapter, buf, lens))
    assert not np.array_equal(base, ref), f"{name}: adapter does not change the greedy output"

    eos = _pick_eos(ref, lens)  # some rows stop early, some run all NEW steps
    want, want_len = jax.device_get(make_greedy(model, LORA_CFG, NEW, eos)(model.params, lora, buf, lens))
    assert (want_len < lens + NEW).any() and (want_len == lens + NEW).any(), (want_len, lens)
    got, got_len = jax.device_get(make_greedy_cached(model, LORA_CFG, NEW, eos)(model.params, lora, buf, lens))
    np.testing.assert_array_equal(got_len, want_len, err_msg=name)
    np.testing.assert_array_equal(got, want, err_msg=name)
    if name not in CHUNKED:
        return
    # the prompt block prefilled in 4 chunks of 4 (long prompts on a GPU): the same tokens
    chunked = make_greedy_cached(model, LORA_CFG, NEW, eos, prefill_chunk=4)
    got, got_len = jax.device_get(chunked(model.params, lora, buf, lens))
    np.testing.assert_array_equal(got_len, want_len, err_msg=f"{name}, chunked prefill")
    np.testing.assert_array_equal(got, want, err_msg=f"{name}, chunked prefill")
    for i, n in enumerate(want_len):  # a row stops right after its first eos
        gen = want[i, lens[i]:n].tolist()
        assert eos not in gen[:-1] and (gen[-1] == eos or n == lens[i] + NEW)


class _Tok(SimpleNamespace):
    pad_id: int = 0
    eos_id: int | None = None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_evaluator_generate_same_with_and_without_cache(name):
    model, flat = _build(name)
    lora = _adapter(flat, model)
    prompts = _prompts(seed=1)[:5]  # 5 prompts, batch 4: the last chunk is padded with copies
    ref_ev = Evaluator(model, LORA_CFG, _Tok(pad_id=0, eos_id=None), [], max_length=16, batch_size=4,
                       max_new_tokens=NEW)
    ref_ev.cache_unsupported = "forced off in this test"
    ref = ref_ev.generate(lora, model.params, prompts)
    eos = next(t for t in ref[0][1:] if t not in ref[1])  # stops row 0 early, not row 1
    ev = Evaluator(model, LORA_CFG, _Tok(pad_id=0, eos_id=eos), [], max_length=16, batch_size=4,
                   max_new_tokens=NEW)
    assert ev.cache_unsupported is None
    out = ev.generate(lora, model.params, prompts)
    assert [k[1] for k in ev._gen] == [True]  # every chunk decoded with the cache
    ref_ev.tokenizer = ev.tokenizer
    ref_ev._gen.clear()
    assert out == ref_ev.generate(lora, model.params, prompts)
    assert len(out) == 5 and len(out[0]) < NEW and len(out[1]) == NEW
    assert ev._gen[(NEW, True)]._cache_size() == 1  # one compile for both chunks


def test_buffer_cut_to_position_table_falls_back_to_uncached():
    model, flat = _build("gpt2")  # 64 positions
    lora = _adapter(flat, model)
    prompts = [np.arange(3, 3 + 60, dtype=np.int32) % VOCAB, np.arange(5, 10, dtype=np.int32)]
    ev = Evaluator(model, LORA_CFG, _Tok(pad_id=0, eos_id=None), [], max_length=64, batch_size=2,
                   max_new_tokens=8)
    out = ev.generate(lora, model.params, prompts)
    assert list(ev._gen) == [(8, False)]  # 60 + 8 > 64: no room for 8 tokens after the longest prompt
    assert [len(o) for o in out] == [4, 8]  # as before: the long prompt runs into the table's end


class _NoCacheLM(nn.Module):
    """A causal LM without the cache protocol (no init_cache)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids=None, deterministic=True, return_dict=False):
        x = nn.Embed(VOCAB, 16)(input_ids) + nn.Embed(32, 16)(position_ids)
        x = jnp.cumsum(x * attention_mask[..., None], axis=1)
        return (nn.Dense(VOCAB)(x),)


def test_model_without_cache_protocol_uses_uncached_path():
    from flax_lora.models import CausalLM

    module = _NoCacheLM()
    ids = jnp.zeros((1, 4), jnp.int32)
    params = module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), ids)["params"]
    model = CausalLM(module, params, SimpleNamespace(max_position_embeddings=32), "toy", "toy")
    assert "init_cache" in kv_cache_support(model)
    ev = Evaluator(model, LORA_CFG, _Tok(pad_id=0, eos_id=None), [], max_length=8, batch_size=2,
                   max_new_tokens=4)
    out = ev.generate({}, params, [np.array([1, 2, 3], np.int32), np.array([4], np.int32)])
    assert [len(o) for o in out] == [4, 4] and list(ev._gen) == [(4, False)]
