"""Rotary position embeddings for every scaling type the ports' configs declare.

``rope_type`` default, linear, dynamic (NTK), llama3, yarn and longrope are computed as
transformers computes them (its ``ROPE_INIT_FUNCTIONS``): static inverse frequencies and an
attention factor that scales cos and sin (yarn, longrope). Two types depend on the positions of
the call and are resolved inside the trace: dynamic (stateless: this call's largest position,
where PyTorch keeps grown frequencies until a short input resets them) and longrope (the long
factors once a position reaches past the original context, as PyTorch switches). An unknown type
is refused, never ignored. ``partial_rotary_factor`` rotates only the first part of each head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.errors import UserError

TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


class Rope(NamedTuple):
    """The static part of one rotary embedding (per layer kind: Gemma 3 has a local and a global one)."""

    inv_freq: np.ndarray  # [dim/2] float32 (longrope: the short factors' table)
    long_inv_freq: np.ndarray | None  # longrope: the long factors' table
    attention_factor: float  # cos and sin are multiplied by it (yarn, longrope)
    kind: str
    base: float
    dim: int  # rotated dimensions of a head
    factor: float  # dynamic: the scaling factor
    max_positions: int  # dynamic / longrope: the length past which they change


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_settings(config, layer: str = "full_attention") -> dict:
    """The rotary settings of ``config`` for a ``layer`` type as one dict (``rope_type``,
    ``rope_theta``, ``partial_rotary_factor`` and the scaling keys), whichever transformers made it.

    transformers 5 keeps them in ``rope_parameters`` (per layer type where they differ: Gemma 3's
    ``sliding_attention`` / ``full_attention``); 4.57 in ``rope_theta``, ``rope_scaling``,
    ``partial_rotary_factor`` and Gemma 3's ``rope_local_base_freq`` (local layers: no scaling).
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if isinstance(params.get("full_attention"), dict):  # nested by layer type
            params = params.get(layer) or params["full_attention"]
        out = dict(params)
    elif layer == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        out = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(config, "rope_theta", None))
    out.setdefault("rope_type", out.get("type") or "default")
    if out.get("rope_theta") is None:
        out["rope_theta"] = 10000.0
    if out.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", None) or 1.0
    return out


def scaling_of(config, layer: str = "full_attention") -> dict:
    """The rotary settings (:func:`rope_settings`); an unknown ``rope_type`` is a UserError."""
    rs = rope_settings(config, layer)
    if rs["rope_type"] not in TYPES:
        raise UserError(f"rope_scaling type {rs['rope_type']!r} is not supported ({', '.join(TYPES)})")
    return rs


def _base_table(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _llama3(inv: np.ndarray, rs: dict) -> np.ndarray:
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
    return np.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, rs: dict, max_positions: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (by rotations)."""
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings") or max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rs.get("attention_factor")
    if attention is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # extrapolation (original frequencies) weight
    pos = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep, float(attention)


def _longrope(config, base: float, dim: int, rs: dict) -> tuple[np.ndarray, np.ndarray, float, int]:
    original = getattr(config, "original_max_position_embeddings", None)
    factor = rs.get("factor")
    if original:
        factor = config.max_position_embeddings / original
    else:
        original = config.max_position_embeddings
    attention = rs.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    short = 1.0 / (np.asarray(rs["short_factor"], np.float32) * base ** shape)
    long = 1.0 / (np.asarray(rs["long_factor"], np.float32) * base ** shape)
    return short, long, float(attention), int(original)


def rope_of(config, layer: str = "full_attention") -> Rope:
    """The rotary embedding a config declares for a ``layer`` type (Gemma 3's ``sliding_attention``
    layers have their own base and no scaling)."""
    rs = scaling_of(config, layer)
    dim = int(head_dim(config) * rs["partial_rotary_factor"])
    base = float(rs["rope_theta"])
    kind, max_pos = rs["rope_type"], int(getattr(config, "max_position_embeddings", 0) or 0)
    inv, long, attention = _base_table(base, dim), None, 1.0
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        inv = _llama3(inv, rs)
    elif kind == "yarn":
        inv, attention = _yarn(base, dim, rs, max_pos)
    elif kind == "longrope":
        inv, long, attention, max_pos = _longrope(config, base, dim, rs)
    return Rope(inv.astype(np.float32), None if long is None else long.astype(np.float32), attention, kind, base,
                dim, float(rs.get("factor") or 1.0), max_pos)


def cos_sin(rope: Rope, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, dim] in float32 for the given positions."""
    inv = jnp.asarray(rope.inv_freq)
    seq = jnp.max(position_ids) + 1
    if rope.kind == "dynamic":
        grown = jnp.maximum(seq, rope.max_positions).astype(jnp.float32)
        base = rope.base * ((rope.factor * grown / rope.max_positions) - (rope.factor - 1)) ** (rope.dim / (rope.dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, rope.dim, 2, dtype=jnp.float32) / rope.dim))
    elif rope.kind == "longrope":
        inv = jnp.where(seq > rope.max_positions, jnp.asarray(rope.long_inv_freq), inv)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` rotated (float32); a partial rotary leaves the head's tail as it is."""
    dim = cos.shape[-1]
    part, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = jnp.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    out = part.astype(jnp.float32) * cos + turned.astype(jnp.float32) * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest.astype(jnp.float32)], axis=-1)
