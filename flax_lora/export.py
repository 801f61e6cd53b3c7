"""Adapters the PyTorch world can load: PEFT export/import and merged Hugging Face checkpoints.

Module names: every supported family's Flax port (ours for the Llama family, transformers' for
GPT-2, OPT, GPT-Neo, GPT-J, BLOOM, Gemma) mirrors the PyTorch module tree, so the torch module
path of a Flax module path is ``path.replace("/", ".")`` (``transformer/h/0/attn/c_attn`` ->
``transformer.h.0.attn.c_attn``; ``model/layers/0/self_attn/q_proj`` -> ``model.layers.0...``).

PEFT layout: ``base_model.model.<module>.lora_A.weight`` [r, in] = ``a.T`` and ``.lora_B.weight``
[out, r] = ``b.T``, for ``nn.Linear`` and GPT-2's ``Conv1D`` alike (PEFT derives in/out from the
Conv1D weight [in, out] and sets ``fan_in_fan_out`` only to merge).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.adapter import CONFIG as NATIVE_CONFIG
from flax_lora.adapter import load_adapter
from flax_lora.errors import UserError
from flax_lora.io import atomic_write_bytes, atomic_write_json
from flax_lora.lora import LinearInfo, LoraConfig, lora_paths

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
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
_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def torch_module(path: str) -> str:
    """PyTorch module path of a Flax module path (per-layer layout)."""
    return path.replace("/", ".")


def flax_module(name: str) -> str:
    return name.replace(".", "/")


def adapter_dir(path: str | Path) -> Path:
    """The native adapter directory of ``path``: ``RUN_DIR/adapter/`` or an adapter dir itself."""
    path = Path(path)
    for cand in (path / "adapter", path):
        if (cand / NATIVE_CONFIG).is_file():
            return cand
    if not path.exists():
        raise UserError(f"{path}: no such run or adapter directory")
    raise UserError(f"{path}: neither a run directory (with adapter/{NATIVE_CONFIG}) nor an adapter directory")


def _unstacked(lora: Mapping) -> dict:
    from flax_lora.models.llama import STACK, unstack_layers

    flat = flatten_dict(dict(lora))
    return unstack_layers(lora) if any(STACK in k for k in flat) else dict(lora)


# ----------------------------------------------------------------------------- PEFT export


def peft_target_modules(target_modules: Any, adapted: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly the adapted torch modules.

    Names (``c_proj``, ``attn/c_proj``) follow the same suffix rule in PEFT, with dots; a regex
    over ``/``-paths becomes the same regex over dotted names (``/`` -> ``\\.``), checked to
    match every adapted module, else the full module names are listed.
    """
    if isinstance(target_modules, (list, tuple)):
        return sorted({str(t).replace("/", ".") for t in target_modules})
    if isinstance(target_modules, str):
        regex = target_modules.replace("/", r"\.")
        try:
            if all(re.fullmatch(regex, m) for m in adapted):
                return regex
        except re.error:
            pass
    return sorted(adapted)


def peft_state_dict(lora: Mapping) -> dict[str, np.ndarray]:
    """PEFT tensor names and layouts for a native LoRA tree."""
    flat = flatten_dict(_unstacked(lora))
    out = {}
    for path in lora_paths(_unstacked(lora)):
        key = tuple(path.split("/"))
        name = PREFIX + torch_module(path)
        out[name + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(flat[key + ("a",)], np.float32).T)
        out[name + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(flat[key + ("b",)], np.float32).T)
    return out


def peft_config(config: LoraConfig, linears: Mapping[str, LinearInfo], target_modules, base_model: str) -> dict:
    """``adapter_config.json`` contents (the long-standing LoraConfig fields)."""
    adapted = [torch_module(p) for p in sorted(linears)]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": peft_target_modules(target_modules, adapted),
        "fan_in_fan_out": any(i.kind == "conv1d" for i in linears.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def export_peft(run_or_adapter: str | Path, out: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``."""
    from safetensors.numpy import save

    lora, config, linears, meta = load_adapter(adapter_dir(run_or_adapter))
    out = Path(out)
    tensors = peft_state_dict(lora)
    atomic_write_bytes(out / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    cfg = peft_config(config, linears, meta.get("target_modules"), str(meta.get("base_model") or ""))
    atomic_write_json(out / PEFT_CONFIG, cfg)
    return out


# ----------------------------------------------------------------------------- PEFT import


def load_peft_adapter(directory: str | Path, linears: Mapping[str, LinearInfo]) -> tuple[dict, LoraConfig]:
    """A PEFT LoRA adapter directory -> (native lora tree, LoraConfig), checked against ``linears``.

    ``linears`` are the model's linear modules (``CausalLM.linears()``). A module the model lacks,
    or a shape that does not fit, is a UserError naming the first one; PEFT features this
    project does not implement (DoRA, rank/alpha patterns, biases, modules_to_save) too.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise UserError(f"{directory}: not a PEFT adapter directory (no {PEFT_CONFIG})")
    if not w_path.is_file():
        extra = " (adapter_model.bin needs converting to safetensors)" if (directory / "adapter_model.bin").is_file() else ""
        raise UserError(f"{directory}: no {PEFT_WEIGHTS}{extra}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}, only LORA is supported")
    for key, ok in (
        ("use_dora", lambda v: not v),
        ("rank_pattern", lambda v: not v),
        ("alpha_pattern", lambda v: not v),
        ("bias", lambda v: v in (None, "none")),
        ("lora_bias", lambda v: not v),
        ("modules_to_save", lambda v: not v),
        ("layer_replication", lambda v: not v),
    ):
        if not ok(cfg.get(key)):
            raise UserError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    r = int(cfg["r"])
    config = LoraConfig(
        r=r,
        alpha=float(cfg.get("lora_alpha", r)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    tensors = load_file(str(w_path))
    stacked = {re.sub(r"/layers/stack/", "/layers/#/", p): i for p, i in linears.items()}
    flat: dict[tuple, np.ndarray] = {}
    for key in sorted(tensors):
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise UserError(f"{w_path}: tensor {key} is not a LoRA A/B weight (unsupported PEFT feature)")
        module, which = m.group(1), m.group(2)
        path = flax_module(module)
        info = linears.get(path) or stacked.get(re.sub(r"/layers/\d+/", "/layers/#/", path))
        if info is None:
            names = sorted({p.rsplit("/", 1)[-1] for p in linears})
            raise UserError(
                f"adapter module {module} does not exist in this model (its linear layers are named: "
                f"{', '.join(names)}); was the adapter trained on another base model?"
            )
        t = tensors[key]
        want = (r, info.in_features) if which == "A" else (info.out_features, r)
        if tuple(t.shape) != want:
            raise UserError(
                f"adapter tensor {key} has shape {tuple(t.shape)}, this model needs {want} "
                f"({info.in_features} -> {info.out_features}, r={r}); was it trained on another base model?"
            )
        flat[tuple(path.split("/")) + ("a" if which == "A" else "b",)] = np.ascontiguousarray(t.T.astype(np.float32))
    for path in {k[:-1] for k in flat}:
        for leaf in ("a", "b"):
            if path + (leaf,) not in flat:
                raise UserError(f"{w_path}: {'.'.join(path)} has no lora_{leaf.upper()} weight")
    if not flat:
        raise UserError(f"{w_path}: no LoRA weights")
    return unflatten_dict(flat), config


# ----------------------------------------------------------------------------- merged export


def resolve_base(base: str) -> Path:
    """Local folder of the base model: a path, or a Hub id in the local cache / downloadable."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from flax_lora.models.hf import resolve
    except ImportError:
        resolve = None
    if resolve is not None:
        return resolve(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base))
    except Exception as exc:
        raise UserError(f"base model {base!r}: not a local folder nor available from the Hub ({type(exc).__name__})") from None


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
    flat = flatten_dict(_unstacked(lora))
    for path in lora_paths(_unstacked(lora)):
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
        if key in cfg and cfg[key] not in _TORCH_DTYPES:
            cfg[key] = dtype
    cfg.setdefault("torch_dtype" if "torch_dtype" in cfg else "dtype", dtype)
    return cfg


def export_merged(run_or_adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """A full Hugging Face checkpoint (PyTorch layout) with the adapter folded into the base weights."""
    from flax_lora.models.weights import write_checkpoint

    src = adapter_dir(run_or_adapter)
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
    tensors = merged_state_dict(
        _base_tensors(folder), lora, config.scaling, linears, tied=bool(cfg.get("tie_word_embeddings", False))
    )
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
