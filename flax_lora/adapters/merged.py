"""A merged Hugging Face checkpoint: the adapter folded into the base weights (PyTorch layout).

The base model is read from its folder (safetensors, single or sharded, or a Flax msgpack);
each adapted weight becomes ``W + scaling * (A B)`` in its own dtype; the config and tokenizer
files are copied beside it, so the folder loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
from flax.traverse_util import flatten_dict

from advisor.io import atomic_write_json
from flax_lora.adapters.native import CONFIG as NATIVE_CONFIG
from flax_lora.adapters.native import load_adapter
from flax_lora.adapters.peft import torch_module, unstacked
from flax_lora.errors import UserError
from flax_lora.lora import LinearInfo, LoraConfig, lora_paths
from flax_lora.models.hub import TORCH_DTYPES, resolve

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def resolve_base(base: str) -> Path:
    """Local folder of the base model: a path, or a Hub id in the local cache / downloadable."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    return resolve(base)


def _base_tensors(folder: Path) -> dict[str, np.ndarray]:
    from flax_lora.models.weights import INDEX, SINGLE, flax_to_torch, read_checkpoint

    if (folder / SINGLE).is_file() or (folder / INDEX).is_file():
        return read_checkpoint(folder)
    if (folder / "flax_model.msgpack").is_file():
        from flax.serialization import msgpack_restore

        params = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        return flax_to_torch(params.get("params", params))
    raise UserError(f"{folder}: no model.safetensors, sharded safetensors or flax_model.msgpack to merge into")


def _find(tensors: Mapping[str, np.ndarray], key: str) -> str | None:
    if key in tensors:
        return key
    short = key.split(".", 1)[1] if "." in key else key  # checkpoints saved from the base model (gpt2: h.0...)
    return short if short in tensors else None


def merged_state_dict(
    tensors: Mapping[str, np.ndarray], lora: Mapping, scaling: float, linears: Mapping[str, LinearInfo], tied: bool = False
) -> dict[str, np.ndarray]:
    """PyTorch state dict with ``W + scaling * (A B)`` folded in, each weight keeping its dtype."""
    out = dict(tensors)
    flat = flatten_dict(unstacked(lora))
    for path in lora_paths(unstacked(lora)):
        key = torch_module(path) + ".weight"
        found = _find(tensors, key)
        if found is None:
            raise UserError(f"base model has no weight {key} for adapter module {path}; was the adapter trained on another base model?")
        if tied and path.rsplit("/", 1)[-1] == "lm_head":
            raise UserError("the adapter changes lm_head, which is tied to the input embedding: cannot merge")
        w = tensors[found]
        k = tuple(path.split("/"))
        delta = scaling * (np.asarray(flat[k + ("a",)], np.float32) @ np.asarray(flat[k + ("b",)], np.float32))
        kind = linears[path].kind if path in linears else "dense"
        delta = delta if kind == "conv1d" else delta.T  # torch Linear [out, in]; Conv1D [in, out]
        if tuple(w.shape) != delta.shape:
            raise UserError(f"base weight {found} has shape {tuple(w.shape)}, the adapter needs {delta.shape} for {path}")
        out[found] = (np.asarray(w, np.float32) + delta).astype(w.dtype)
    return out


def _clean_config(cfg: dict, dtype: str) -> dict:
    """config.json without transformers-Flax's ``"dtype": "numpy"`` defect."""
    cfg = dict(cfg)
    for key in ("dtype", "torch_dtype"):
        if key in cfg and cfg[key] not in TORCH_DTYPES:
            cfg[key] = dtype
    cfg.setdefault("torch_dtype" if "torch_dtype" in cfg else "dtype", dtype)
    return cfg


class BaseOf(NamedTuple):
    """An adapter with the base model it was trained on, resolved to a local folder."""

    lora: dict
    config: LoraConfig
    linears: dict[str, LinearInfo]
    meta: dict
    run_dir: Path  # the run directory (or the adapter folder when it is not inside one)
    folder: Path  # the base model's folder
    model_config: dict  # the base model's config.json


def adapter_and_base(src: str | Path, base: str | Path | None = None) -> BaseOf:
    """Load the native adapter ``src`` and find its base model (``base``, else the adapter's
    ``base_model``, relative to where training ran), checked to be the family it was trained on."""
    src = Path(src)
    lora, config, linears, meta = load_adapter(src)
    base = str(base or meta.get("base_model") or "")
    if not base:
        raise UserError(f"{src / NATIVE_CONFIG}: no base_model; pass --base")
    run_dir = src.parent if src.name == "adapter" else src
    rel = run_dir.parent / base  # a relative base_model is relative to where training ran
    folder = resolve_base(str(rel) if not Path(base).expanduser().exists() and rel.is_dir() else base)
    if not (folder / "config.json").is_file():
        raise UserError(f"base model {base!r}: {folder} has no config.json")
    cfg = json.loads((folder / "config.json").read_text())
    if meta.get("model_type") and cfg.get("model_type") and meta["model_type"] != cfg["model_type"]:
        raise UserError(f"adapter was trained on a {meta['model_type']} model, base {base!r} is {cfg['model_type']}")
    return BaseOf(lora, config, linears, meta, run_dir, folder, cfg)


def merged_tensors(b: BaseOf) -> dict[str, np.ndarray]:
    """The base model's PyTorch state dict with ``b``'s adapter folded in (each weight in its dtype)."""
    return merged_state_dict(_base_tensors(b.folder), b.lora, b.config.scaling, b.linears,
                             tied=bool(b.model_config.get("tie_word_embeddings", False)))


def export_merged(src: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """A full Hugging Face checkpoint (PyTorch layout) with the native adapter ``src`` folded into the base weights."""
    from flax_lora.models.weights import write_checkpoint

    b = adapter_and_base(src, base)
    run_dir, folder, cfg = b.run_dir, b.folder, b.model_config
    tensors = merged_tensors(b)
    out = Path(out)
    float_dtypes = {str(t.dtype) for t in tensors.values() if t.dtype.kind == "f" or str(t.dtype) == "bfloat16"}
    dtype = "bfloat16" if "bfloat16" in float_dtypes else ("float16" if float_dtypes == {"float16"} else "float32")
    write_checkpoint(out, tensors)
    atomic_write_json(out / "config.json", _clean_config(cfg, dtype))
    for name in TOKENIZER_FILES:
        for cand in (run_dir / name, run_dir / "tokenizer" / name, folder / name):
            if cand.is_file():
                shutil.copyfile(cand, out / name)
                break
    return out
