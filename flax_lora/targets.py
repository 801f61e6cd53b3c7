"""Which linear layers get an adapter: the guide's presets per architecture, names, or a regex.

Presets (the guide's three): ``attention-qv`` (query + value), ``attention`` (all attention
projections), ``attention-mlp`` (attention + MLP). Each architecture names its layers
differently; the per-architecture names live in one place, the advisor's catalog
(:data:`advisor.catalog.ARCHS`), so the advice's ``target_modules`` and what the trainer
adapts can never disagree. Names match like PEFT's ``target_modules`` (see
:func:`flax_lora.lora.select_targets`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from advisor.catalog import ARCHS, preset_modules
from flax_lora.errors import UserError
from flax_lora.lora import LinearInfo, select_targets

PRESETS = ("attention-qv", "attention", "attention-mlp")


def preset_names(preset: str, model_type: str) -> tuple[str, ...]:
    """The module names of ``preset`` for ``model_type``."""
    if preset not in PRESETS:
        raise UserError(f"unknown target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if model_type not in ARCHS:
        raise UserError(
            f"no target presets known for model type {model_type!r}; give target module names instead"
        )
    return preset_modules(model_type, preset)


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
    if preset and model_type in ARCHS:
        return select_targets(linears, list(preset_names(preset, model_type)))
    if modules:
        if isinstance(modules, str) and modules in PRESETS:
            return resolve_targets(linears, model_type, preset=modules)
        return select_targets(linears, modules if isinstance(modules, str) else list(modules))
    if preset:
        preset_names(preset, model_type)  # raises: unknown architecture
    raise UserError("no LoRA target modules given")


def shortest_names(targets: Mapping[str, LinearInfo] | Sequence[str], linears: Mapping[str, LinearInfo]) -> list[str]:
    """The shortest module names selecting exactly ``targets`` among ``linears`` (PEFT's rule).

    ``["k_proj", "o_proj", "q_proj", "v_proj"]`` instead of every layer's full path; GPT-2's
    attention needs two levels (``attn.c_proj``, as ``mlp.c_proj`` exists too); the full paths
    when no suffix set without a layer index is exact (some layers only).
    """
    wanted = set(targets)
    parts = [p.split("/") for p in sorted(wanted)]
    for depth in range(1, max((len(p) for p in parts), default=1)):
        if any(c.isdigit() for p in parts for c in p[-depth:]):
            break  # a layer index: name the full paths instead
        names = sorted({".".join(p[-depth:]) for p in parts})
        if set(select_targets(linears, names)) == wanted:
            return names
    return sorted(wanted)
