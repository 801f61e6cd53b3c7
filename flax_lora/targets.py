"""Which linear layers get an adapter: the guide's presets per architecture, names, or a regex.

Presets (the guide's three): ``attention-qv`` (query + value), ``attention`` (all attention
projections), ``attention-mlp`` (attention + MLP). Each architecture names its layers
differently (GPT-2 fuses q/k/v into ``c_attn`` and reuses ``c_proj`` in attention and MLP), so a
preset resolves to path suffixes per ``model_type``; the result is a regex over full module
paths handed to :func:`flax_lora.lora.select_targets`.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from flax_lora.errors import UserError
from flax_lora.lora import LinearInfo, select_targets

PRESETS = ("attention-qv", "attention", "attention-mlp")

_LLAMA = {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
          "mlp": ["gate_proj", "up_proj", "down_proj"]}
# model_type -> {"qv", "attn", "mlp"} -> path suffixes ("a/b" matches the last two components)
ARCH: dict[str, dict[str, list[str]]] = {
    "gpt2": {"qv": ["attn/c_attn"], "attn": ["attn/c_attn", "attn/c_proj"], "mlp": ["mlp/c_fc", "mlp/c_proj"]},
    "opt": {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "gpt_neo": {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
                "mlp": ["mlp/c_fc", "mlp/c_proj"]},
    "gptj": {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc_in", "fc_out"]},
    "bloom": {"qv": ["query_key_value"], "attn": ["query_key_value", "self_attention/dense"],
              "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "llama": _LLAMA, "mistral": _LLAMA, "gemma": _LLAMA, "qwen2": _LLAMA,
}


def preset_regex(preset: str, model_type: str) -> str:
    """The full-path regex of ``preset`` for ``model_type``."""
    if preset not in PRESETS:
        raise UserError(f"unknown target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    arch = ARCH.get(model_type)
    if arch is None:
        raise UserError(
            f"no target presets known for model type {model_type!r}; give target module names instead"
        )
    parts = {"attention-qv": ["qv"], "attention": ["attn"], "attention-mlp": ["attn", "mlp"]}[preset]
    suffixes = [s for p in parts for s in arch[p]]
    return "(.*/)?(" + "|".join(re.escape(s) for s in suffixes) + ")"


def resolve_targets(
    linears: Mapping[str, LinearInfo],
    model_type: str,
    *,
    preset: str | None = None,
    modules: Sequence[str] | str | None = None,
) -> dict[str, LinearInfo]:
    """Adapted linears: a preset (per architecture), explicit names, or one regex string.

    A preset wins when the architecture is known; names from another architecture (an advice
    made for a different model) fall back to the preset. ``lm_head`` is never adapted by a preset.
    """
    if preset and model_type in ARCH:
        return select_targets(linears, preset_regex(preset, model_type))
    if modules:
        if isinstance(modules, str) and modules in PRESETS:
            return resolve_targets(linears, model_type, preset=modules)
        return select_targets(linears, modules if isinstance(modules, str) else list(modules))
    if preset:
        return select_targets(linears, preset_regex(preset, model_type))  # raises: unknown arch
    raise UserError("no LoRA target modules given")
