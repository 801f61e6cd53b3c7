"""Where a model comes from: a local folder or a Hub snapshot, its config.json and tokenizer.

Remote code is never run: a config with ``auto_map`` for a model type the project does not
implement is refused, and transformers is always called with ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Collection

from flax_lora.errors import UserError

WEIGHT_FILES = ["config.json", "*.safetensors", "flax_model.msgpack", "*.json", "*.model", "*.txt"]
# dtype names a PyTorch config may hold; transformers' Flax save_pretrained writes "dtype": "numpy"
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")


def drop_bad_dtypes(raw: dict) -> dict:
    """config.json without a ``dtype`` / ``torch_dtype`` no PyTorch loader understands."""
    return {k: v for k, v in raw.items()
            if k not in ("dtype", "torch_dtype") or v in (None, "auto", *TORCH_DTYPES)}


def resolve(source: str) -> Path:
    """A local folder holding the model: ``source`` itself, or a Hub snapshot (cache or download)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"model {source!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=WEIGHT_FILES))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise UserError(
            f"model {source!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"({type(exc).__name__}); pass a local folder with config.json and weights"
        ) from None


def read_config_json(folder: Path, source: str, supported: Collection[str]) -> dict:
    """config.json as a dict, refused when it asks for remote code, minus an invalid dtype."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model {source!r}: {folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"model {source!r}: unreadable config.json ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"model {source!r}: config.json has no model_type")
    if raw.get("auto_map") and raw["model_type"] not in supported:
        raise UserError(
            f"model {source!r}: config.json asks to run the model's own Python code (auto_map: "
            f"{', '.join(sorted(raw['auto_map']))}); lora never runs remote code. Supported model types: "
            f"{', '.join(sorted(supported))}"
        )
    raw.pop("auto_map", None)  # a supported model type runs our code, never the folder's
    return drop_bad_dtypes(raw)


def config_from_json(raw: dict, source: str):
    """The transformers config class of ``raw`` (a checked config.json): its family's defaults for the
    keys the file omits. ``AutoConfig.for_model`` exists in transformers 4.57 and 5.x alike; what
    the two make of rotary settings differs, and :mod:`flax_lora.models.rope` reads both."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model {source!r}: unusable config.json ({str(exc).splitlines()[0][:300]})") from None


def load_config(source: str, supported: Collection[str]):
    """The transformers config of a model folder or Hub id; remote code is never trusted."""
    return config_from_json(read_config_json(resolve(source), source, supported), source)


def load_tokenizer(source: str, supported: Collection[str]):
    """The model's tokenizer (:class:`advisor.tokenizer.Tokenizer`), read from ``tokenizer.json`` and
    its configs; a folder without ``tokenizer.json`` goes through transformers' conversion once."""
    from advisor.tokenizer import Tokenizer

    folder = resolve(source)
    read_config_json(folder, source, supported)  # refuses remote code before anything looks at the folder
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_folder(folder)
    else:
        tok = _converted(folder, source)
    if tok.pad_id is None:
        raise UserError(f"model {source!r}: the tokenizer has neither a pad nor an eos token")
    return tok


def _converted(folder: Path, source: str):
    """A tokenizer without ``tokenizer.json`` (e.g. only a sentencepiece model), converted by transformers."""
    from transformers import AutoTokenizer

    from advisor.tokenizer import SPECIALS, Tokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, use_fast=True)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: 4.57 on a folder without vocabulary files
        raise UserError(f"model {source!r}: no usable tokenizer in {folder} ({exc})") from None
    if not getattr(hf, "is_fast", False):
        raise UserError(f"model {source!r}: its tokenizer has no fast (tokenizer.json) form")
    if hf.backend_tokenizer.get_vocab_size() <= len(set(getattr(hf, "all_special_tokens", ()))):
        # transformers 5 makes an empty tokenizer (special tokens only) of a folder without vocabulary files
        raise UserError(f"model {source!r}: no usable tokenizer in {folder} (no vocabulary: tokenizer.json, "
                        "tokenizer.model or vocab.json + merges.txt)")
    config = {k: getattr(hf, k, None) for k in SPECIALS}
    return Tokenizer(hf.backend_tokenizer, config, chat_template=getattr(hf, "chat_template", None), name=source)


def save_pt_safetensors(folder: str | os.PathLike, params, config) -> Path:
    """Write ``params`` as a PyTorch-layout ``model.safetensors`` (+ config) — test fixtures, the demo.

    The config is written first and the weights (atomically) last, so a folder whose
    ``model.safetensors`` exists is complete.
    """
    import numpy as np

    from flax_lora.models.weights import flax_to_torch, write_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    write_checkpoint(folder, flax_to_torch(params, dtype=np.float32))
    return folder
