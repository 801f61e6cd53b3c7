"""The advisor's memory estimate for a benchmark shape and setup, to set beside a measurement.

``advisor`` is the project's rules package; it is imported when an estimate is asked for.
The advisor's total includes a fixed runtime context (CUDA/XLA context and workspaces,
``RUNTIME_FIXED_GB``) that XLA's compiled memory analysis does not see: :func:`advisor_gb`
reports both figures.
"""

from __future__ import annotations

import os
import sys

from flax_lora.perf.shapes import PRESETS, catalog_shape, llama_params

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_shape(shape: dict, seq: int, name: str = "bench"):
    """The advisor's ``ModelShape`` of a Llama of ``shape`` (a ``PRESETS`` entry)."""
    from advisor.schema import ModelShape

    return ModelShape(
        name=name, source="config", model_type="llama", max_positions=max(seq, 2048), hidden=shape["hidden"],
        n_layers=shape["n_layers"], n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"], intermediate=shape["intermediate"], vocab=shape["vocab"],
        tied_embeddings=shape["tied_embeddings"], params=llama_params(shape),
    )


def advisor_estimate_gb(shape: dict, *, r, targets, batch, seq, precision, quantization, remat, scan=True,
                        platform="gpu") -> float | None:
    """The advisor's memory estimate (GiB, runtime context included) for this shape and setup of
    ``benchmarks/bench.py``; None (with a note on stderr) if it fails: the advisor is optional here.

    ``LORA_ATTENTION=xla`` forces the port's explicit-score attention (the advisor's "explicit").
    """
    try:
        from advisor.memory import GIB, Setup, breakdown

        attention = "explicit" if os.environ.get("LORA_ATTENTION") == "xla" else "auto"
        setup = Setup(r=r, targets=tuple(targets), batch=batch, max_length=seq, precision=precision,
                      quantization=quantization, remat=remat, attention=attention, scan=scan,
                      device="cpu" if platform == "cpu" else "gpu")
        return sum(breakdown(model_shape(shape, seq), setup).values()) / GIB
    except Exception as exc:
        print(f"  (advisor estimate unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def advisor_gb(case: dict, r: int = 8, targets=ATTENTION, device: str = "cpu") -> dict:
    """The advisor's estimate for a compiled case of ``benchmarks/memory_check.py`` (see
    ``flax_lora.perf.compiled.parse_case``): scan or not, on XLA:CPU (explicit attention, the
    port's only kind there) or, with ``device="gpu"``, explicit attention on a GPU unless
    ``LORA_ATTENTION`` asks for another (the port picks cuDNN only when jax's default backend
    is a GPU, never in a deviceless compile). GiB: total, device (total less the runtime
    context) and per part."""
    from advisor.memory import GIB, RUNTIME_FIXED_GB, Setup, breakdown

    explicit = device == "cpu" or os.environ.get("LORA_ATTENTION", "xla") == "xla"
    setup = Setup(r=r, targets=tuple(targets), batch=case["batch"], max_length=case["seq"],
                  precision=case["precision"], quantization=case["quantization"], remat=case["remat"],
                  scan=case.get("scan", True), device=device, attention="explicit" if explicit else "auto")
    preset = case["preset"]
    shape = model_shape(PRESETS[preset], case["seq"], name=preset) if preset in PRESETS else catalog_shape(preset)
    parts = breakdown(shape, setup)
    total = sum(parts.values()) / GIB
    return {"advisor_total_gb": total, "advisor_device_gb": total - RUNTIME_FIXED_GB,
            "advisor_parts_gb": {k: v / GIB for k, v in parts.items()}}
