"""Tiny models + random non-zero adapters shared by the export tests (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.adapters.native import save_adapter
from flax_lora.lora import LoraConfig, discover_linears, init_lora, lora_active, select_targets

IDS = np.array([[5, 17, 3, 99, 42, 7, 64, 1, 23, 88], [11, 2, 76, 30, 8, 55, 9, 120, 14, 6]], np.int32)

LLAMA = dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0, max_position_embeddings=64,
)
GPT2 = dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)


class Flax:
    """A JAX causal LM: apply(variables, ids) -> logits, plus its params and linears."""

    def __init__(self, module, params, call):
        self.module, self.params, self._call = module, params, call
        self.linears = discover_linears(lambda p: self.apply({"params": p}, IDS), params)

    def apply(self, variables, ids):
        return self._call(self.module, variables, jnp.asarray(ids))

    def logits(self, lora=None, scaling=1.0):
        if lora is None:
            return np.asarray(self.apply({"params": self.params}, IDS), np.float32)
        with lora_active(scaling):
            return np.asarray(self.apply({"params": self.params, "lora": lora}, IDS), np.float32)


def _llama_call(module, variables, ids):
    return module.apply(variables, ids).logits


def _gpt2_call(module, variables, ids):
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return module.apply(variables, ids, jnp.ones_like(ids), pos).logits


def flax_llama(folder: Path) -> Flax:
    from flax_lora.models.decoder import load_decoder

    module, params, _ = load_decoder(folder)
    return Flax(module, params, _llama_call)


def flax_gpt2(folder: Path) -> Flax:
    from flax_lora.models.gpt2 import load_gpt2

    module, params, _ = load_gpt2(folder)
    return Flax(module, params, _gpt2_call)


def random_adapter(model: Flax, targets, r: int = 4, seed: int = 0):
    """Non-zero A and B (B is zero at init, which would test nothing)."""
    chosen = select_targets(model.linears, targets)
    rng = np.random.default_rng(seed)
    lora = init_lora(chosen, r, jax.random.PRNGKey(seed))
    lora = jax.tree_util.tree_map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), lora)
    return lora, chosen


def random_params(shape_tree, seed: int = 0):
    """Random params for a shape tree, in numpy (no compile): N(0, 0.05); norm scales 1 + N(0, 0.1)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_dict(dict(shape_tree)).items():
        x = rng.standard_normal(s.shape).astype(np.float32)
        is_norm = path[-1] in ("scale", "weight") and len(s.shape) == 1
        out[path] = 1.0 + 0.1 * x if is_norm else 0.05 * x
    return unflatten_dict(out)


def save_run(run: Path, model: Flax, lora, chosen, config: LoraConfig, targets, base: Path, model_type: str) -> Path:
    save_adapter(run / "adapter", lora, config, chosen, target_modules=targets, base_model=str(base), model_type=model_type)
    return run
