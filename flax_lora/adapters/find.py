"""Finding an adapter on disk (a run directory, a native or a PEFT adapter folder) and loading it.

One place decides what a path names, so ``lora train --adapter``, ``lora generate --adapter``
and ``lora export`` accept the same things and give the same errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

from flax_lora.adapters.native import CONFIG, check_against, load_adapter
from flax_lora.adapters.peft import PEFT_CONFIG, load_peft_adapter
from flax_lora.errors import UserError
from flax_lora.lora import LinearInfo, LoraConfig

Kind = Literal["native", "peft"]


def find_adapter(path: str | Path, kinds: tuple[Kind, ...] = ("native", "peft")) -> tuple[Path, Kind]:
    """(adapter folder, kind) for ``path``: an adapter folder itself or a run directory's ``adapter/``."""
    path = Path(path).expanduser()
    for folder in (path, path / "adapter"):
        if "native" in kinds and (folder / CONFIG).is_file():
            return folder, "native"
        if "peft" in kinds and (folder / PEFT_CONFIG).is_file():
            return folder, "peft"
    if not path.exists():
        raise UserError(f"adapter {path}: no such run or adapter directory")
    wanted = " or ".join({"native": f"a lora adapter ({CONFIG})", "peft": f"a PEFT adapter ({PEFT_CONFIG})"}[k]
                         for k in kinds)
    raise UserError(f"adapter {path}: neither a run directory nor {wanted}")


def adapter_settings(path: str | Path) -> dict[str, Any]:
    """r, alpha, use_rslora of an adapter (native or PEFT), read from its JSON only."""
    folder, kind = find_adapter(path)
    cfg_path = folder / (CONFIG if kind == "native" else PEFT_CONFIG)
    try:
        meta = json.loads(cfg_path.read_text())
        return {"r": int(meta["r"]), "alpha": float(meta["alpha" if kind == "native" else "lora_alpha"]),
                "use_rslora": bool(meta.get("use_rslora", False))}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{cfg_path}: not a usable adapter config ({type(exc).__name__}: {exc})") from None


def load_any_adapter(path: str | Path, linears: Mapping[str, LinearInfo], model_type: str | None = None
                     ) -> tuple[dict, LoraConfig]:
    """(lora tree, LoraConfig) of a native or PEFT adapter, checked against the model.

    ``linears`` are the model's linear layers; a module the model lacks or a shape that does not
    fit is a UserError naming the first mismatch.
    """
    folder, kind = find_adapter(path)
    if kind == "peft":
        return load_peft_adapter(folder, linears)
    try:
        lora, config, _, meta = load_adapter(folder)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # safetensors / config fields
        raise UserError(f"adapter {folder}: unreadable ({type(exc).__name__}: {exc})") from None
    if model_type and meta.get("model_type") and meta["model_type"] != model_type:
        raise UserError(f"adapter {folder} was trained on a {meta['model_type']} model, this model is {model_type}")
    check_against(lora, config.r, linears)
    return lora, config
