"""PEFT's adapter layout: export for ``PeftModel.from_pretrained`` and import of PEFT adapters.

Module names: every supported family's Flax port (the project's for the Llama family, Gemma and
GPT-2; transformers' for OPT, GPT-Neo, GPT-J, BLOOM) mirrors the PyTorch module tree, so the torch module
path of a Flax module path is ``path.replace("/", ".")`` (``transformer/h/0/attn/c_attn`` ->
``transformer.h.0.attn.c_attn``; ``model/layers/0/self_attn/q_proj`` -> ``model.layers.0...``).

PEFT layout: ``base_model.model.<module>.lora_A.weight`` [r, in] = ``a.T`` and ``.lora_B.weight``
[out, r] = ``b.T``, for ``nn.Linear`` and GPT-2's ``Conv1D`` alike (PEFT derives in/out from the
Conv1D weight [in, out] and sets ``fan_in_fan_out`` only to merge).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from advisor.io import atomic_write_bytes, atomic_write_json
from flax_lora.adapters.native import load_adapter, module_missing, shape_mismatch
from flax_lora.errors import UserError
from flax_lora.lora import LinearInfo, LoraConfig, lora_paths
from flax_lora.models.stacking import STACK, unstack_layers

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def torch_module(path: str) -> str:
    """PyTorch module path of a Flax module path (per-layer layout)."""
    return path.replace("/", ".")


def flax_module(name: str) -> str:
    return name.replace(".", "/")


def unstacked(lora: Mapping) -> dict:
    """The per-layer tree of an adapter that may hold scanned layers stacked."""
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
    flat = flatten_dict(unstacked(lora))
    out = {}
    for path in lora_paths(unstacked(lora)):
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


def export_peft(adapter: str | Path, out: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``
    from a native adapter directory."""
    from safetensors.numpy import save

    lora, config, linears, meta = load_adapter(adapter)
    out = Path(out)
    tensors = peft_state_dict(lora)
    atomic_write_bytes(out / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    cfg = peft_config(config, linears, meta.get("target_modules"), str(meta.get("base_model") or ""))
    atomic_write_json(out / PEFT_CONFIG, cfg)
    return out


# ----------------------------------------------------------------------------- PEFT import


_UNSUPPORTED = (  # PEFT LoraConfig features this project does not implement: (key, acceptable?)
    ("use_dora", lambda v: not v),
    ("rank_pattern", lambda v: not v),
    ("alpha_pattern", lambda v: not v),
    ("bias", lambda v: v in (None, "none")),
    ("lora_bias", lambda v: not v),
    ("modules_to_save", lambda v: not v),
    ("layer_replication", lambda v: not v),
)


def _read_peft_config(directory: Path) -> LoraConfig:
    """The LoraConfig of a PEFT adapter folder; a missing file or an unsupported feature is a UserError."""
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
    for key, ok in _UNSUPPORTED:
        if not ok(cfg.get(key)):
            raise UserError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    r = int(cfg["r"])
    return LoraConfig(r=r, alpha=float(cfg.get("lora_alpha", r)), dropout=float(cfg.get("lora_dropout", 0.0)),
                      use_rslora=bool(cfg.get("use_rslora", False)))


def load_peft_adapter(directory: str | Path, linears: Mapping[str, LinearInfo]) -> tuple[dict, LoraConfig]:
    """A PEFT LoRA adapter directory -> (native lora tree, LoraConfig), checked against ``linears``.

    ``linears`` are the model's linear modules (``CausalLM.linears()``). A module the model lacks,
    or a shape that does not fit, is a UserError naming the first one; PEFT features this
    project does not implement (DoRA, rank/alpha patterns, biases, modules_to_save) too.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = _read_peft_config(directory)
    r, w_path = config.r, directory / PEFT_WEIGHTS
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
            raise module_missing(module, linears)
        t = tensors[key]
        want = (r, info.in_features) if which == "A" else (info.out_features, r)
        if tuple(t.shape) != want:
            raise shape_mismatch(key, tuple(t.shape), want, info, r)
        flat[tuple(path.split("/")) + ("a" if which == "A" else "b",)] = np.ascontiguousarray(t.T.astype(np.float32))
    for path in {k[:-1] for k in flat}:
        for leaf in ("a", "b"):
            if path + (leaf,) not in flat:
                raise UserError(f"{w_path}: {'.'.join(path)} has no lora_{leaf.upper()} weight")
    if not flat:
        raise UserError(f"{w_path}: no LoRA weights")
    return unflatten_dict(flat), config
