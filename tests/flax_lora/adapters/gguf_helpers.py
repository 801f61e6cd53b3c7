"""Tiny PyTorch-built checkpoints with a chat tokenizer, random native adapters over them, and a
GGUF reader, for the GGUF export tests (torch is needed to build the checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flax_lora.adapters.native import save_adapter
from flax_lora.lora import LinearInfo, LoraConfig
from flax_lora.models.weights import read_checkpoint
from tests.helpers import chat_tokenizer

_SHAPE = dict(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
# Llama 3 style (GQA, untied head, llama3 chat tokenizer); Qwen 2 (q/k/v biases, tied embeddings,
# ChatML); Qwen 3 (per-head q/k norms, head_dim != hidden / heads, an MLP width q8_0 cannot block);
# SmolLM3 (Llama's q/k order, no rope on every 4th layer); OLMo 2 (norms after attention and MLP,
# q/k norms over the whole projection).
CONFIGS = {
    "llama": (dict(_SHAPE, model_type="llama", head_dim=16, rope_theta=500000.0, tie_word_embeddings=False), "llama3"),
    "qwen2": (dict(_SHAPE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True), "chatml"),
    "qwen3": (dict(_SHAPE, model_type="qwen3", head_dim=32, intermediate_size=80, tie_word_embeddings=True), "chatml"),
    "smollm3": (dict(_SHAPE, model_type="smollm3", num_hidden_layers=4, rope_theta=2000000.0, tie_word_embeddings=True,
                     pad_token_id=None),
                "llama3"),
    "olmo2": (dict(_SHAPE, model_type="olmo2", rope_theta=500000.0, tie_word_embeddings=False), "chatml"),
}
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Built:
    """A base checkpoint folder, a run with a native adapter over it, and what they hold."""

    family: str
    cfg: dict  # the base model's config.json
    base: Path
    run: Path
    tensors: dict  # the base checkpoint's tensors (torch names, float32)
    lora: dict  # module path -> (a [in, r], b [r, out])
    lcfg: LoraConfig


def build_base(folder: Path, family: str, **overrides) -> dict:
    """A random-init ``family`` checkpoint saved by transformers (PyTorch) with a chat tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, style = CONFIGS[family]
    tok = chat_tokenizer(style, folder)
    config = AutoConfig.for_model(**{**cfg, **overrides}, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return config.to_dict()


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def random_lora(cfg: dict, modules=ATTN + MLP, r: int = 4, seed: int = 0, lm_head: bool = False):
    """(lora tree, linears, path -> (a, b)) with non-zero A [in, r] and B [r, out] on every layer."""
    rng = np.random.default_rng(seed)
    shapes = _linear_shapes(cfg)
    tree, linears, flat = {}, {}, {}
    for i in range(cfg["num_hidden_layers"]):
        for name in modules:
            parent = "self_attn" if name in ATTN else "mlp"
            path = f"model/layers/{i}/{parent}/{name}"
            flat[path] = shapes[name]
    if lm_head:
        flat["lm_head"] = (cfg["hidden_size"], cfg["vocab_size"])
    out = {}
    for path, (fi, fo) in flat.items():
        a = (0.3 * rng.standard_normal((fi, r))).astype(np.float32)
        b = (0.3 * rng.standard_normal((r, fo))).astype(np.float32)
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a, b=b)
        linears[path] = LinearInfo(path, "dense", fi, fo)
        out[path] = (a, b)
    return tree, linears, out


def build(tmp: Path, family: str, lcfg: LoraConfig = LoraConfig(r=4, alpha=8), config: dict | None = None,
          **kw) -> Built:
    """Base checkpoint in ``tmp/base`` (``config`` overriding the family's), run with a random adapter
    in ``tmp/run`` (``kw`` for :func:`random_lora`)."""
    cfg = build_base(tmp / "base", family, **(config or {}))
    tree, linears, flat = random_lora(cfg, r=lcfg.r, **kw)
    save_adapter(tmp / "run" / "adapter", tree, lcfg, linears, target_modules=sorted({p.rsplit("/", 1)[-1] for p in flat}),
                 base_model=str(tmp / "base"), model_type=family)
    tensors = {k: np.asarray(v, np.float32) for k, v in read_checkpoint(tmp / "base").items()}
    return Built(family, cfg, tmp / "base", tmp / "run", tensors, flat, lcfg)


def merged_expected(b: Built) -> dict[str, np.ndarray]:
    """The base tensors with ``W + scaling * (A B)^T`` for each adapted module (torch names)."""
    out = dict(b.tensors)
    for path, (a, bm) in b.lora.items():
        key = path.replace("/", ".") + ".weight"
        out[key] = out[key] + b.lcfg.scaling * (a @ bm).T
    return out


def llama_cpp_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Which transformers row each row of a llama.cpp q/k weight holds: within a head of ``hd``
    rows, llama.cpp's rotated pair (2j, 2j+1) is transformers' (j, j + hd/2)."""
    hd = n_rows // n_head
    return np.array([h * hd + j + half * hd // 2 for h in range(n_head) for j in range(hd // 2) for half in (0, 1)])


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (ggml type name, ggml shape ne, float32 values in numpy order))."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = (t.tensor_type.name, tuple(int(n) for n in t.shape), values)
    return fields, tensors
