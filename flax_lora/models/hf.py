"""transformers' Flax causal LMs as :class:`CausalLM`: config, weights and tokenizer loading.

Weights come from a local folder or a Hub snapshot: ``flax_model.msgpack`` through
transformers, a PyTorch-layout ``model.safetensors`` through :func:`convert_pt_safetensors`
(no torch needed: keys renamed and kernels transposed against the Flax shape tree).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.models import CausalLM

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


def load_config(source: str):
    from transformers import AutoConfig

    folder = resolve(source)
    if not (folder / "config.json").is_file():
        raise UserError(f"model {source!r}: {folder} has no config.json")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"model {source!r}: unreadable config.json ({exc})") from None


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def from_config(config, *, dtype=jnp.float32, seed: int = 0, source: str = "config") -> CausalLM:
    """A random-initialised model (tests, the demo)."""
    cls = _flax_class(config)
    model = cls(config, dtype=dtype, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), (1, 1))  # eager init is 4x slower
    return CausalLM(model.module, _cast(params, dtype), config, config.model_type, source, dtype)


def convert_pt_safetensors(files: list[Path], shape_tree, base_prefix: str) -> dict:
    """PyTorch-layout safetensors -> a Flax params tree matching ``shape_tree`` (no torch).

    ``weight`` becomes ``kernel`` (2-D, transposed), ``embedding`` or ``scale`` by looking at
    which name the Flax tree has; the base-model prefix is added or dropped as needed. A tied
    ``lm_head`` missing from the file is filled from the input embedding.
    """
    from safetensors import safe_open

    want = flatten_dict(shape_tree)
    out = {}
    for f in files:
        with safe_open(str(f), framework="flax") as st:
            for key in st.keys():
                t = tuple(key.split("."))
                cands = [t, (base_prefix,) + t, t[1:] if t[0] == base_prefix else None]
                for c in filter(None, cands):
                    stem, leaf = c[:-1], c[-1]
                    if leaf == "weight":
                        for name in ("kernel", "embedding", "scale", "weight"):
                            if stem + (name,) in want:
                                c = stem + (name,)
                                break
                    if c in want:
                        arr = st.get_tensor(key)
                        if c[-1] == "kernel" and arr.ndim == 2:  # torch Linear [out, in] (Conv1D [in, out])
                            arr = arr.T
                        if arr.shape != want[c].shape:
                            raise UserError(f"weight {key}: shape {arr.shape}, model expects {want[c].shape}")
                        out[c] = arr
                        break
    missing = set(want) - set(out)
    head = [k for k in missing if k[0] == "lm_head"]
    emb = [k for k in out if k[-1] == "embedding" and ("embed_tokens" in k or "wte" in k or "word_embeddings" in k)]
    if head and emb and len(missing) == 1:  # tied embeddings
        out[head[0]] = out[emb[0]].T
        missing = set()
    if missing:
        raise UserError(f"weights missing {len(missing)} tensors, e.g. {'/'.join(sorted(missing)[0])}")
    return unflatten_dict(out)


def load_hf(source: str, config, *, dtype=jnp.float32) -> CausalLM:
    """Load pretrained weights with transformers' Flax class for ``config.model_type``."""
    from safetensors import safe_open

    cls = _flax_class(config)
    folder = resolve(source)
    shards = sorted(folder.glob("model*.safetensors"))
    if (folder / "flax_model.msgpack").is_file():
        model, params = cls.from_pretrained(str(folder), config=config, dtype=dtype, _do_init=False)
    elif shards:
        with safe_open(str(shards[0]), framework="flax") as st:
            fmt = (st.metadata() or {}).get("format", "pt")
        model = cls(config, dtype=dtype, _do_init=False)
        if fmt == "flax" and len(shards) == 1:
            from safetensors.flax import load_file

            params = unflatten_dict({tuple(k.split(".")): v for k, v in load_file(str(shards[0])).items()})
        else:
            params = convert_pt_safetensors(shards, model.params_shape_tree, cls.base_model_prefix)
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
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"model {source!r}: no usable tokenizer in {folder} ({exc})") from None
    return prepare_tokenizer(tok)


def save_pt_safetensors(folder: str | os.PathLike, params, config, base_prefix: str) -> Path:
    """Write ``params`` as a PyTorch-layout ``model.safetensors`` (+ config) — test fixtures."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in flatten_dict(params).items():
        v = np.asarray(v, np.float32)
        leaf = k[-1]
        if leaf == "kernel" and v.ndim == 2:
            v = v.T
        if leaf in ("kernel", "embedding", "scale"):
            leaf = "weight"
        tensors[".".join(k[:-1] + (leaf,))] = np.ascontiguousarray(v)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder
