"""transformers' Flax causal LMs as :class:`CausalLM`, for the legacy families without an own port
(OPT, GPT-Neo, GPT-J, BLOOM): the ``flax-legacy`` extra.

transformers' Flax model classes ended with 4.57 (v5 removed them), so this path needs
``pip install "lora[flax-legacy]"`` (transformers < 5); without them a legacy family is refused
with that hint (:func:`require_flax`). Weights come from a local folder or a Hub snapshot
(:mod:`flax_lora.models.hub`): ``flax_model.msgpack`` through transformers, a PyTorch-layout
``model.safetensors`` through :func:`flax_lora.models.weights.torch_to_flax` (no torch needed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError
from flax_lora.models.base import CausalLM
from flax_lora.models.hub import resolve


class _HideFlaxDeprecation(logging.Filter):
    """transformers 4.57 warns on every Flax model that v5 drops them; this path is the legacy
    extra on purpose (the families that matter have own ports), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorFlow and JAX classes are deprecated" not in record.getMessage()


logging.getLogger("transformers.modeling_flax_utils").addFilter(_HideFlaxDeprecation())

SUPPORTED = ("opt", "gpt_neo", "gptj", "bloom")  # the legacy families (the others have own ports)
INSTALL_HINT = 'pip install "lora[flax-legacy]"'


def flax_available() -> bool:
    """Whether the installed transformers still has its Flax model classes (< 5, with flax)."""
    try:
        from transformers import FlaxAutoModelForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def require_flax(model_type: str) -> None:
    """A one-line UserError naming the extra when transformers' Flax classes are absent."""
    if not flax_available():
        raise UserError(f"model type {model_type!r} needs transformers' Flax classes: {INSTALL_HINT}")


def _flax_class(config):
    """transformers' Flax class of a legacy family; any other model type is refused as unsupported
    (the extra would not help it), a legacy one without the Flax classes with the extra's hint."""
    if config.model_type not in SUPPORTED:
        from flax_lora.models import decoder, gpt2

        ports = ", ".join(sorted(decoder.MODEL_TYPES + gpt2.MODEL_TYPES))
        raise UserError(f"model type {config.model_type!r} is not supported; the project's ports: {ports}; "
                        f"with the flax-legacy extra: {', '.join(SUPPORTED)}")
    require_flax(config.model_type)
    from transformers import FlaxAutoModelForCausalLM

    return FlaxAutoModelForCausalLM._model_mapping[type(config)]


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
