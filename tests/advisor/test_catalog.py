import json

import pytest

from advisor import catalog, sizes
from advisor.errors import AdviceError

# Published parameter counts (model cards / safetensors metadata).
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200, "facebook/opt-125m": 125_239_296, "facebook/opt-1.3b": 1_315_758_080,
    "EleutherAI/gpt-neo-125M": 125_198_592, "EleutherAI/gpt-j-6B": 6_053_381_344,
    "bigscience/bloom-560m": 559_214_592, "bigscience/bloom-7b1": 7_069_016_064,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.1-8B": 8_030_261_248, "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "google/gemma-2b": 2_506_172_416, "google/gemma-7b": 8_537_680_896,
    "Qwen/Qwen2.5-0.5B": 494_032_768, "Qwen/Qwen2.5-7B": 7_615_616_512,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008, "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_shapes_reproduce_published_sizes(name):
    shape = catalog.lookup(name)
    assert shape.name == name
    assert abs(shape.params / PUBLISHED[name] - 1) < 0.002  # biases and norms left out


def test_catalog_covers_the_required_models():
    required = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "opt-125m", "opt-350m", "opt-1.3b",
                "opt-2.7b", "opt-6.7b", "gpt-neo-125m", "gpt-neo-1.3b", "gpt-neo-2.7b", "gpt-j-6b",
                "bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "llama-2-7b",
                "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b", "gemma-2b", "gemma-7b",
                "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "smollm2-135m",
                "smollm2-360m", "smollm2-1.7b", "tinyllama-1.1b"]
    assert [n for n in required if catalog.lookup(n) is None] == []


@pytest.mark.parametrize("query,name", [
    ("GPT2", "gpt2"), ("openai-community/gpt2", "gpt2"), ("OPT-125M", "facebook/opt-125m"),
    ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-v0.1"),
    ("google/gemma-2b-it", "google/gemma-2b"), ("qwen/qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B"),
])
def test_lookup_is_case_and_org_insensitive(query, name):
    assert catalog.lookup(query).name == name


def test_gqa_and_gemma_head_dims():
    llama = catalog.lookup("llama-3.2-1b")
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim) == (32, 8, 64)
    gemma = catalog.lookup("gemma-7b")
    assert gemma.n_heads * gemma.head_dim == 4096 != gemma.hidden  # q_proj is 3072 -> 4096
    dims = {n: (i, o) for n, i, o in catalog.linear_layers(gemma)}
    assert dims["q_proj"] == (3072, 4096) and dims["o_proj"] == (4096, 3072)


@pytest.mark.parametrize("model_type,qv,attn,mlp", [
    ("gpt2", ("c_attn",), ("c_attn", "attn.c_proj"), ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")),
    ("opt", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
     ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    ("gpt_neo", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
     ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")),
    ("gptj", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
     ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
    ("bloom", ("query_key_value",), ("query_key_value", "dense"),
     ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    ("llama", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
])
def test_presets_per_architecture(model_type, qv, attn, mlp):
    assert catalog.preset_modules(model_type, "attention-qv") == qv
    assert catalog.preset_modules(model_type, "attention") == attn
    assert catalog.preset_modules(model_type, "attention-mlp") == mlp
    for other in ("mistral", "qwen2", "gemma"):
        assert catalog.ARCHS[other] == catalog.ARCHS["llama"]


# Hugging Face config.json excerpts, with each family's own key names.
CONFIGS = {
    "gpt2": ({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None,
              "vocab_size": 50257, "n_positions": 1024}, "gpt2"),
    "opt": ({"model_type": "opt", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
             "ffn_dim": 3072, "vocab_size": 50272, "max_position_embeddings": 2048}, "opt-125m"),
    "neo": ({"model_type": "gpt_neo", "num_layers": 12, "hidden_size": 768, "num_heads": 12,
             "intermediate_size": None, "vocab_size": 50257, "max_position_embeddings": 2048}, "gpt-neo-125m"),
    "gptj": ({"model_type": "gptj", "n_layer": 28, "n_embd": 4096, "n_head": 16, "n_inner": None,
              "vocab_size": 50400, "n_positions": 2048, "tie_word_embeddings": False}, "gpt-j-6b"),
    "bloom": ({"model_type": "bloom", "n_layer": 24, "hidden_size": 1024, "n_head": 16,
               "vocab_size": 250880}, "bloom-560m"),
    "llama": ({"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
               "max_position_embeddings": 131072, "tie_word_embeddings": True}, "llama-3.2-1b"),
    "tinyllama": ({"model_type": "llama", "num_hidden_layers": 22, "hidden_size": 2048,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632,
                   "vocab_size": 32000, "max_position_embeddings": 2048}, "tinyllama-1.1b"),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_local_config_json_matches_catalog(family, tmp_path):
    config, name = CONFIGS[family]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape, source = catalog.resolve(str(tmp_path), None)
    expected = catalog.lookup(name)
    assert shape.source == "config" and "config.json" in source
    fields = ("model_type", "params", "n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
              "intermediate", "vocab", "max_positions", "tied_embeddings")
    assert {f: getattr(shape, f) for f in fields} == {f: getattr(expected, f) for f in fields}


def test_hf_cache_snapshot_is_read(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny-gpt" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(CONFIGS["gpt2"][0]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    shape, source = catalog.resolve("acme/tiny-gpt", None)
    assert shape.model_type == "gpt2" and "HF cache" in source


def test_unknown_id_suggests_model_params(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(AdviceError, match="--model-params"):
        catalog.resolve("acme/never-heard-of-it", None)
    shape, source = catalog.resolve("acme/never-heard-of-it", 1.3e9)
    assert shape.source == "size-class" and "not known offline" in source


def test_unknown_architecture_and_bad_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(AdviceError, match="mamba"):
        catalog.resolve(str(tmp_path), None)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AdviceError, match="config.json"):
        catalog.resolve(str(tmp_path), None)


@pytest.mark.parametrize("text,value", [("1.3B", 1.3e9), ("350M", 3.5e8), ("7b", 7e9), ("2.5e9", 2.5e9)])
def test_parse_size(text, value):
    assert sizes.parse_size(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["big", "1.3X", "12", "-1B"])
def test_parse_size_rejects(bad):
    with pytest.raises(AdviceError):
        sizes.parse_size(bad)


@pytest.mark.parametrize("size", [1.3e9, 350e6, 3e9, 13e9])
def test_size_class_lands_near_the_requested_size(size):
    shape = catalog.size_class(size)
    assert abs(shape.params / size - 1) < 0.15
    assert shape.source == "size-class"


def test_no_model_uses_the_stated_reference():
    shape, source = catalog.resolve(None, None)
    assert shape.source == "reference" and shape.name in source
