"""transformers' Flax causal LMs as :class:`CausalLM`: config, weights and tokenizer loading.

Weights come from a local folder or a Hub snapshot: ``flax_model.msgpack`` through
transformers, a PyTorch-layout ``model.safetensors`` through
:func:`flax_lora.models.weights.torch_to_flax` (no torch needed). Remote code is never run: a
config with ``auto_map`` for a model type we do not implement is refused, and transformers is
always called with ``trust_remote_code=False``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.models import CausalLM


class _HideFlaxDeprecation(logging.Filter):
    """transformers 4.57 warns on every Flax model that v5 drops them; this project pins
    ``<5`` on purpose (and ports the families it depends on), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorFlow and JAX classes are deprecated" not in record.getMessage()


logging.getLogger("transformers.modeling_flax_utils").addFilter(_HideFlaxDeprecation())

SUPPORTED = ("gpt2", "opt", "gpt_neo", "gptj", "bloom", "llama", "mistral", "gemma")
_WEIGHT_FILES = ["config.json", "*.safetensors", "flax_model.msgpack", "*.json", "*.model", "*.txt"]


def _flax_class(config):
    from transformers import FlaxAutoModelForCausalLM
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"model type {config.model_type!r} has no Flax causal LM in transformers; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return FlaxAutoModelForCausalLM._model_mapping[type(config)]


def resolve(source: str) -> Path:
    """A local folder holding the model: ``source`` itself, or a Hub snapshot (cache or download)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"model {source!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=_WEIGHT_FILES))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise UserError(
            f"model {source!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"({type(exc).__name__}); pass a local folder with config.json and weights"
        ) from None


_TORCH_DTYPES = (None, "float32", "float16", "bfloat16", "float64", "auto")


def read_config_json(folder: Path, source: str) -> dict:
    """config.json as a dict, refused when it asks for remote code, minus an invalid dtype."""
    import json

    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"model {source!r}: {folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"model {source!r}: unreadable config.json ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"model {source!r}: config.json has no model_type")
    if raw.get("auto_map") and raw["model_type"] not in SUPPORTED + _ports():
        raise UserError(
            f"model {source!r}: config.json asks to run the model's own Python code (auto_map: "
            f"{', '.join(sorted(raw['auto_map']))}); lora never runs remote code. Supported model types: "
            f"{', '.join(SUPPORTED)}"
        )
    for key in ("dtype", "torch_dtype"):  # transformers' Flax save_pretrained writes "dtype": "numpy"
        if raw.get(key) not in _TORCH_DTYPES:
            raw.pop(key)
    raw.pop("auto_map", None)  # a supported model type runs our code, never the folder's
    return raw


def _ports() -> tuple[str, ...]:
    from flax_lora.models.llama import MODEL_TYPES

    return tuple(MODEL_TYPES)


def load_config(source: str):
    """The transformers config of a model folder or Hub id; remote code is never trusted."""
    from transformers import AutoConfig

    raw = read_config_json(resolve(source), source)
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model {source!r}: unusable config.json ({str(exc).splitlines()[0][:300]})") from None


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config") -> CausalLM:
    """A random-initialised model (tests, the demo)."""
    cls = _flax_class(config)
    model = cls(config, dtype=dtype, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), (1, 1))  # eager init is 4x slower
    return CausalLM(model.module, _cast(params, dtype), config, config.model_type, source, dtype)


def _tied_embedding(shape_tree) -> tuple[str, ...] | None:
    """Flax path of the input embedding (fills a tied ``lm_head`` a checkpoint omits)."""
    for path in flatten_dict(shape_tree):
        if path[-1] == "embedding" and any(n in path for n in ("wte", "embed_tokens", "word_embeddings")):
            return path
    return None


def _read_safetensors(files: list[Path], source: str) -> tuple[dict[str, np.ndarray], str]:
    """(tensors, format metadata) of safetensors files; a corrupt file is a UserError."""
    from flax_lora.models.weights import read_safetensors_file, read_safetensors_metadata

    tensors: dict[str, np.ndarray] = {}
    fmt = "pt"
    for f in files:
        try:
            fmt = (read_safetensors_metadata(f) or {}).get("format", fmt)
            tensors.update(read_safetensors_file(f))
        except UserError:
            raise
        except Exception as exc:  # truncated, garbage header, offsets past the end
            raise UserError(f"model {source!r}: {f.name} is not a readable safetensors file "
                            f"({type(exc).__name__}: {exc}); re-download or re-save it") from None
    return tensors, fmt


def load_hf(source: str, config, *, dtype=jnp.float32) -> CausalLM:
    """Load pretrained weights with transformers' Flax class for ``config.model_type``.

    A PyTorch-layout ``model.safetensors`` (single or sharded) is mapped onto the Flax tree by
    :func:`flax_lora.models.weights.torch_to_flax`, without torch.
    """
    from flax_lora.models.weights import torch_to_flax

    cls = _flax_class(config)
    folder = resolve(source)
    shards = sorted(folder.glob("model*.safetensors"))
    if (folder / "flax_model.msgpack").is_file():
        try:
            model, params = cls.from_pretrained(str(folder), config=config, dtype=dtype, _do_init=False,
                                                trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"model {source!r}: unreadable flax_model.msgpack ({type(exc).__name__}: {exc})") from None
    elif shards:
        tensors, fmt = _read_safetensors(shards, source)
        model = cls(config, dtype=dtype, _do_init=False)
        if fmt == "flax":
            params = unflatten_dict({tuple(k.split(".")): v for k, v in tensors.items()})
        else:
            shape_tree = model.params_shape_tree
            params = torch_to_flax(tensors, shape_tree, tied_embedding=_tied_embedding(shape_tree))
    else:
        raise UserError(f"model {source!r}: no flax_model.msgpack or model.safetensors in {folder}")
    return CausalLM(model.module, _cast(params, dtype), config, config.model_type, source, dtype)


def prepare_tokenizer(tok):
    """Give a tokenizer without a pad token one (eos, masked out of the loss by our masks)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError("tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    folder = resolve(source)
    try:
        read_config_json(folder, source)  # refuses remote code before transformers looks at the folder
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {source!r}: no usable tokenizer in {folder} ({exc})") from None
    return prepare_tokenizer(tok)


def save_pt_safetensors(folder: str | os.PathLike, params, config, base_prefix: str = "") -> Path:
    """Write ``params`` as a PyTorch-layout ``model.safetensors`` (+ config) — test fixtures, the demo.

    The config is written first and the weights (atomically) last, so a folder whose
    ``model.safetensors`` exists is complete.
    """
    from flax_lora.models.weights import flax_to_torch, write_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    write_checkpoint(folder, flax_to_torch(params, dtype=np.float32))
    return folder
