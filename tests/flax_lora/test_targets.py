"""Every guide preset resolves, on a real (tiny, random-init) model of every supported family (the
ports', and transformers' Flax classes for the legacy ones), to the modules the advisor names, and
nothing else."""

import pytest
from transformers import (BloomConfig, GemmaConfig, GPT2Config, GPTJConfig, GPTNeoConfig, LlamaConfig,
                          MistralConfig, OPTConfig)

from advisor.catalog import preset_modules
from flax_lora.errors import UserError
from flax_lora.models.hf import SUPPORTED as LEGACY
from flax_lora.models.registry import from_config
from flax_lora.targets import resolve_targets

TINY = {
    "gpt2": GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16),
    "opt": OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32, vocab_size=32,
                     word_embed_proj_dim=16, max_position_embeddings=16),
    "gpt_neo": GPTNeoConfig(num_layers=1, hidden_size=16, num_heads=2, vocab_size=32, max_position_embeddings=16,
                            attention_types=[[["global"], 1]], intermediate_size=32),
    "gptj": GPTJConfig(n_layer=1, n_embd=16, n_head=2, rotary_dim=4, vocab_size=32, n_positions=16),
    "bloom": BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=32),
    "llama": LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=32),
    "mistral": MistralConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=32, vocab_size=32),
    "gemma": GemmaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, intermediate_size=32, vocab_size=32),
}

# The last path component(s) each preset must adapt in one decoder layer.
EXPECTED = {
    "gpt2": {"attention-qv": {"attn/c_attn"}, "attention": {"attn/c_attn", "attn/c_proj"},
             "attention-mlp": {"attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"}},
    "bloom": {"attention-qv": {"self_attention/query_key_value"},
              "attention": {"self_attention/query_key_value", "self_attention/dense"},
              "attention-mlp": {"self_attention/query_key_value", "self_attention/dense",
                                "mlp/dense_h_to_4h", "mlp/dense_4h_to_h"}},
}


@pytest.fixture(scope="module", params=[pytest.param(t, marks=[pytest.mark.legacy] if t in LEGACY else [])
                                        for t in sorted(TINY)])
def model(request):
    return from_config(TINY[request.param])


@pytest.mark.parametrize("preset", ["attention-qv", "attention", "attention-mlp"])
def test_preset_adapts_exactly_the_advised_modules(model, preset):
    chosen = resolve_targets(model.linears(), model.model_type, preset=preset)
    names = preset_modules(model.model_type, preset)
    # Every chosen module matches an advised name, and every advised name matched something.
    for name in names:
        assert any(("/" + p).endswith("/" + name.replace(".", "/")) for p in chosen), (name, list(chosen))
    assert all(any(("/" + p).endswith("/" + n.replace(".", "/")) for n in names) for p in chosen)
    assert not any(p.endswith("lm_head") for p in chosen)
    if model.model_type in EXPECTED:
        assert {"/".join(p.split("/")[-2:]) for p in chosen} == EXPECTED[model.model_type][preset]


def test_unknown_names_list_what_exists(model):
    with pytest.raises(UserError, match="this model has:"):
        resolve_targets(model.linears(), model.model_type, modules=["no_such_proj"])
