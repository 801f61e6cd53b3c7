"""The project's native adapter directory: LoRA weights in safetensors plus a JSON config.

Layout of ``DIR``::

    adapter.safetensors   "<flax/module/path>/a" float32 [in, r], ".../b" float32 [r, out]
    adapter.json          r, alpha, dropout, use_rslora, scaling, target_modules,
                          base_model, model_type, linears {path: {kind, in, out}}

PEFT's layout lives in :mod:`flax_lora.adapters.peft`; finding and loading either kind in
:mod:`flax_lora.adapters.find`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from advisor.io import atomic_write_bytes, atomic_write_json
from flax_lora.lora import LinearInfo, LoraConfig

FORMAT = "flax-lora-adapter"
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"


def save_adapter(
    directory: str | Path,
    lora: Mapping,
    config: LoraConfig,
    linears: Mapping[str, LinearInfo],
    *,
    target_modules: list[str] | str,
    base_model: str,
    model_type: str,
) -> Path:
    """Write the adapter atomically (weights first, config last: the config marks it complete)."""
    from safetensors.numpy import save

    directory = Path(directory)
    tensors = {"/".join(k): np.asarray(v, dtype=np.float32) for k, v in flatten_dict(lora).items()}
    paths = sorted({k.rsplit("/", 1)[0] for k in tensors})
    atomic_write_bytes(directory / WEIGHTS, save(tensors))
    atomic_write_json(
        directory / CONFIG,
        {
            "format": FORMAT,
            "version": 1,
            "r": config.r,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "scaling": config.scaling,
            "target_modules": target_modules,
            "base_model": base_model,
            "model_type": model_type,
            "linears": {
                p: {"kind": linears[p].kind, "in": linears[p].in_features, "out": linears[p].out_features}
                for p in paths
            },
        },
    )
    return directory


def load_adapter(directory: str | Path) -> tuple[dict, LoraConfig, dict[str, LinearInfo], dict[str, Any]]:
    """Read an adapter directory: (lora tree, LoraConfig, linears, raw config)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{directory} is not an adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: not a {FORMAT} config")
    tensors = load_file(str(w_path))
    lora = unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()})
    config = LoraConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], use_rslora=meta["use_rslora"])
    linears = {p: LinearInfo(p, d["kind"], d["in"], d["out"]) for p, d in meta["linears"].items()}
    return lora, config, linears, meta


def module_missing(module: str, linears: Mapping[str, LinearInfo]) -> UserError:
    """The error for an adapter module the model lacks (native and PEFT loaders alike)."""
    names = sorted({p.rsplit("/", 1)[-1] for p in linears})
    return UserError(f"adapter module {module} does not exist in this model (its linear layers are named: "
                     f"{', '.join(names)}); was the adapter trained on another base model?")


def shape_mismatch(tensor: str, got: tuple, want: tuple, info: LinearInfo, r: int) -> UserError:
    """The error for an adapter tensor whose shape does not fit the model's linear."""
    return UserError(f"adapter tensor {tensor} has shape {got}, this model needs {want} "
                     f"({info.in_features} -> {info.out_features}, r={r}); was it trained on another base model?")


def check_against(lora: Mapping, r: int, linears: Mapping[str, LinearInfo]) -> None:
    """Every adapted module exists in the model with the shapes rank ``r`` needs (else a UserError)."""
    flat = flatten_dict(dict(lora))
    for key in sorted(flat):
        module, leaf = "/".join(key[:-1]), key[-1]
        info = linears.get(module)
        if info is None:
            raise module_missing(module, linears)
        want = {"a": (info.in_features, r), "b": (r, info.out_features)}.get(leaf)
        if want is None or tuple(flat[key].shape) != want:
            raise shape_mismatch(f"{module}/{leaf}", tuple(flat[key].shape), want, info, r)
