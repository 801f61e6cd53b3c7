"""Regenerate the golden parity fixtures (needs torch + transformers; the tests do not).

    python tests/parity/make_fixtures.py

Made with transformers 4.57 and valid for 5.x (the parity tests read them with whichever is
installed). Each fixture is a directory ``fixtures/<name>/`` with a tiny random-init PyTorch checkpoint
(``config.json`` + ``model.safetensors``, float32; one is saved sharded) and ``golden.npz``:
``input_ids`` [2, 12], PyTorch ``logits`` [2, 12, V] float32 (eager attention) and, unless
the RoPE is position-dependent across calls, ``greedy`` [2, 12 + 8] from ``model.generate``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, GenerationConfig,
                          GPT2Config, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config,
                          SmolLM3Config)

HERE = Path(__file__).parent / "fixtures"
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64)
NEW_TOKENS = 8

FIXTURES = {
    # Llama 3 style: big rope_theta, GQA, head_dim != hidden / heads.
    "llama_theta_gqa_headdim": LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0
    ),
    # Llama 3.2 style: "llama3" rope scaling (short original context so every band is hit) + tied embeddings.
    "llama32_rope_llama3_tied": LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # SmolLM2 / TinyLlama style: tied, theta 100000, MHA; linear rope scaling; sharded checkpoint.
    "smollm2_tied_linear_sharded": LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, rope_theta=100000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Qwen2.5 style: q/k/v biases, theta 1e6, GQA, tied.
    "qwen2_bias_tied": Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True
    ),
    # Mistral: sliding window (4) shorter than the input, GQA, head_dim override.
    "mistral_window": MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, sliding_window=4
    ),
    # Qwen3: per-head RMSNorm on q and k, head_dim (16) independent of hidden / heads (8), tied.
    "qwen3_qknorm_headdim": Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # Qwen3 with YaRN rope scaling past a short original context.
    "qwen3_yarn": Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8},
    ),
    # Gemma 2: soft-caps that bind (attention 1.0, final 2.0), sliding window 4 on alternating
    # layers, pre/post norms, (1 + w) RMSNorm, sqrt(hidden)-scaled embedding, GELU-tanh,
    # query_pre_attn_scalar, tied.
    "gemma2_softcap_window": Gemma2Config(
        **{**SMALL, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
        initializer_range=0.2,
    ),
    # Gemma 3 (text): q/k norms, per-layer sliding/full attention, local rope base 10000 and global
    # 1e6 with linear scaling on global layers only.
    "gemma3_text_local_global": Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        initializer_range=0.2,
    ),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (0.75), longrope with
    # the input past the original length (long factors), sliding window.
    "phi3_longrope_partial": Phi3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
        original_max_position_embeddings=8, sliding_window=6, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 4.0, 8.0]},
    ),
    # SmolLM3: a NoPE layer (no rotary embedding), tied.
    "smollm3_nope": SmolLM3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 0], rope_theta=2000000.0, pad_token_id=0,
        tie_word_embeddings=True,
    ),
    # OLMo 2: norms after attention and MLP (no pre-norms), q/k norms over the full projections.
    "olmo2_post_norms": Olmo2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    # Dynamic NTK rope with the input past max_position_embeddings (logits only: PyTorch's
    # frequencies depend on the history of calls, so cached generation is not comparable).
    "llama_dynamic_rope": LlamaConfig(
        **{**SMALL, "max_position_embeddings": 8}, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
    # Gemma 1: Llama's layout with (1 + w) RMSNorm, sqrt(hidden)-scaled embedding, GELU-tanh gated
    # MLP, head_dim 16 != hidden / heads, multi-query attention, tied.
    "gemma_mqa_headdim": GemmaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=16, initializer_range=0.2,
    ),
    # GPT-2 (the port of flax_lora.models.gpt2): learned positions, LayerNorm (perturbed, biased),
    # fused c_attn Conv1D, gelu_new, tied head.
    "gpt2_tied": GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
    ),
}


def main(only: list[str] | None = None) -> None:
    for i, (name, config) in enumerate(FIXTURES.items()):
        if only and name not in only:
            continue
        torch.manual_seed(1234 + i)
        config.attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():  # random-init norms are all ones: perturb them so they are tested
            for n, p in model.named_parameters():
                if n.endswith(("norm.weight", "layernorm.weight")) or ".ln_" in n:  # GPT-2: ln_1, ln_2, ln_f
                    p.add_(0.1 * torch.randn_like(p))
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, max_shard_size="40KB" if "sharded" in name else "1GB")
        (out / "generation_config.json").unlink(missing_ok=True)
        rng = np.random.default_rng(i)
        ids = rng.integers(0, config.vocab_size, size=(2, 12)).astype(np.int64)
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits.float().numpy()
        golden = {"input_ids": ids, "logits": logits}
        if "dynamic" not in name:
            gen = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, bos_token_id=None, eos_token_id=None, pad_token_id=None)
            model.generation_config = gen
            with torch.no_grad():
                t = torch.tensor(ids)
                golden["greedy"] = model.generate(t, attention_mask=torch.ones_like(t), generation_config=gen).numpy()
        np.savez_compressed(out / "golden.npz", **golden)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # names: only those fixtures (the seeds follow the table's order)
