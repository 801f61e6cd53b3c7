"""Offline model shapes: a built-in catalog, local/HF-cache ``config.json``, or a size class.

The advisor never downloads anything: it needs only the architecture facts (layers, widths,
heads, vocabulary, module names) that the memory model and the LoRA targets depend on.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from advisor.errors import AdviceError, UnknownModel
from advisor.schema import ModelShape


class Arch(NamedTuple):
    """Per-architecture LoRA module names, as PEFT matches them: a name matches a module whose
    dotted path equals it or ends with ``"." + name`` (GPT-2 needs ``attn.c_proj`` vs
    ``mlp.c_proj``: both are called ``c_proj``)."""

    attention_qv: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    learned_positions: bool  # a position-embedding table counts toward the parameters
    gated_mlp: bool


_LLAMA = Arch(("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
              ("gate_proj", "up_proj", "down_proj"), False, True)
ARCHS: dict[str, Arch] = {
    "gpt2": Arch(("c_attn",), ("c_attn", "attn.c_proj"), ("c_fc", "mlp.c_proj"), True, False),
    "opt": Arch(("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                ("fc1", "fc2"), True, False),
    "gpt_neo": Arch(("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                    ("c_fc", "c_proj"), True, False),
    "gptj": Arch(("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                 ("fc_in", "fc_out"), False, False),
    "bloom": Arch(("query_key_value",), ("query_key_value", "dense"),
                  ("dense_h_to_4h", "dense_4h_to_h"), False, False),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "smollm3": _LLAMA,
    "olmo2": _LLAMA,
    # Phi-3 / Phi-4-mini fuse q, k, v into qkv_proj and gate, up into gate_up_proj (PEFT's names).
    "phi3": Arch(("qkv_proj",), ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj"), False, True),
}

# Hugging Face config.json keys, first present wins (families name the same fact differently).
_KEYS = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads"),
    "n_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions", "seq_length"),
}
# transformers' per-family default for tie_word_embeddings when config.json omits it (as
# save_pretrained does when the value is the default; transformers 4.57 config classes).
_TIED_DEFAULT = {"gptj": False, "llama": False, "mistral": False, "qwen2": False, "qwen3": False,
                 "phi3": False, "olmo2": False, "gemma": True, "gemma2": True, "gemma3_text": True,
                 "smollm3": True}
# transformers' per-family defaults for shape keys a config.json may omit, where they differ from
# the generic fallbacks (head_dim = hidden // heads, kv heads = heads, 2048 positions).
_FAMILY_DEFAULTS = {
    "gemma": {"head_dim": 256, "n_kv_heads": 16, "max_positions": 8192},
    "gemma2": {"head_dim": 256, "n_kv_heads": 4, "max_positions": 8192},
    "gemma3_text": {"head_dim": 256, "n_kv_heads": 4, "max_positions": 131072},
    "qwen3": {"head_dim": 128, "max_positions": 32768},
    "smollm3": {"n_kv_heads": 4, "max_positions": 32768},
    "phi3": {"max_positions": 4096},
}


def name_matches(layer: str, target: str) -> bool:
    """PEFT's ``target_modules`` rule on a layer's (dotted, per-block) name: equal, or ending
    with ``"." + target``; so ``c_proj`` matches GPT-2's ``attn.c_proj`` and ``mlp.c_proj``."""
    return ("." + layer).endswith("." + target)


def preset_modules(model_type: str, preset: str) -> tuple[str, ...]:
    """Concrete module names of a guide preset for an architecture."""
    arch = ARCHS[model_type]
    if preset == "attention-qv":
        return arch.attention_qv
    if preset == "attention":
        return arch.attention
    return tuple(dict.fromkeys(arch.attention + arch.mlp))  # attention-mlp, order kept


def linear_layers(shape: ModelShape) -> list[tuple[str, int, int]]:
    """(name, in, out) of every LoRA-targetable linear in one decoder layer.

    A name is qualified by its parent where the architecture reuses it (GPT-2's ``c_proj`` is
    both ``attn.c_proj`` and ``mlp.c_proj``); match targets with :func:`name_matches`.
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    t = shape.model_type
    if t == "gpt2":
        return [("c_attn", h, 3 * h), ("attn.c_proj", h, h), ("c_fc", h, i), ("mlp.c_proj", i, h)]
    if t == "bloom":
        return [("query_key_value", h, 3 * h), ("dense", h, h),
                ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h)]
    if t in ("opt", "gpt_neo", "gptj"):
        up, down = ARCHS[t].mlp
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("out_proj", q, h),
                (up, h, i), (down, i, h)]
    if t == "phi3":  # fused: q, k, v in one projection, gate and up in another
        return [("qkv_proj", h, q + 2 * kv), ("o_proj", q, h), ("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
    return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def count_params(shape: ModelShape) -> int:
    """Parameters from the shape: embeddings, (untied) head, decoder linears.

    Biases and norm scales are left out (< 0.1% of any catalog model).
    """
    per_layer = sum(n_in * n_out for _, n_in, n_out in linear_layers(shape))
    embed = shape.vocab * shape.hidden
    head = 0 if shape.tied_embeddings else embed
    positions = shape.max_positions * shape.hidden if ARCHS[shape.model_type].learned_positions else 0
    return shape.n_layers * per_layer + embed + head + positions


def _shape(name: str, source: str, model_type: str, n_layers: int, hidden: int, n_heads: int,
           vocab: int, max_positions: int, tied: bool, *, kv: int | None = None,
           head_dim: int | None = None, inter: int | None = None) -> ModelShape:
    arch = ARCHS[model_type]
    draft = ModelShape(
        name=name, source=source, model_type=model_type, params=0, n_layers=n_layers,
        hidden=hidden, n_heads=n_heads, n_kv_heads=kv or n_heads,
        head_dim=head_dim or hidden // n_heads, intermediate=inter or 4 * hidden, vocab=vocab,
        max_positions=max_positions, tied_embeddings=tied,
        attention_modules=arch.attention, mlp_modules=arch.mlp,
    )
    return draft.model_copy(update={"params": count_params(draft)})


def _entries() -> list[tuple[tuple[str, ...], ModelShape]]:
    c = "catalog"
    g2, neo, opt, bl = 50257, 50257, 50272, 250880
    llama3, qwen = 128256, 151936
    return [
        (("openai-community/gpt2", "gpt2-small"), _shape("gpt2", c, "gpt2", 12, 768, 12, g2, 1024, True)),
        (("openai-community/gpt2-medium",), _shape("gpt2-medium", c, "gpt2", 24, 1024, 16, g2, 1024, True)),
        (("openai-community/gpt2-large",), _shape("gpt2-large", c, "gpt2", 36, 1280, 20, g2, 1024, True)),
        (("openai-community/gpt2-xl",), _shape("gpt2-xl", c, "gpt2", 48, 1600, 25, g2, 1024, True)),
        ((), _shape("facebook/opt-125m", c, "opt", 12, 768, 12, opt, 2048, True)),
        ((), _shape("facebook/opt-350m", c, "opt", 24, 1024, 16, opt, 2048, True)),
        ((), _shape("facebook/opt-1.3b", c, "opt", 24, 2048, 32, opt, 2048, True)),
        ((), _shape("facebook/opt-2.7b", c, "opt", 32, 2560, 32, opt, 2048, True)),
        ((), _shape("facebook/opt-6.7b", c, "opt", 32, 4096, 32, opt, 2048, True)),
        ((), _shape("EleutherAI/gpt-neo-125M", c, "gpt_neo", 12, 768, 12, neo, 2048, True)),
        ((), _shape("EleutherAI/gpt-neo-1.3B", c, "gpt_neo", 24, 2048, 16, neo, 2048, True)),
        ((), _shape("EleutherAI/gpt-neo-2.7B", c, "gpt_neo", 32, 2560, 20, neo, 2048, True)),
        (("gpt-j-6b",), _shape("EleutherAI/gpt-j-6B", c, "gptj", 28, 4096, 16, 50400, 2048, False)),
        # BLOOM uses ALiBi (no position limit); 2048 is its training sequence length.
        ((), _shape("bigscience/bloom-560m", c, "bloom", 24, 1024, 16, bl, 2048, True)),
        ((), _shape("bigscience/bloom-1b1", c, "bloom", 24, 1536, 16, bl, 2048, True)),
        ((), _shape("bigscience/bloom-1b7", c, "bloom", 24, 2048, 16, bl, 2048, True)),
        ((), _shape("bigscience/bloom-3b", c, "bloom", 30, 2560, 32, bl, 2048, True)),
        ((), _shape("bigscience/bloom-7b1", c, "bloom", 30, 4096, 32, bl, 2048, True)),
        (("llama-2-7b",), _shape("meta-llama/Llama-2-7b-hf", c, "llama", 32, 4096, 32, 32000, 4096,
                                 False, inter=11008)),
        ((), _shape("meta-llama/Llama-3.2-1B", c, "llama", 16, 2048, 32, llama3, 131072, True,
                    kv=8, head_dim=64, inter=8192)),
        ((), _shape("meta-llama/Llama-3.2-3B", c, "llama", 28, 3072, 24, llama3, 131072, True,
                    kv=8, head_dim=128, inter=8192)),
        (("meta-llama/Meta-Llama-3.1-8B",),
         _shape("meta-llama/Llama-3.1-8B", c, "llama", 32, 4096, 32, llama3, 131072, False,
                kv=8, inter=14336)),
        (("meta-llama/Meta-Llama-3.1-70B",),
         _shape("meta-llama/Llama-3.1-70B", c, "llama", 80, 8192, 64, llama3, 131072, False,
                kv=8, inter=28672)),
        (("mistral-7b",), _shape("mistralai/Mistral-7B-v0.1", c, "mistral", 32, 4096, 32, 32000, 32768,
                                 False, kv=8, inter=14336)),
        ((), _shape("google/gemma-2b", c, "gemma", 18, 2048, 8, 256000, 8192, True,
                    kv=1, head_dim=256, inter=16384)),
        ((), _shape("google/gemma-7b", c, "gemma", 28, 3072, 16, 256000, 8192, True,
                    kv=16, head_dim=256, inter=24576)),
        ((), _shape("Qwen/Qwen2.5-0.5B", c, "qwen2", 24, 896, 14, qwen, 32768, True, kv=2, inter=4864)),
        ((), _shape("Qwen/Qwen2.5-1.5B", c, "qwen2", 28, 1536, 12, qwen, 131072, True, kv=2, inter=8960)),
        ((), _shape("Qwen/Qwen2.5-3B", c, "qwen2", 36, 2048, 16, qwen, 32768, True, kv=2, inter=11008)),
        ((), _shape("Qwen/Qwen2.5-7B", c, "qwen2", 28, 3584, 28, 152064, 131072, False,
                    kv=4, inter=18944)),
        ((), _shape("HuggingFaceTB/SmolLM2-135M", c, "llama", 30, 576, 9, 49152, 8192, True,
                    kv=3, inter=1536)),
        ((), _shape("HuggingFaceTB/SmolLM2-360M", c, "llama", 32, 960, 15, 49152, 8192, True,
                    kv=5, inter=2560)),
        ((), _shape("HuggingFaceTB/SmolLM2-1.7B", c, "llama", 24, 2048, 32, 49152, 8192, True,
                    inter=8192)),
        (("tinyllama", "tinyllama-1.1b"),
         _shape("TinyLlama/TinyLlama-1.1B-Chat-v1.0", c, "llama", 22, 2048, 32, 32000, 2048, False,
                kv=4, inter=5632)),
    ] + _qwen3_gemma_entries() + _phi_smollm_olmo_entries()


def _qwen3_gemma_entries() -> list[tuple[tuple[str, ...], ModelShape]]:
    """Qwen3, Gemma 2 and Gemma 3: each value as the model's config.json on the Hub has it.

    Gemma 3 4B/12B are vision-language checkpoints (model_type ``gemma3``); their entries are the
    language model (``text_config``, ``gemma3_text``), whose vocabulary is transformers' default
    262208 (the Hub's text_config leaves it out); the text-only 1B has 262144.
    """
    c, qwen, g2, g3 = "catalog", 151936, 256000, 262208
    return [
        ((), _shape("Qwen/Qwen3-0.6B", c, "qwen3", 28, 1024, 16, qwen, 40960, True,
                    kv=8, head_dim=128, inter=3072)),
        ((), _shape("Qwen/Qwen3-1.7B", c, "qwen3", 28, 2048, 16, qwen, 40960, True,
                    kv=8, head_dim=128, inter=6144)),
        ((), _shape("Qwen/Qwen3-4B", c, "qwen3", 36, 2560, 32, qwen, 40960, True,
                    kv=8, head_dim=128, inter=9728)),
        ((), _shape("Qwen/Qwen3-8B", c, "qwen3", 36, 4096, 32, qwen, 40960, False,
                    kv=8, head_dim=128, inter=12288)),
        ((), _shape("Qwen/Qwen3-14B", c, "qwen3", 40, 5120, 40, qwen, 40960, False,
                    kv=8, head_dim=128, inter=17408)),
        (("gemma2-2b",), _shape("google/gemma-2-2b", c, "gemma2", 26, 2304, 8, g2, 8192, True,
                                kv=4, head_dim=256, inter=9216)),
        (("gemma2-9b",), _shape("google/gemma-2-9b", c, "gemma2", 42, 3584, 16, g2, 8192, True,
                                kv=8, head_dim=256, inter=14336)),
        (("gemma-3-1b", "gemma3-1b"),
         _shape("google/gemma-3-1b-pt", c, "gemma3_text", 26, 1152, 4, 262144, 32768, True,
                kv=1, head_dim=256, inter=6912)),
        (("gemma-3-4b", "gemma3-4b"),
         _shape("google/gemma-3-4b-pt", c, "gemma3_text", 34, 2560, 8, g3, 131072, True,
                kv=4, head_dim=256, inter=10240)),
        (("gemma-3-12b", "gemma3-12b"),
         _shape("google/gemma-3-12b-pt", c, "gemma3_text", 48, 3840, 16, g3, 131072, True,
                kv=8, head_dim=256, inter=15360)),
    ]


def _phi_smollm_olmo_entries() -> list[tuple[tuple[str, ...], ModelShape]]:
    """Phi-3/Phi-4-mini (fused projections), SmolLM3 and OLMo 2, as their config.json has them."""
    c, phi3 = "catalog", 32064
    return [
        (("phi-3-mini", "phi-3-mini-4k"),
         _shape("microsoft/Phi-3-mini-4k-instruct", c, "phi3", 32, 3072, 32, phi3, 4096, False,
                inter=8192)),
        # Phi-3.5-mini has the 128k model's shape (3,821,079,552 parameters both).
        (("phi-3-mini-128k", "phi-3.5-mini"),
         _shape("microsoft/Phi-3-mini-128k-instruct", c, "phi3", 32, 3072, 32, phi3, 131072, False,
                inter=8192)),
        (("phi-4-mini",), _shape("microsoft/Phi-4-mini-instruct", c, "phi3", 32, 3072, 24, 200064, 131072,
                                 True, kv=8, inter=8192)),
        (("smollm3",), _shape("HuggingFaceTB/SmolLM3-3B", c, "smollm3", 36, 2048, 16, 128256, 65536, True,
                              kv=4, inter=11008)),
        (("olmo-2-1b", "olmo2-1b"),
         _shape("allenai/OLMo-2-0425-1B", c, "olmo2", 16, 2048, 16, 100352, 4096, False, inter=8192)),
        (("olmo-2-7b", "olmo2-7b"),
         _shape("allenai/OLMo-2-1124-7B", c, "olmo2", 32, 4096, 32, 100352, 4096, False, inter=11008)),
    ]


def _key(name: str) -> str:
    return name.lower().rsplit("/", 1)[-1]


CATALOG: dict[str, ModelShape] = {}
for _aliases, _s in _entries():
    for _alias in (_s.name, *_aliases):
        CATALOG[_key(_alias)] = _s

# Suffixes of fine-tuned variants that keep the base model's shape.
_VARIANT = re.compile(r"-(hf|instruct|chat|it|base|v\d+(\.\d+)*)$")

# No model given: the memory estimate assumes this shape (a modern 1.1B decoder, GQA,
# 32k vocabulary: the "Small-Medium" class of the guide's 12 GB row).
REFERENCE_MODEL = "tinyllama-1.1b"
# Size classes (--model-params) scale the layer count of the nearest llama-shaped entry.
_SIZE_LADDER = ("smollm2-135m", "smollm2-360m", "tinyllama-1.1b", "llama-2-7b")


def lookup(model_id: str) -> ModelShape | None:
    """A catalog entry by Hub id, case-insensitive, with or without org, ignoring variant suffixes."""
    key = _key(model_id)
    while True:
        if key in CATALOG:
            return CATALOG[key]
        stripped = _VARIANT.sub("", key)
        if stripped == key:
            return None
        key = stripped


def reference() -> ModelShape:
    return CATALOG[REFERENCE_MODEL].model_copy(update={"source": "reference"})


def size_class(params: float) -> ModelShape:
    """A llama-shaped model of about ``params`` parameters (layers scaled from the nearest shape)."""
    base = min((CATALOG[k] for k in _SIZE_LADDER), key=lambda s: abs(math.log(s.params / params)))
    fixed = base.params - base.n_layers * sum(i * o for _, i, o in linear_layers(base))
    per_layer = (base.params - fixed) / base.n_layers
    layers = max(1, round((params - fixed) / per_layer))
    label = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"
    shape = base.model_copy(update={"name": f"size-class {label} ({base.name} shape, {layers} layers)",
                                    "source": "size-class", "n_layers": layers})
    return shape.model_copy(update={"params": count_params(shape)})


def _get(config: dict, field: str):
    for k in _KEYS[field]:
        if config.get(k) is not None:
            return config[k]
    return None


def from_config(config: dict, name: str) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` dict."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UnknownModel(
            f"{name}: architecture {model_type!r} is not one the advisor knows "
            f"({', '.join(sorted(ARCHS))}); pass --model-params with its size instead"
        )
    values = {f: _get(config, f) for f in _KEYS}
    for field, default in _FAMILY_DEFAULTS.get(model_type, {}).items():
        if values[field] is None:
            values[field] = default
    missing = [f for f in ("n_layers", "hidden", "n_heads", "vocab") if values[f] is None]
    if missing:
        raise AdviceError(f"{name}: config.json lacks {', '.join(missing)}")
    tied = config.get("tie_word_embeddings", _TIED_DEFAULT.get(model_type, True))
    return _shape(name, "config", model_type, int(values["n_layers"]), int(values["hidden"]),
                  int(values["n_heads"]), int(values["vocab"]), int(values["max_positions"] or 2048),
                  bool(tied), kv=values["n_kv_heads"], head_dim=values["head_dim"],
                  inter=values["intermediate"])


def hf_cache_dir(model_id: str) -> Path | None:
    """The newest snapshot of ``model_id`` in the local Hugging Face cache, if any."""
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    repo = Path(home) / ("models--" + model_id.replace("/", "--"))
    snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


def model_dir(model: str) -> Path | None:
    """The local folder holding ``model``'s config.json (a path, or its HF cache snapshot)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    return hf_cache_dir(model)


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdviceError(f"{folder} is a folder without config.json") from None
    except (OSError, ValueError) as exc:
        raise AdviceError(f"{file}: cannot read config.json ({exc})") from None


def resolve(model: str | None, model_params: float | None) -> tuple[ModelShape, str]:
    """The shape to advise for, and one line saying where it came from."""
    if model is not None:
        local = Path(model).expanduser()
        if local.is_dir():
            return from_config(_read_config(local), model), f"read {local / 'config.json'}"
        shape = lookup(model)
        if shape is not None:
            return shape, f"built-in catalog entry {shape.name}"
        folder = hf_cache_dir(model)
        if folder is not None:
            return from_config(_read_config(folder), model), f"read {folder / 'config.json'} (HF cache)"
        if model_params is None:
            raise UnknownModel(
                f"unknown model {model!r}: not in the offline catalog, not a local folder with "
                "config.json, not in the Hugging Face cache; pass --model-params with its size "
                "(e.g. 1.3B or 350M) or a local folder"
            )
        shape = size_class(model_params)
        return shape, f"{model!r} is not known offline: assumed a {shape.name}"
    if model_params is not None:
        shape = size_class(model_params)
        return shape, f"no model named: assumed a {shape.name}"
    shape = reference()
    return shape, (f"no model given: the estimate assumes the reference shape {shape.name} "
                   f"({shape.params / 1e9:.2f}B params); pass --model for yours")
