"""The catalog's families of the decoder port (flax_lora.models.decoder): qwen3, gemma2, gemma3_text,
phi3 (fused projections), smollm3, olmo2 — entries, aliases, presets, config.json reading, and
that every advised target name selects linears of the port's own module tree."""

import json

import pytest

from advisor import advise, catalog

# Published parameter counts, with where each comes from. "safetensors": the Hub's safetensors total
# (also keras-hub / llama.cpp metadata), exact, so count_params (norm scales left out) lands within
# 0.01%. "card": the model card's rounded figure.
PUBLISHED = {
    # card "0.6B" / "1.7B": the Hub's safetensors totals (751,632,384 / 2,031,739,904) count the tied
    # embedding twice (the checkpoints store lm_head.weight although tie_word_embeddings is true).
    "Qwen/Qwen3-0.6B": (0.6e9, "card"),
    "Qwen/Qwen3-1.7B": (1.7e9, "card"),
    "Qwen/Qwen3-4B": (4_022_468_096, "safetensors"),
    "Qwen/Qwen3-8B": (8_190_735_360, "safetensors"),
    "Qwen/Qwen3-14B": (14_768_307_200, "safetensors"),
    "google/gemma-2-2b": (2_614_341_888, "safetensors"),
    "google/gemma-2-9b": (9_241_705_984, "safetensors"),
    "google/gemma-3-1b-pt": (999_885_952, "safetensors"),
    # 4B/12B: the language model alone (keras-hub gemma3_4b_text / gemma3_12b_text, vocabulary 262144);
    # the Hub totals 4,300,079,472 / 12,187,325,040 add the SigLIP vision tower (416,866,032) and
    # the projector, and 64 more embedding rows (vocabulary 262208).
    "google/gemma-3-4b-pt": (3_880_099_328, "safetensors"),
    "google/gemma-3-12b-pt": (11_765_788_416, "safetensors"),
    "microsoft/Phi-3-mini-4k-instruct": (3_821_079_552, "safetensors"),
    "microsoft/Phi-3-mini-128k-instruct": (3_821_079_552, "safetensors"),
    "microsoft/Phi-4-mini-instruct": (3_836_021_760, "safetensors"),
    "HuggingFaceTB/SmolLM3-3B": (3_075_098_624, "safetensors"),
    "allenai/OLMo-2-0425-1B": (1_484_916_736, "safetensors"),
    "allenai/OLMo-2-1124-7B": (7_298_617_344, "safetensors"),
}
TOLERANCE = {"safetensors": 0.001, "card": 0.03}

ALIASES = {
    "Qwen/Qwen3-0.6B": ["qwen3-0.6b", "Qwen/Qwen3-0.6B-Base"],
    "Qwen/Qwen3-1.7B": ["qwen3-1.7b", "qwen/qwen3-1.7b-base"],
    "Qwen/Qwen3-4B": ["qwen3-4b", "Qwen/Qwen3-4B-Base"],
    "Qwen/Qwen3-8B": ["qwen3-8b", "Qwen/Qwen3-8B-Base"],
    "Qwen/Qwen3-14B": ["qwen3-14b"],
    "google/gemma-2-2b": ["gemma-2-2b", "google/gemma-2-2b-it", "gemma2-2b"],
    "google/gemma-2-9b": ["gemma-2-9b", "gemma-2-9b-it", "gemma2-9b"],
    "google/gemma-3-1b-pt": ["gemma-3-1b", "google/gemma-3-1b-it", "gemma3-1b"],
    "google/gemma-3-4b-pt": ["gemma-3-4b", "google/gemma-3-4b-it", "gemma3-4b"],
    "google/gemma-3-12b-pt": ["gemma-3-12b", "google/gemma-3-12b-it", "gemma3-12b"],
    "microsoft/Phi-3-mini-4k-instruct": ["phi-3-mini", "phi-3-mini-4k"],
    "microsoft/Phi-3-mini-128k-instruct": ["phi-3-mini-128k", "microsoft/Phi-3.5-mini-instruct"],
    "microsoft/Phi-4-mini-instruct": ["phi-4-mini"],
    "HuggingFaceTB/SmolLM3-3B": ["smollm3", "HuggingFaceTB/SmolLM3-3B-Base"],
    "allenai/OLMo-2-0425-1B": ["olmo-2-1b", "olmo2-1b", "allenai/OLMo-2-0425-1B-Instruct"],
    "allenai/OLMo-2-1124-7B": ["olmo-2-7b", "olmo2-7b", "allenai/OLMo-2-1124-7B-Instruct"],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_entry_resolves_by_hub_id_and_aliases(name):
    assert catalog.lookup(name).name == name
    assert catalog.resolve(name, None)[0].source == "catalog"
    for alias in ALIASES[name]:
        assert catalog.lookup(alias).name == name, alias


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    published, kind = PUBLISHED[name]
    assert abs(catalog.lookup(name).params / published - 1) < TOLERANCE[kind]


@pytest.mark.parametrize("name,shape", [
    # (layers, hidden, heads, kv heads, head_dim, intermediate, vocab, positions, tied)
    ("Qwen/Qwen3-0.6B", (28, 1024, 16, 8, 128, 3072, 151936, 40960, True)),
    ("Qwen/Qwen3-1.7B", (28, 2048, 16, 8, 128, 6144, 151936, 40960, True)),
    ("Qwen/Qwen3-4B", (36, 2560, 32, 8, 128, 9728, 151936, 40960, True)),
    ("Qwen/Qwen3-8B", (36, 4096, 32, 8, 128, 12288, 151936, 40960, False)),
    ("Qwen/Qwen3-14B", (40, 5120, 40, 8, 128, 17408, 151936, 40960, False)),
    ("google/gemma-2-2b", (26, 2304, 8, 4, 256, 9216, 256000, 8192, True)),
    ("google/gemma-2-9b", (42, 3584, 16, 8, 256, 14336, 256000, 8192, True)),
    ("google/gemma-3-1b-pt", (26, 1152, 4, 1, 256, 6912, 262144, 32768, True)),
    ("google/gemma-3-4b-pt", (34, 2560, 8, 4, 256, 10240, 262208, 131072, True)),
    ("google/gemma-3-12b-pt", (48, 3840, 16, 8, 256, 15360, 262208, 131072, True)),
    ("microsoft/Phi-3-mini-4k-instruct", (32, 3072, 32, 32, 96, 8192, 32064, 4096, False)),
    ("microsoft/Phi-3-mini-128k-instruct", (32, 3072, 32, 32, 96, 8192, 32064, 131072, False)),
    ("microsoft/Phi-4-mini-instruct", (32, 3072, 24, 8, 128, 8192, 200064, 131072, True)),
    ("HuggingFaceTB/SmolLM3-3B", (36, 2048, 16, 4, 128, 11008, 128256, 65536, True)),
    ("allenai/OLMo-2-0425-1B", (16, 2048, 16, 16, 128, 8192, 100352, 4096, False)),
    ("allenai/OLMo-2-1124-7B", (32, 4096, 32, 32, 128, 11008, 100352, 4096, False)),
])
def test_entries_have_the_published_config_values(name, shape):
    s = catalog.lookup(name)
    assert (s.n_layers, s.hidden, s.n_heads, s.n_kv_heads, s.head_dim, s.intermediate, s.vocab,
            s.max_positions, s.tied_embeddings) == shape


LLAMA_NAMES = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("model_type,names", [
    ("qwen3", LLAMA_NAMES), ("gemma2", LLAMA_NAMES), ("gemma3_text", LLAMA_NAMES),
    ("smollm3", LLAMA_NAMES), ("olmo2", LLAMA_NAMES),
    ("phi3", (("qkv_proj",), ("qkv_proj", "o_proj"), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))),
])
def test_presets_per_family(model_type, names):
    presets = ("attention-qv", "attention", "attention-mlp")
    assert tuple(catalog.preset_modules(model_type, p) for p in presets) == names


def test_phi3_linears_are_fused():
    dims = {n: (i, o) for n, i, o in catalog.linear_layers(catalog.lookup("phi-4-mini"))}
    # 24 query heads + 2 x 8 kv heads of 128; gate and up side by side
    assert dims == {"qkv_proj": (3072, 5120), "o_proj": (3072, 3072),
                    "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}
    dims = {n: (i, o) for n, i, o in catalog.linear_layers(catalog.lookup("phi-3-mini"))}
    assert dims["qkv_proj"] == (3072, 9216) and dims["gate_up_proj"] == (3072, 16384)


# ------------------------------------------------------------------ tiny real configs and the port


def _tiny_configs():
    import transformers as T

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    return {
        "qwen3": T.Qwen3Config(head_dim=8, **common),
        "gemma2": T.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, **common),
        "gemma3_text": T.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, **common),
        "phi3": T.Phi3Config(partial_rotary_factor=0.5, **common),
        "smollm3": T.SmolLM3Config(**common),
        "olmo2": T.Olmo2Config(**common),
    }


@pytest.fixture(scope="module")
def tiny():
    """(transformers config, the port's linears) of a tiny random model of each family."""
    from flax_lora.models.decoder import causal_lm_from_config

    out = {}
    for model_type, config in _tiny_configs().items():
        out[model_type] = (config, causal_lm_from_config(config).linears())
    return out


FAMILY_OF = {
    "Qwen/Qwen3-0.6B": "qwen3", "Qwen/Qwen3-1.7B": "qwen3", "Qwen/Qwen3-4B": "qwen3",
    "Qwen/Qwen3-8B": "qwen3", "Qwen/Qwen3-14B": "qwen3",
    "google/gemma-2-2b": "gemma2", "google/gemma-2-9b": "gemma2",
    "google/gemma-3-1b-pt": "gemma3_text", "google/gemma-3-4b-pt": "gemma3_text",
    "google/gemma-3-12b-pt": "gemma3_text",
    "microsoft/Phi-3-mini-4k-instruct": "phi3", "microsoft/Phi-3-mini-128k-instruct": "phi3",
    "microsoft/Phi-4-mini-instruct": "phi3",
    "HuggingFaceTB/SmolLM3-3B": "smollm3",
    "allenai/OLMo-2-0425-1B": "olmo2", "allenai/OLMo-2-1124-7B": "olmo2",
}


def _selects(linears, names):
    from flax_lora.lora import select_targets

    return select_targets(linears, names)


@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_advice_targets_select_the_ports_linears(name, tiny):
    assert sorted(FAMILY_OF) == sorted(PUBLISHED)
    advice = advise(samples=3000, vram_gb=24, model=name)
    model_type = FAMILY_OF[name]
    assert advice.model.model_type == model_type
    _, linears = tiny[model_type]
    for target in advice.lora.target_modules:
        assert _selects(linears, [target]), f"{target!r} selects nothing in the {model_type} port"


@pytest.mark.parametrize("model_type", sorted(_tiny_configs()))
def test_every_preset_name_selects_the_ports_linears(model_type, tiny):
    _, linears = tiny[model_type]
    for preset in ("attention-qv", "attention", "attention-mlp"):
        for target in catalog.preset_modules(model_type, preset):
            assert _selects(linears, [target]), f"{preset}: {target!r} selects nothing"
    # attention-mlp covers every linear of a decoder layer (the lm_head aside)
    every = catalog.preset_modules(model_type, "attention-mlp")
    layer = {p for p in linears if "/layers/" in p}
    assert set(_selects({p: linears[p] for p in layer}, list(every))) == layer


@pytest.mark.parametrize("model_type", sorted(_tiny_configs()))
def test_linear_layers_match_the_port(model_type, tiny):
    """linear_layers of the shape read from the config.json = the port's layer-0 linears, by name and size."""
    config, linears = tiny[model_type]
    shape = catalog.from_config(config.to_dict(), f"tiny-{model_type}")
    prefix = "model/layers/0/"
    port = {p[len(prefix):].split("/")[-1]: (info.in_features, info.out_features)
            for p, info in linears.items() if p.startswith(prefix)}
    assert {n: (i, o) for n, i, o in catalog.linear_layers(shape)} == port


@pytest.mark.parametrize("model_type", sorted(_tiny_configs()))
def test_count_params_matches_the_ports_parameters(model_type):
    """count_params of the shape = the port's embeddings, head and kernels (norm scales left out)."""
    import jax

    from flax_lora.models.decoder import causal_lm_from_config

    config = _tiny_configs()[model_type]
    model = causal_lm_from_config(config)
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    counted = sum(leaf.size for path, leaf in leaves if path[-1].key in ("kernel", "embedding"))
    assert catalog.count_params(catalog.from_config(config.to_dict(), "tiny")) == counted


@pytest.mark.parametrize("model_type", sorted(_tiny_configs()))
def test_saved_config_json_gives_the_shape(model_type, tmp_path):
    """config.json as save_pretrained writes it (defaults such as tie_word_embeddings left out)."""
    config = _tiny_configs()[model_type]
    (tmp_path / "config.json").write_text(config.to_json_string(use_diff=True))
    shape, source = catalog.resolve(str(tmp_path), None)
    assert shape.source == "config" and "config.json" in source
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert (shape.model_type, shape.n_layers, shape.hidden, shape.n_heads, shape.n_kv_heads, shape.head_dim,
            shape.intermediate, shape.vocab, shape.max_positions, shape.tied_embeddings) == (
        model_type, 2, 32, 4, 2, head_dim, 64, 64, 64, config.tie_word_embeddings)
    assert shape.attention_modules == catalog.ARCHS[model_type].attention


# Hand-written config.json excerpts with each family's own keys, against the catalog entries.
CONFIGS = {
    "qwen3": ({"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
               "max_position_embeddings": 40960, "tie_word_embeddings": False, "rope_theta": 1000000},
              "qwen3-8b"),
    "gemma2": ({"model_type": "gemma2", "num_hidden_layers": 42, "hidden_size": 3584, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000,
                "max_position_embeddings": 8192, "query_pre_attn_scalar": 224, "sliding_window": 4096,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, "gemma-2-9b"),
    "gemma3_text": ({"model_type": "gemma3_text", "num_hidden_layers": 26, "hidden_size": 1152,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                     "intermediate_size": 6912, "vocab_size": 262144, "max_position_embeddings": 32768,
                     "query_pre_attn_scalar": 256, "sliding_window": 512}, "gemma-3-1b"),
    "phi3": ({"model_type": "phi3", "num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 24,
              "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 200064,
              "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "partial_rotary_factor": 0.75, "tie_word_embeddings": True}, "phi-4-mini"),
    "phi3-mha": ({"model_type": "phi3", "num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064,
                  "max_position_embeddings": 4096, "tie_word_embeddings": False}, "phi-3-mini"),
    "smollm3": ({"model_type": "smollm3", "num_hidden_layers": 36, "hidden_size": 2048, "num_attention_heads": 16,
                 "num_key_value_heads": 4, "intermediate_size": 11008, "vocab_size": 128256,
                 "max_position_embeddings": 65536, "no_rope_layer_interval": 4}, "smollm3-3b"),
    "olmo2": ({"model_type": "olmo2", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 16,
               "num_key_value_heads": 16, "intermediate_size": 8192, "vocab_size": 100352,
               "max_position_embeddings": 4096}, "olmo-2-1b"),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_config_json_of_each_family_matches_the_catalog(family, tmp_path):
    config, name = CONFIGS[family]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape, _ = catalog.resolve(str(tmp_path), None)
    expected = catalog.lookup(name)
    fields = ("model_type", "params", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
              "intermediate", "vocab", "max_positions", "tied_embeddings", "attention_modules", "mlp_modules")
    assert {f: getattr(shape, f) for f in fields} == {f: getattr(expected, f) for f in fields}


@pytest.mark.parametrize("model_type,tied,head_dim,kv,positions", [
    ("qwen3", False, 128, 32, 32768), ("gemma2", True, 256, 4, 8192), ("gemma3_text", True, 256, 4, 131072),
    ("phi3", False, 32, 32, 4096), ("smollm3", True, 32, 4, 32768), ("olmo2", False, 32, 32, 2048),
])
def test_omitted_keys_take_transformers_family_defaults(model_type, tied, head_dim, kv, positions):
    """transformers 4.57's config-class defaults for keys a config.json leaves out."""
    import transformers

    config = {"model_type": model_type, "num_hidden_layers": 2, "hidden_size": 1024,
              "num_attention_heads": 32, "intermediate_size": 4096, "vocab_size": 1000}
    shape = catalog.from_config(config, "minimal")
    assert (shape.tied_embeddings, shape.head_dim, shape.n_kv_heads, shape.max_positions) == (
        tied, head_dim, kv, positions)
    real = transformers.AutoConfig.for_model(**config)
    real_head_dim = getattr(real, "head_dim", None) or real.hidden_size // real.num_attention_heads
    assert (real.tie_word_embeddings, real_head_dim, real.num_key_value_heads,
            real.max_position_embeddings) == (tied, head_dim, kv, positions)
