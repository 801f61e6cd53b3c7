"""The scanned-layer layout: per-layer trees ``model/layers/<i>/...`` <-> stacked ``model/layers/stack/...``
(GPT-2's port: ``transformer/h/<i>`` <-> ``transformer/h/stack``).

A port that runs its decoder layers as one ``nn.scan`` holds their params (and the adapter)
stacked [L, ...]; files on disk, targets and exports always use the per-layer layout.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_lora.errors import UserError

STACK = "stack"  # name of the scanned layer module: model/layers/stack/... (GPT-2: transformer/h/stack/...)
_PREFIXES = (("model", "layers"), ("transformer", "h"))  # where each port keeps its layers


def stack_layers(tree: Mapping, num_layers: int | None = None, fill_missing: bool = False) -> dict:
    """Per-layer ``model/layers/<i>/...`` -> scanned ``model/layers/stack/...`` [L, ...].

    Works on params and on LoRA trees. With ``fill_missing`` a layer absent from the tree (an
    adapter on some layers only) gets zeros, which is exact for LoRA (zero delta).
    """
    flat = flatten_dict(dict(tree))
    groups: dict[tuple, dict[int, Any]] = {}
    out = {}
    for k, v in flat.items():
        if k[:2] in _PREFIXES and len(k) > 2 and k[2].isdigit():
            groups.setdefault((k[:2], k[3:]), {})[int(k[2])] = v
        else:
            out[k] = v
    for (prefix, rest), per in groups.items():
        n = num_layers or (max(per) + 1)
        missing = [i for i in range(n) if i not in per]
        if missing and not fill_missing:
            raise UserError(f"layer {missing[0]} has no {'/'.join(rest)}; cannot stack layers")
        ref = next(iter(per.values()))
        zeros = jnp.zeros_like(ref)
        out[prefix + (STACK,) + rest] = jnp.stack([per.get(i, zeros) for i in range(n)])
    return unflatten_dict(out)


def in_layout(paths, stacked: bool) -> list[str]:
    """Per-layer module paths (``transformer/h/3/attn/c_attn``) named as the params hold them: the
    stacked ``transformer/h/stack/attn/c_attn`` when ``stacked`` (one name for all layers)."""
    if not stacked:
        return list(paths)
    out = []
    for p in paths:
        k = tuple(p.split("/"))
        if k[:2] in _PREFIXES and len(k) > 2 and k[2].isdigit():
            k = k[:2] + (STACK,) + k[3:]
        out.append("/".join(k))
    return list(dict.fromkeys(out))


def unstack_layers(tree: Mapping) -> dict:
    """Scanned ``model/layers/stack/...`` [L, ...] -> per-layer ``model/layers/<i>/...``."""
    out = {}
    for k, v in flatten_dict(dict(tree)).items():
        if k[:2] in _PREFIXES and k[2:3] == (STACK,):
            for i in range(v.shape[0]):
                out[k[:2] + (str(i),) + k[3:]] = v[i]
        else:
            out[k] = v
    return unflatten_dict(out)
