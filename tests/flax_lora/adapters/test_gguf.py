"""GGUF export (llama.cpp): the merged model and the adapter alone, read back with ``gguf.GGUFReader``.

Checked against llama.cpp's conventions (convert_hf_to_gguf.py / convert_lora_to_gguf.py): tensor
names and ggml shapes, architecture and tokenizer keys, the Llama q/k row order, f16 / q8_0
values equal to the merged weights, LoRA A / B reproducing the adapter's delta at llama.cpp's
``alpha / r`` scale. Checkpoints are built with PyTorch transformers (skipped without torch).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from flax_lora.adapters.gguf import export_gguf, export_gguf_lora, permute_rows, rope_freqs  # noqa: E402
from flax_lora.adapters.gguf_vocab import pre_tokenizer  # noqa: E402
from flax_lora.errors import UserError  # noqa: E402
from flax_lora.lora import LoraConfig  # noqa: E402
from tests.flax_lora.adapters.gguf_helpers import (  # noqa: E402
    CONFIGS, build, build_base, llama_cpp_rows, merged_expected, random_lora, read_gguf)

FAMILIES = sorted(CONFIGS)
PERMUTED = ("llama", "smollm3")  # the Llama architecture's q/k row order
F16_TOL = 2e-3  # relative to the tensor's largest magnitude: f16 keeps 11 significant bits


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """A family's base + adapter (llama also adapts its untied lm_head), exported three ways."""
    tmp = tmp_path_factory.mktemp(request.param)
    b = build(tmp, request.param, lm_head=request.param == "llama")
    files = {"f16": export_gguf(b.run, tmp / "m-f16.gguf").path,
             "q8_0": export_gguf(b.run / "adapter", tmp / "m-q8.gguf", gguf_type="q8_0").path,
             "lora": export_gguf_lora(b.run, tmp / "lora.gguf").path}
    return b, files


def _expected_names(b) -> set[str]:
    cfg, names = b.cfg, {"token_embd.weight", "output_norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        names.add("output.weight")
    per = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    per += ["post_attention_norm", "post_ffw_norm"] if b.family == "olmo2" else ["attn_norm", "ffn_norm"]
    per += ["attn_q_norm", "attn_k_norm"] if b.family in ("qwen3", "olmo2") else []
    bias = ["attn_q", "attn_k", "attn_v"] if b.family == "qwen2" else []
    for i in range(cfg["num_hidden_layers"]):
        names |= {f"blk.{i}.{n}.weight" for n in per} | {f"blk.{i}.{n}.bias" for n in bias}
    return names


def _to_llama_cpp(b, key: str, w: np.ndarray) -> np.ndarray:
    """A transformers tensor in the row order llama.cpp's Llama architecture reads (test's own spec)."""
    if b.family not in PERMUTED:
        return w
    hd = b.cfg.get("head_dim") or b.cfg["hidden_size"] // b.cfg["num_attention_heads"]
    if ".q_proj." in key:
        return w[llama_cpp_rows(w.shape[0], w.shape[0] // hd)]
    if ".k_proj." in key:
        return w[llama_cpp_rows(w.shape[0], w.shape[0] // hd)]
    return w


def _torch_to_gguf(b) -> dict[str, str]:
    """Hand-written HF -> GGUF names of the tensors these tiny models have (llama.cpp's names)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    short.update({"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
                 if b.family == "olmo2" else {"post_attention_layernorm": "ffn_norm"})
    for i in range(b.cfg["num_hidden_layers"]):
        for hf, gg in short.items():
            for suffix in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
    return names


def test_tensor_names_shapes_and_types(built):
    b, files = built
    _, tensors = read_gguf(files["f16"])
    assert set(tensors) == _expected_names(b)
    h, hd = b.cfg["hidden_size"], b.cfg.get("head_dim") or 16
    q_rows, kv_rows = b.cfg["num_attention_heads"] * hd, b.cfg["num_key_value_heads"] * hd
    # ggml shapes are [in, out] (ne0 first): llama.cpp checks them against its hyperparameters
    assert tensors["token_embd.weight"][:2] == ("F16", (h, b.cfg["vocab_size"]))
    assert tensors["blk.0.attn_q.weight"][:2] == ("F16", (h, q_rows))
    assert tensors["blk.1.attn_k.weight"][:2] == ("F16", (h, kv_rows))
    assert tensors["blk.1.ffn_down.weight"][:2] == ("F16", (b.cfg["intermediate_size"], h))
    assert tensors["output_norm.weight"][:2] == ("F32", (h,))
    if b.family == "qwen2":
        assert tensors["blk.0.attn_q.bias"][:2] == ("F32", (q_rows,))
    if b.family == "qwen3":  # per head
        assert tensors["blk.0.attn_q_norm.weight"][:2] == ("F32", (hd,))
    if b.family == "olmo2":  # over the whole projection
        assert tensors["blk.0.attn_k_norm.weight"][:2] == ("F32", (kv_rows,))
        assert tensors["blk.0.post_ffw_norm.weight"][:2] == ("F32", (h,))


def test_architecture_metadata(built):
    b, files = built
    fields, _ = read_gguf(files["f16"])
    cfg, arch = b.cfg, b.family
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["general.file_type"] == 1  # MOSTLY_F16
    want = {"block_count": cfg["num_hidden_layers"], "context_length": 128, "embedding_length": 64, "feed_forward_length": cfg["intermediate_size"],
            "attention.head_count": 4, "attention.head_count_kv": 2}
    assert {k: fields[f"{arch}.{k}"] for k in want} == want
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]  # config.json of transformers 4.57 / 5.x
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == cfg["head_dim"]
    if b.family in PERMUTED:  # LlamaModel's own keys
        assert fields[f"{arch}.vocab_size"] == 416 and fields[f"{arch}.rope.dimension_count"] == 16
    else:
        assert f"{arch}.vocab_size" not in fields
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["general.quantization_version"] == 2


def test_tokenizer_metadata(built):
    b, files = built
    from tokenizers import Tokenizer

    fields, _ = read_gguf(files["f16"])
    tok = Tokenizer.from_file(str(b.base / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == b.cfg["vocab_size"]  # padded to the embedding's rows
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]" and types[len(vocab)] == 5  # UNUSED
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    assert {tokens[i] for i, k in enumerate(types) if k == 3} == special  # CONTROL
    merges = json.loads((b.base / "tokenizer.json").read_text())["model"]["merges"]
    assert len(fields["tokenizer.ggml.merges"]) == len(merges) > 0
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2's byte-level split rule
    assert fields["tokenizer.ggml.eos_token_id"] == b.cfg["eos_token_id"]
    tcfg = json.loads((b.base / "tokenizer_config.json").read_text())
    assert fields["tokenizer.chat_template"] == tcfg["chat_template"]
    if CONFIGS[b.family][1] == "llama3":
        assert fields["tokenizer.ggml.bos_token_id"] == vocab["<|begin_of_text|>"]
        assert fields["tokenizer.ggml.add_bos_token"] is True


def test_f16_values_are_the_merged_weights(built):
    b, files = built
    _, tensors = read_gguf(files["f16"])
    names = _torch_to_gguf(b)
    expected = merged_expected(b)
    assert not np.allclose(expected["model.layers.0.self_attn.q_proj.weight"], b.tensors["model.layers.0.self_attn.q_proj.weight"])
    for key, w in expected.items():
        got = tensors[names[key]][2]
        want = _to_llama_cpp(b, key, w)
        np.testing.assert_allclose(got, want, atol=F16_TOL * np.abs(want).max(), err_msg=key)
    if b.family in PERMUTED:  # the q/k rows really are reordered, not just equal by accident
        q = "model.layers.0.self_attn.q_proj.weight"
        assert np.abs(tensors[names[q]][2] - expected[q]).max() > 0.1


def test_q8_0_is_smaller_and_blockwise_close(built):
    b, files = built
    f16, q8 = files["f16"].stat().st_size, files["q8_0"].stat().st_size
    assert q8 < 0.75 * f16
    fields, tensors = read_gguf(files["q8_0"])
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    names = _torch_to_gguf(b)
    for key, w in merged_expected(b).items():
        kind, _, got = tensors[names[key]]
        want = _to_llama_cpp(b, key, w)
        if w.ndim == 1:
            assert kind == "F32"
            continue
        # a row that is not whole 32-value blocks stays f16 (the converter's fallback)
        assert kind == ("Q8_0" if w.shape[-1] % 32 == 0 else "F16"), key
        # q8_0: one scale per 32 values, error at most half a step of absmax / 127
        blocks = want.reshape(-1, 32) if kind == "Q8_0" else want.reshape(1, -1)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(got.reshape(blocks.shape) - blocks)
        assert (err <= 0.51 * step + F16_TOL * np.abs(want).max()).all(), key
    if b.family == "qwen3":
        assert tensors["blk.0.ffn_down.weight"][0] == "F16"  # 80 inputs: not whole blocks


def test_lora_file_reproduces_the_delta(built):
    b, files = built
    fields, tensors = read_gguf(files["lora"])
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == b.family
    alpha, r = fields["adapter.lora.alpha"], b.lcfg.r
    assert alpha == pytest.approx(b.lcfg.alpha)
    names = _torch_to_gguf(b)
    assert len(tensors) == 2 * len(b.lora)
    for path, (a, bm) in b.lora.items():
        key = path.replace("/", ".") + ".weight"
        kind_a, shape_a, lora_a = tensors[names[key] + ".lora_a"]
        kind_b, shape_b, lora_b = tensors[names[key] + ".lora_b"]
        assert (kind_a, kind_b) == ("F32", "F32")
        assert shape_a == (a.shape[0], r) and shape_b == (r, bm.shape[1])  # ne: [in, r], [r, out]
        delta = _to_llama_cpp(b, key, b.lcfg.scaling * (a @ bm).T)
        np.testing.assert_allclose(alpha / r * lora_b @ lora_a, delta, rtol=1e-5, atol=1e-6, err_msg=key)


def test_rslora_alpha_is_llama_cpp_equivalent(tmp_path):
    lcfg = LoraConfig(r=4, alpha=8, use_rslora=True)  # scaling 8 / sqrt(4) = 4
    b = build(tmp_path, "qwen2", lcfg=lcfg, modules=("v_proj",))
    fields, tensors = read_gguf(export_gguf_lora(b.run, tmp_path / "l.gguf").path)
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)  # llama.cpp scales by alpha / r = 4
    a, bm = b.lora["model/layers/1/self_attn/v_proj"]
    got = tensors["blk.1.attn_v.weight.lora_b"][2] @ tensors["blk.1.attn_v.weight.lora_a"][2] * 16.0 / 4
    np.testing.assert_allclose(got, 4.0 * (a @ bm).T, rtol=1e-5)


def test_permute_rows_matches_the_pair_spec():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    np.testing.assert_array_equal(permute_rows(w, 2), w[llama_cpp_rows(16, 2)])
    np.testing.assert_array_equal(llama_cpp_rows(8, 1), [0, 4, 1, 5, 2, 6, 3, 7])


def test_llama3_rope_freqs_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0, rope_scaling=rs,
                         max_position_embeddings=512)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    divisors = rope_freqs(config.to_dict())
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert divisors.shape == (64,) and divisors.min() == 1.0 and divisors.max() == 8.0  # all three regimes
    np.testing.assert_allclose(base / divisors, scaled.numpy(), rtol=1e-5)


def test_rope_scaling_keys(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    b = build(tmp_path / "yarn", "qwen2", config=dict(rope_scaling=yarn), modules=("v_proj",))
    fields, tensors = read_gguf(export_gguf(b.run, tmp_path / "y.gguf").path)
    assert (fields["qwen2.rope.scaling.type"], fields["qwen2.rope.scaling.factor"]) == ("yarn", 4.0)
    assert fields["qwen2.rope.scaling.original_context_length"] == 32
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    b = build(tmp_path / "l3", "llama", config=dict(rope_scaling=llama3), modules=("v_proj",))
    fields, tensors = read_gguf(export_gguf(b.run, tmp_path / "l3.gguf").path)
    assert tensors["rope_freqs.weight"][:2] == ("F32", (8,)) and "llama.rope.scaling.type" not in fields
    assert "rope_freqs.weight" not in read_gguf(export_gguf_lora(b.run, tmp_path / "l3-lora.gguf").path)[1]
    b = build(tmp_path / "dyn", "llama", config=dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
              modules=("v_proj",))
    with pytest.raises(UserError, match="rope_scaling type 'dynamic' has no llama.cpp equivalent"):
        export_gguf(b.run, tmp_path / "d.gguf")


def test_pre_tokenizer_from_split_rule():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer(tok, json.loads(tok.to_str())) == "qwen2"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d+"), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(UserError, match="pre-tokenizer is not one llama.cpp knows"):
        pre_tokenizer(tok, json.loads(tok.to_str()))


def _adapter_on(tmp_path, base_cfg: dict, family: str, base, **kw):
    from flax_lora.adapters.native import save_adapter

    tree, linears, _ = random_lora(base_cfg, **kw)
    return save_adapter(tmp_path / "run" / "adapter", tree, LoraConfig(4, 8), linears, target_modules=["v_proj"],
                        base_model=str(base), model_type=family)


def test_refuses_what_llama_cpp_would_run_differently(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    run = _adapter_on(tmp_path / "a", CONFIGS["qwen2"][0], "gpt2", tmp_path / "gpt2", modules=("v_proj",))
    with pytest.raises(UserError, match=r"GGUF export supports llama, mistral, qwen2, qwen3, smollm3, olmo2 models; "
                                        r"this one is 'gpt2'"):
        export_gguf(run, tmp_path / "x.gguf")
    cfg = build_base(tmp_path / "swa", "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    run = _adapter_on(tmp_path / "b", cfg, "qwen2", tmp_path / "swa", modules=("v_proj",))
    with pytest.raises(UserError, match="sliding-window layers"):
        export_gguf_lora(run, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    cfg = build_base(tmp_path / "nope", "smollm3", no_rope_layers=[1, 0, 1, 1])
    run = _adapter_on(tmp_path / "d", cfg, "smollm3", tmp_path / "nope", modules=("v_proj",))
    with pytest.raises(UserError, match="skips rope on every 4th layer"):
        export_gguf(run, tmp_path / "x.gguf")
    cfg = build_base(tmp_path / "tied", "qwen2")
    run = _adapter_on(tmp_path / "c", cfg, "qwen2", tmp_path / "tied", modules=("v_proj",), lm_head=True)
    with pytest.raises(UserError, match="lm_head, which is tied"):
        export_gguf_lora(run, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="--gguf-type 'q4_0'"):
        export_gguf(run, tmp_path / "x.gguf", gguf_type="q4_0")


# ----------------------------------------------------------------------------- llama.cpp itself

PROMPT = "The capital of France is"


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """(llama.cpp's greedy continuation of ``ids``, its logits at every prompt position)."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[:len(ids)], np.float32)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == llm.token_eos():
            break
        out.append(nxt)
        llm.eval([nxt])
    return out, prompt_logits


def _lora_generate(b, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation ids) exactly as ``lora generate --model BASE --adapter RUN
    --prompt PROMPT --no-chat`` computes them (its own setup, prompt and evaluator)."""
    from cli.train import _generation_setup
    from flax_lora.evaluation.evaluator import Evaluator
    from flax_lora.evaluation.generate import Prompt, Sampling

    m, tok, lora, lora_cfg, _, _ = _generation_setup(None, str(b.base), str(b.run / "adapter"))
    p = Prompt.plain(tok, PROMPT)
    ev = Evaluator(m, lora_cfg, tok, [], max_length=max(len(p.ids), 16), batch_size=1, max_new_tokens=n,
                   stop_ids=p.stop_ids)
    return list(p.ids), [int(i) for i in ev.generate(lora, m.params, [np.asarray(p.ids, np.int32)], Sampling(0.0, 1.0, 0))[0]]


def _jax_logits(b, tmp, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    from flax_lora.adapters.merged import export_merged
    from flax_lora.models.decoder import load_decoder

    module, params, _ = load_decoder(export_merged(b.run / "adapter", tmp / "merged-hf"))
    return np.asarray(module.apply({"params": params}, jnp.asarray([ids])).logits[0], np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_greedy_equals_lora_generate(family, tmp_path):
    """llama.cpp loads the merged GGUF, and the base GGUF + the LoRA GGUF, tokenizes the prompt as
    the project does, computes the same logits (f16 weights) and continues greedily with the same text."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp "
                                                        "from source: minutes; not in CI)")
    import jax

    from flax_lora.adapters.native import load_adapter, save_adapter

    b = build(tmp_path, family)
    n = 12
    ids, want = _lora_generate(b, n)
    merged = llama_cpp.Llama(model_path=str(export_gguf(b.run, tmp_path / "m.gguf").path), n_ctx=64,
                             logits_all=True, verbose=False)
    got_ids = merged.tokenize(PROMPT.encode(), add_bos=True)  # BOS when the file says add_bos_token
    assert got_ids == ids
    out, logits = _llama_cpp_greedy(merged, got_ids, n)
    ref = _jax_logits(b, tmp_path, got_ids)
    assert np.abs(logits - ref).max() < 0.02 * np.abs(ref).max(), np.abs(logits - ref).max()
    assert out == want and len(out) > 0
    # the base as GGUF (an adapter of zeros merged) + the adapter file through llama.cpp's --lora
    lora, lcfg, linears, meta = load_adapter(b.run / "adapter")
    zeros = jax.tree_util.tree_map(np.zeros_like, lora)
    save_adapter(tmp_path / "zero", zeros, lcfg, linears, target_modules=meta["target_modules"],
                 base_model=str(b.base), model_type=family)
    base_gguf = export_gguf(tmp_path / "zero", tmp_path / "base.gguf").path
    with_lora = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(export_gguf_lora(b.run, tmp_path / "l.gguf").path),
                                n_ctx=64, logits_all=True, verbose=False)
    out_lora, logits_lora = _llama_cpp_greedy(with_lora, got_ids, n)
    assert np.abs(logits_lora - ref).max() < 0.02 * np.abs(ref).max()
    assert out_lora == want
