"""The project's native adapter directory: LoRA weights in safetensors plus a JSON config.

Layout of ``DIR``::

    adapter.safetensors   "<flax/module/path>/a" float32 [in, r], ".../b" float32 [r, out]
    adapter.json          r, alpha, dropout, use_rslora, scaling, target_modules,
                          base_model, model_type, linears {path: {kind, in, out}}

PEFT export/import (PyTorch layout) lives in ``flax_lora.export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.io import atomic_write_bytes, atomic_write_json
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


def _kind_of(directory: Path) -> str:
    from flax_lora.export import PEFT_CONFIG

    if (directory / CONFIG).is_file():
        return "native"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    if not directory.exists():
        raise UserError(f"adapter {directory}: no such directory")
    raise UserError(f"adapter {directory}: neither a lora adapter ({CONFIG}) nor a PEFT adapter ({PEFT_CONFIG})")


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter directory: ``path`` itself (native or PEFT) or a run directory's ``adapter/``."""
    path = Path(path).expanduser()
    if not (path / CONFIG).is_file() and (path / "adapter" / CONFIG).is_file():
        return path / "adapter"
    _kind_of(path)
    return path


def adapter_settings(path: str | Path) -> dict[str, Any]:
    """r, alpha, use_rslora of an adapter directory (native or PEFT), read from its JSON only."""
    from flax_lora.export import PEFT_CONFIG

    directory = resolve_adapter_dir(path)
    native = _kind_of(directory) == "native"
    cfg_path = directory / (CONFIG if native else PEFT_CONFIG)
    try:
        meta = json.loads(cfg_path.read_text())
        return {"r": int(meta["r"]), "alpha": float(meta["alpha" if native else "lora_alpha"]),
                "use_rslora": bool(meta.get("use_rslora", False))}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{cfg_path}: not a usable adapter config ({type(exc).__name__}: {exc})") from None


def load_any_adapter(path: str | Path, linears: Mapping[str, LinearInfo], model_type: str | None = None
                     ) -> tuple[dict, LoraConfig]:
    """(lora tree, LoraConfig) of a native or PEFT adapter directory, checked against the model.

    ``linears`` are the model's linear layers; a module the model lacks or a shape that does not
    fit is a UserError naming the first mismatch.
    """
    directory = resolve_adapter_dir(path)
    if _kind_of(directory) == "peft":
        from flax_lora.export import load_peft_adapter

        return load_peft_adapter(directory, linears)
    try:
        lora, config, _, meta = load_adapter(directory)
    except (KeyError, TypeError, ValueError) as exc:  # safetensors / config fields
        if isinstance(exc, UserError):
            raise
        raise UserError(f"adapter {directory}: unreadable ({type(exc).__name__}: {exc})") from None
    if model_type and meta.get("model_type") and meta["model_type"] != model_type:
        raise UserError(f"adapter {directory} was trained on a {meta['model_type']} model, this model is {model_type}")
    flat = flatten_dict(lora)
    for key in sorted(flat):
        module, leaf = "/".join(key[:-1]), key[-1]
        info = linears.get(module)
        if info is None:
            names = sorted({p.rsplit("/", 1)[-1] for p in linears})
            raise UserError(f"adapter module {module} does not exist in this model (its linear layers are named: "
                            f"{', '.join(names)}); was the adapter trained on another base model?")
        want = {"a": (info.in_features, config.r), "b": (config.r, info.out_features)}.get(leaf)
        if want is None or tuple(flat[key].shape) != want:
            raise UserError(f"adapter tensor {module}/{leaf} has shape {tuple(flat[key].shape)}, this model needs "
                            f"{want} ({info.in_features} -> {info.out_features}, r={config.r}); "
                            "was it trained on another base model?")
    return lora, config
