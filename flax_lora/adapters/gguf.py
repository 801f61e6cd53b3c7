"""GGUF export for llama.cpp (and Ollama, LM Studio): the merged model, or the adapter alone.

``export_gguf``: the base model with the adapter folded in (the merge of
:mod:`flax_lora.adapters.merged`), matrices in f16 or q8_0, norms and biases in f32, with the
architecture keys and the tokenizer (:mod:`flax_lora.adapters.gguf_vocab`) as llama.cpp's
``convert_hf_to_gguf.py`` writes them. ``export_gguf_lora``: the adapter as
``convert_lora_to_gguf.py`` writes it, for ``llama-cli --lora``: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, tensors ``<gguf name>.lora_a`` [r, in] and
``.lora_b`` [out, r] in f32. llama.cpp scales by ``alpha / r``, so rsLoRA's ``alpha / sqrt(r)`` is
written as the equivalent alpha (``scaling * r``).

Tensor names come from the ``gguf`` package's own HF -> GGUF map (``gguf.get_tensor_name_map``).
Llama-architecture files (llama, mistral, smollm3) hold q_proj / k_proj with each head's rows
reordered (:func:`permute_rows`): llama.cpp rotates adjacent pairs where transformers rotates
halves; the adapter's LoRA B of q / k gets the same row order, so ``B @ A`` stays the permuted delta.

The base is read from its unquantized checkpoint: a run trained with int8 / nf4 frozen weights
exports its float32 adapter over the original weights, as the merged export does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
from flax.traverse_util import flatten_dict

from flax_lora.adapters.gguf_vocab import add_vocab, tokenizer_folder
from flax_lora.adapters.merged import BaseOf, adapter_and_base, merged_tensors
from flax_lora.adapters.peft import torch_module, unstacked
from flax_lora.errors import UserError
from flax_lora.lora import lora_paths

GGUF_TYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class GgufFamily:
    """How llama.cpp's converter treats one of the project's model families."""

    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # Llama architecture: q/k rows reordered for llama.cpp's rope
    spm_first: bool = True  # try tokenizer.model (SentencePiece) before tokenizer.json
    llama_keys: bool = False  # LlamaModel's extra keys: vocab_size, rope.dimension_count, add_space_prefix
    windows: bool = False  # sliding windows are left to llama.cpp's defaults (Mistral: as the converter)


FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("LLAMA", permute_qk=True, llama_keys=True),
    "mistral": GgufFamily("LLAMA", permute_qk=True, llama_keys=True, windows=True),
    "qwen2": GgufFamily("QWEN2"),
    "qwen3": GgufFamily("QWEN3"),
    "smollm3": GgufFamily("SMOLLM3", permute_qk=True, llama_keys=True),
    "olmo2": GgufFamily("OLMO2", spm_first=False),
}


class Written(NamedTuple):
    """What an export wrote: the file, its size, llama.cpp architecture and tensor count, the base folder."""

    path: Path
    nbytes: int
    arch: str
    tensors: int
    base: Path


class Planned(NamedTuple):
    """One tensor to write: its GGUF name, ggml type and a thunk giving its float32 values."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # "F32", "F16", "Q8_0"
    values: Callable[[], np.ndarray]


def family_for(model_type: str | None) -> GgufFamily:
    """The GGUF treatment of ``model_type``, or a UserError naming the families that export."""
    if model_type not in FAMILIES:
        raise UserError(f"GGUF export supports {', '.join(FAMILIES)} models; this one is {model_type!r} "
                        "(use --format merged or peft)")
    return FAMILIES[model_type]


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (weight [out, in], bias [out] or LoRA B [out, r]) in llama.cpp's
    order: within each head, row ``i`` of the first half goes to ``2i`` and row ``i`` of the second
    half to ``2i + 1`` (rotated pairs adjacent instead of half a head apart)."""
    head = w.shape[0] // n_head
    return w.reshape(n_head, 2, head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(cfg: Mapping) -> tuple[int, int, int]:
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    return n_head, n_kv, cfg.get("head_dim") or cfg["hidden_size"] // n_head


def _orient(torch_name: str, w: np.ndarray, cfg: Mapping, fam: GgufFamily) -> np.ndarray:
    """``w`` (a weight, bias or LoRA B) in the row order llama.cpp reads for ``torch_name``."""
    if not fam.permute_qk:
        return w
    n_head, n_kv, _ = _heads(cfg)
    module = torch_name.rsplit(".", 1)[0]
    if module.endswith("self_attn.q_proj"):
        return permute_rows(w, n_head)
    if module.endswith("self_attn.k_proj"):
        return permute_rows(w, n_kv)
    return w


def _tensor_map(fam: GgufFamily, n_layers: int):
    import gguf

    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    return gguf.MODEL_ARCH_NAMES[arch], gguf.get_tensor_name_map(arch, n_layers)


def _gguf_name(tmap, torch_name: str, arch: str) -> str:
    name = tmap.get_name(torch_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"checkpoint tensor {torch_name} has no llama.cpp {arch} counterpart")
    return name


# ----------------------------------------------------------------------------- model config


def model_config(b: BaseOf) -> dict:
    """The base model's config with transformers' defaults filled in (what the converter reads),
    checked for what llama.cpp's architecture would compute differently."""
    from flax_lora.models.decoder import layer_specs, load_config

    fam = family_for(b.model_config.get("model_type"))
    config = load_config(b.folder)
    cfg = config.to_dict()
    if not fam.windows and any(s.window is not None for s in layer_specs(config)):
        raise UserError(f"{b.folder}: sliding-window layers; llama.cpp's {fam.arch.lower()} attends to the full context")
    if cfg["model_type"] == "smollm3":
        want = [int((i + 1) % 4 != 0) for i in range(cfg["num_hidden_layers"])]
        if list(cfg.get("no_rope_layers") or want) != want:
            raise UserError(f"{b.folder}: llama.cpp's smollm3 skips rope on every 4th layer; this config's "
                            f"no_rope_layers is {cfg['no_rope_layers']}")
    return cfg


def _rope(cfg: Mapping) -> tuple[dict, float]:
    """(rope scaling dict with its ``rope_type``, rope theta), from transformers 4.x or 5.x keys."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    if params["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise UserError(f"rope_scaling type {params['rope_type']!r} has no llama.cpp equivalent here "
                        "(default, linear, yarn, llama3)")
    return params, float(theta)


def _add_rope(w, cfg: Mapping) -> None:
    import gguf

    rs, theta = _rope(cfg)
    if rs["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif rs["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs.get("original_max_position_embeddings")
                                        or cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
        rs.setdefault("attention_factor", rs.get("attn_factor"))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rs.get(key) is not None:
                add(rs[key])
    w.add_rope_freq_base(theta)


def rope_freqs(cfg: Mapping) -> np.ndarray | None:
    """Llama 3.1's rope scaling as llama.cpp takes it: ``rope_freqs.weight``, one divisor per
    frequency (1 for short wavelengths, ``factor`` for long ones, interpolated between)."""
    rs, theta = _rope(cfg)
    if rs["rope_type"] != "llama3":
        return None
    _, _, dim = _heads(cfg)
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, mid)).astype(np.float32)


def _add_arch_keys(w, cfg: Mapping, fam: GgufFamily, file_type: int) -> None:
    """The architecture keys of ``convert_hf_to_gguf`` (TextModel, plus LlamaModel's for the Llama
    architecture): ``<arch>.block_count``, ``context_length``, ... and ``general.file_type``."""
    n_head, n_kv, head_dim = _heads(cfg)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    _add_rope(w, cfg)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(file_type)
    if fam.llama_keys:
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim)


# ----------------------------------------------------------------------------- tensors


def _qtype(gguf_name: str, shape: tuple[int, ...], wanted: str) -> str:
    """The converter's rule: 1-D tensors, norms and biases f32; matrices ``wanted`` (q8_0 falls
    back to f16 when a row is not a whole number of 32-value blocks)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith((".weight", ".lora_a", ".lora_b")):
        return "F32"
    if wanted == "Q8_0" and shape[-1] % 32:
        return "F16"
    return wanted


def model_plan(tensors: Mapping[str, np.ndarray], cfg: Mapping, fam: GgufFamily, wanted: str) -> list[Planned]:
    """Every tensor of the merged model under its GGUF name, in its ggml type (``wanted``: F16 / Q8_0)."""
    arch, tmap = _tensor_map(fam, cfg["num_hidden_layers"])
    plan = []
    freqs = rope_freqs(cfg)
    if freqs is not None:
        plan.append(Planned("rope_freqs.weight", freqs.shape, "F32", lambda f=freqs: f))
    tied = bool(cfg.get("tie_word_embeddings"))
    for key, t in tensors.items():
        if key.endswith(".rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # not weights / llama.cpp uses token_embd when output.weight is absent
        name = _gguf_name(tmap, key, arch)
        shape = tuple(t.shape)

        def values(key=key, t=t):
            return _orient(key, np.asarray(t, dtype=np.float32), cfg, fam)

        plan.append(Planned(name, shape, _qtype(name, shape, wanted), values))
    return plan


def lora_plan(b: BaseOf, cfg: Mapping, fam: GgufFamily) -> list[Planned]:
    """``<gguf name>.lora_a`` = A^T [r, in] and ``.lora_b`` = B^T [out, r] (rows oriented as the
    base weight's) for each adapted module, float32."""
    arch, tmap = _tensor_map(fam, cfg["num_hidden_layers"])
    tree = unstacked(b.lora)
    flat = flatten_dict(tree)
    plan = []
    for path in lora_paths(tree):
        key = torch_module(path) + ".weight"
        if key.endswith("lm_head.weight") and cfg.get("tie_word_embeddings"):
            raise UserError("the adapter changes lm_head, which is tied to the input embedding: "
                            "llama.cpp cannot apply it (export --format gguf merges what it can't)")
        name = _gguf_name(tmap, key, arch)
        a = np.asarray(flat[tuple(path.split("/")) + ("a",)], np.float32)
        bm = np.asarray(flat[tuple(path.split("/")) + ("b",)], np.float32)
        lora_a = np.ascontiguousarray(a.T)
        lora_b = np.ascontiguousarray(_orient(key, bm.T, cfg, fam))
        plan.append(Planned(name + ".lora_a", lora_a.shape, "F32", lambda x=lora_a: x))
        plan.append(Planned(name + ".lora_b", lora_b.shape, "F32", lambda x=lora_b: x))
    return plan


def _encoded(p: Planned) -> np.ndarray:
    """``p``'s values in its ggml type, as the bytes the file holds."""
    import gguf

    x = p.values()
    if p.qtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if p.qtype == "F16":
        return np.ascontiguousarray(x, dtype=np.float16)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[p.qtype])


def _declare(w, p: Planned) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[p.qtype]
    if p.qtype in ("F32", "F16"):
        dtype = np.dtype(np.float32 if p.qtype == "F32" else np.float16)
        w.add_tensor_info(p.name, p.shape, dtype, math.prod(p.shape) * dtype.itemsize, raw_dtype=qtype)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
        w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


def write_gguf(out: Path, w, plan: list[Planned]) -> int:
    """Write header, keys and tensors of ``w`` to ``out`` atomically, one tensor in memory at a
    time (a 8B model is never held converted in full); returns the file size."""
    for p in plan:
        _declare(w, p)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:
            w.write_tensor_data(_encoded(p))
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


# ----------------------------------------------------------------------------- exports


def _adapter_and_base(src: str | Path, base: str | Path | None) -> BaseOf:
    """A run directory's (or an adapter folder's) native adapter with its base model."""
    from flax_lora.adapters.find import find_adapter

    folder, _ = find_adapter(src, kinds=("native",))
    return adapter_and_base(folder, base)


def _writer(arch: str, name: str, kind: str):
    import gguf

    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type(kind)
    w.add_name(name)
    return w


def export_gguf(src: str | Path, out: str | Path, base: str | Path | None = None, gguf_type: str = "f16") -> Written:
    """The merged model (the adapter of run / adapter folder ``src`` folded into its base) as one
    GGUF file llama.cpp loads."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    b = _adapter_and_base(src, base)
    fam = family_for(b.model_config.get("model_type"))
    cfg = model_config(b)
    vocab_dir = tokenizer_folder(b.run_dir / "tokenizer", b.folder)
    arch, _ = _tensor_map(fam, cfg["num_hidden_layers"])
    plan = model_plan(merged_tensors(b), cfg, fam, gguf_type.upper())
    w = _writer(arch, b.run_dir.name, gguf.GGUFType.MODEL)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    _add_arch_keys(w, cfg, fam, int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, vocab_dir, cfg["vocab_size"], spm_first=fam.spm_first)
    if fam.llama_keys:
        prefix = _json_key(vocab_dir / "tokenizer_config.json", "add_prefix_space")
        if prefix is not None:
            w.add_add_space_prefix(bool(prefix))
    return Written(Path(out), write_gguf(Path(out), w, plan), arch, len(plan), b.folder)


def export_gguf_lora(src: str | Path, out: str | Path, base: str | Path | None = None) -> Written:
    """The adapter ``src`` alone as a llama.cpp LoRA GGUF (``llama-cli -m BASE.gguf --lora FILE``)."""
    import gguf

    b = _adapter_and_base(src, base)
    fam = family_for(b.model_config.get("model_type"))
    cfg = model_config(b)
    arch, _ = _tensor_map(fam, cfg["num_hidden_layers"])
    plan = lora_plan(b, cfg, fam)
    w = _writer(arch, b.run_dir.name, gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(b.config.scaling * b.config.r))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return Written(Path(out), write_gguf(Path(out), w, plan), arch, len(plan), b.folder)


def _json_key(path: Path, key: str):
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None
    except ValueError:
        return None
