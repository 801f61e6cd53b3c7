"""Throughput accounting: LoRA-aware training FLOPs, device peak tables, MFU, peak memory.

LoRA training FLOPs per token (frozen weights get no weight gradient)::

    matmul weights W (every linear incl. lm_head, not the embedding lookup):
        forward 2W + backward input-gradients 2W            = 4W   (full fine-tuning: 6W)
    attention scores and values (no weights, PaLM convention, causal mask not discounted):
        forward 4·L·T·d_attn, backward 8·L·T·d_attn         = 12·L·T·d_attn
    LoRA matrices P (trainable): 6P

MFU = achieved FLOP/s / the device's dense bf16 peak.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM / HBM3
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16
}


def peak_tflops(device_kind: str) -> float | None:
    """The bf16 peak of a device by its ``jax.Device.device_kind`` (None when unknown)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_kind.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def lora_flops_per_token(*, matmul_params: int, lora_params: int, n_layers: int, seq_len: int,
                         attn_dim: int) -> float:
    """Training FLOPs per token for LoRA (see the module docstring)."""
    return 4.0 * matmul_params + 6.0 * lora_params + 12.0 * n_layers * seq_len * attn_dim


def matmul_params(params: Any) -> int:
    """Weights that take part in a matmul: every 2-D+ ``kernel`` (embedding tables excluded).

    A tied lm_head reuses the embedding as a matmul, so callers add ``vocab * hidden`` for it.
    """
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel" and leaf.ndim >= 2:
            total += leaf.size
    return int(total)


def mfu(tokens_per_second: float, flops_per_token: float, device_kind: str, n_devices: int = 1) -> float | None:
    peak = peak_tflops(device_kind)
    if peak is None:
        return None
    return tokens_per_second * flops_per_token / (peak * 1e12 * n_devices)


def peak_memory_gb() -> float | None:
    """Peak device memory in use so far (JAX memory stats; None where unsupported, e.g. CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def model_flops_fn(params: Any, lora: Any, config: Any):
    """``seq_len -> LoRA training FLOPs per token`` for a loaded model (HF ``config``) and adapter.

    A model without an ``lm_head`` kernel ties it to the embedding: ``vocab x hidden`` is added.
    """
    import jax

    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", default=1)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers", default=0)
    attn_dim = heads * _first(config, "head_dim", default=hidden // heads)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    tied = not any("lm_head" in p for p in paths)
    mm = matmul_params(params) + (_first(config, "vocab_size") * hidden if tied else 0)
    n_lora = int(sum(x.size for x in jax.tree_util.tree_leaves(lora)))
    return lambda seq_len: lora_flops_per_token(matmul_params=mm, lora_params=n_lora, n_layers=layers,
                                                seq_len=seq_len, attn_dim=attn_dim)
