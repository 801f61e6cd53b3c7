"""NF4 frozen weights (``flax_lora.nf4``) against bf16/fp32 and int8: error, bytes, compiled memory, training.

    python benchmarks/nf4.py error  [--preset smollm2-135m --batch 2 --seq 128]
    python benchmarks/nf4.py bytes
    python benchmarks/nf4.py memory [--cases llama-1b:1:2048:bf16,llama-8b:1:1024:bf16:remat,...]
    python benchmarks/nf4.py train  [--steps 300 --precisions fp32,bf16]
    python benchmarks/nf4.py all --json OUT

- ``error``: logits relative error (L2 of the difference / L2 of the reference) against the
  unquantized fp32 model, for a bench shape with random frozen params
  (``flax_lora.perf.shapes.random_params``: ~N(0, 0.02)) and for the tests' tiny GPT-2 / Llama /
  OPT (init std 0.2), in fp32 and bf16, for none / int8 / nf4 / nf4-dq.
- ``bytes``: the quantized linears' stored bytes (codes + every scale leaf) over their bf16
  bytes, and the whole frozen tree's, on abstract params (nothing allocated).
- ``memory``: XLA's memory analysis of the real train step compiled for this machine's backend
  on abstract arguments (``flax_lora.perf.compiled.compile_step``), per format. ``llama-8b``
  (Llama-3.1-8B's shape) is added to the presets here.
- ``train``: the built-in demo (GPT-2, 300 steps, same seed) trained through ``lora train``'s
  Python API with the frozen weights as given, nf4 and nf4-dq; eval loss after training.

Until ``build.py`` and ``perf/compiled.py`` know the NF4 formats (see the report with this script)
the script applies them itself, by wrapping those two modules' params step.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from flax_lora.quant import nbytes, quant_active, quantize_as

FORMATS = ("none", "int8", "nf4", "nf4-dq")
LLAMA_8B = dict(hidden=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate=14336, vocab=128256,
                head_dim=128, tied_embeddings=False, rope_theta=500000.0)


def environment() -> dict:
    """CPU model, whether it has avx512_bf16, jax version and backend (for RESULTS.md)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags.split(), "jax": jax.__version__,
            "backend": jax.default_backend()}


def _rel(got, ref) -> float:
    got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def _logit_errors(model_of, conv1d, ids) -> dict:
    """{precision: {format: relative error}} against the fp32 unquantized logits;
    ``model_of(precision)`` gives a CausalLM with params in that precision."""
    mask = jnp.ones_like(ids)
    ref = None
    out = {}
    for precision in ("fp32", "bf16"):
        model = model_of(precision)
        row = {}
        for fmt in FORMATS:
            params = quantize_as(model.params, fmt, conv1d)
            with quant_active():
                logits = model.logits({"params": params}, ids, mask)
            ref = logits if ref is None else ref  # fp32, unquantized: the first one
            row[fmt] = _rel(logits, ref)
        out[precision] = row
    return out


def bench_shape_errors(preset: str, batch: int, seq: int) -> dict:
    """Logit errors of a ``PRESETS`` shape with random params (same values in both precisions)."""
    from flax_lora.perf.shapes import PRESETS
    from flax_lora.perf.throughput import build_model

    def model_of(precision):
        return build_model(PRESETS[preset], seq=seq, precision=precision, scan=True, remat=False,
                           quantization="none", r=8, targets=("q_proj",))[0]

    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, PRESETS[preset]["vocab"])
    return _logit_errors(model_of, (), ids)


def tiny_errors() -> dict:
    """Logit errors of the tests' tiny models (``tests/conftest.py``), per family (OPT only with the
    flax-legacy extra)."""
    from flax_lora.models.hf import SUPPORTED as LEGACY, flax_available
    from flax_lora.models.registry import from_config
    from tests.conftest import _configs
    from tests.helpers import copy_batch

    ids = jnp.asarray(copy_batch(2)["input_ids"])
    out = {}
    for name, cfg in _configs().items():
        if name in LEGACY and not flax_available():
            continue

        def model_of(precision, cfg=cfg):
            return from_config(cfg, dtype={"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision], seed=0)

        conv = [p for p, i in model_of("fp32").linears().items() if i.kind == "conv1d"]
        out[name] = _logit_errors(model_of, conv, ids)
    return out


def _abstract_params(shape: dict, seq: int = 128):
    """bf16 ``jax.ShapeDtypeStruct`` params of the Llama port for ``shape``, layers stacked."""
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM
    from flax_lora.models.stacking import stack_layers
    from flax_lora.perf.shapes import llama_config

    config = llama_config(shape, seq)
    module = DecoderLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan=True)
    return jax.eval_shape(lambda p: stack_layers(p, config.num_hidden_layers), param_shapes(module.clone(scan=False)))


def byte_ratios(presets=("smollm2-135m", "llama-1b", "llama-8b")) -> dict:
    """Per preset and format: the quantized linears' bytes / their bf16 bytes, and the whole
    frozen tree's bytes / bf16 (embeddings, norms and an untied head stay bf16)."""
    from flax_lora.perf.shapes import PRESETS

    out = {}
    for name in presets:
        params = _abstract_params(PRESETS[name])
        flat = flatten_dict(params)
        lin = {k[:-1] for k, v in flat.items() if k[-1] == "kernel" and "lm_head" not in k}
        lin_bf16 = sum(flat[m + ("kernel",)].size * 2 for m in lin)
        row = {"frozen_bf16_gb": nbytes(params) / 2**30, "linear_bf16_gb": lin_bf16 / 2**30}
        for fmt in ("int8", "nf4", "nf4-dq"):
            q = flatten_dict(jax.eval_shape(lambda p, f=fmt: quantize_as(p, f), params))
            lin_q = sum(v.size * v.dtype.itemsize for k, v in q.items() if k[:-1] in lin and k[-1] != "bias")
            frozen_gb = sum(v.size * v.dtype.itemsize for v in q.values()) / 2**30
            row[fmt] = {"linear_ratio": lin_q / lin_bf16, "frozen_gb": frozen_gb,
                        "bits_per_linear_weight": 8 * lin_q / (lin_bf16 / 2)}
            row[fmt]["frozen_ratio"] = row[fmt]["frozen_gb"] / row["frozen_bf16_gb"]
        out[name] = row
    return out


def stacked_float_kernels(hlo: str, kernel_shapes: set) -> int:
    """HLO instructions that compute a float array of a whole stacked linear kernel ([L, in, out]
    or [L, out, in]): a full-precision copy of every layer's kernel at once. Parameters (the
    unquantized weights themselves) and tuple plumbing are not counted."""
    wanted = {s for a, b, c in kernel_shapes for s in ((a, b, c), (a, c, b))}
    found = 0
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (?:bf16|f32|f16)\[(\d+),(\d+),(\d+)\]\S* (\S+)\(", line)
        plumbing = m and m.group(4) in ("parameter", "get-tuple-element", "bitcast", "tuple")
        found += bool(m and not plumbing and tuple(int(d) for d in m.groups()[:3]) in wanted)
    return found


def compiled_memory(cases: str) -> list[dict]:
    """XLA memory analysis (GiB) of the train step per case and format (r=8 q/k/v/o, scan), and
    how many HLO values hold a whole float stack of a linear's kernels."""
    from flax_lora.perf.compiled import compile_step, memory_gb, parse_case
    from flax_lora.perf.shapes import PRESETS

    rows = []
    for text in cases.split(","):
        flat = flatten_dict(_abstract_params(PRESETS[parse_case(text)["preset"]]))
        shapes = {v.shape for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 3}
        for fmt in FORMATS:
            case = {**parse_case(text), "quantization": fmt}
            t0 = time.perf_counter()
            compiled = compile_step(case)
            row = {"case": text, "format": fmt, **memory_gb(compiled.memory_analysis()),
                   "compile_seconds": time.perf_counter() - t0,
                   "stacked_float_kernels": stacked_float_kernels(compiled.as_text(), shapes)}
            print(f"  {text:<28} {fmt:<7} args {row['argument_gb']:7.3f}  temp {row['temp_gb']:7.3f}  "
                  f"peak {row['xla_peak_gb']:7.3f} GiB  float kernel stacks in HLO {row['stacked_float_kernels']}"
                  f"  ({row['compile_seconds']:.0f} s)", flush=True)
            rows.append(row)
    return rows


def _with_frozen_format(fmt: str):
    """Wrap ``flax_lora.training.build._model`` so the run's frozen weights are stored as ``fmt``
    (what ``build.py`` will do once ``--quantization nf4`` exists); returns an undo function."""
    from flax_lora.training import build

    original = build._model

    def model(cfg, src):
        m, tokenizer, linears = original(cfg, src)
        conv = [p for p, i in linears.items() if i.kind == "conv1d"]
        m.params = quantize_as(m.params, fmt, conv)
        return m, tokenizer, linears

    build._model = model
    return lambda: setattr(build, "_model", original)


def demo_training(steps: int, precisions=("fp32", "bf16")) -> dict:
    """Eval loss after ``steps`` demo steps (same seed and data) per precision and frozen format."""
    from flax_lora.training.loop import train
    from tests.helpers import run_config

    out = {}
    for precision in precisions:
        for fmt in ("none", "nf4", "nf4-dq"):
            undo = _with_frozen_format(fmt)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = run_config(None, None, Path(tmp) / "run", max_steps=steps, precision=precision,
                                     eval_every=steps, save_every=steps)
                    res = train(cfg, quiet=True)
            finally:
                undo()
            after = res["after"]
            out[f"{precision}/{fmt}"] = {"eval_loss": after["loss"], "rougeL": after.get("rougeL"),
                                          "wall_seconds": res.get("wall_seconds")}
            print(f"  {precision}/{fmt}: eval loss {after['loss']:.4f}  rougeL {after.get('rougeL')}", flush=True)
        base = out[f"{precision}/none"]["eval_loss"]
        for fmt in ("nf4", "nf4-dq"):
            out[f"{precision}/{fmt}"]["vs_unquantized"] = out[f"{precision}/{fmt}"]["eval_loss"] / base - 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["error", "bytes", "memory", "train", "all"])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cases", default="llama-1b:1:2048:bf16,llama-1b:1:128:bf16,llama-8b:1:1024:bf16:remat,"
                                      "llama-8b:1:128:bf16")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    from flax_lora.perf.shapes import PRESETS

    PRESETS.setdefault("llama-8b", LLAMA_8B)
    result = {"environment": environment()}
    print(json.dumps(result["environment"]))
    if args.what in ("error", "all"):
        result["logit_error"] = {args.preset: bench_shape_errors(args.preset, args.batch, args.seq), **tiny_errors()}
        print(json.dumps(result["logit_error"], indent=1))
    if args.what in ("bytes", "all"):
        result["bytes"] = byte_ratios()
        print(json.dumps(result["bytes"], indent=1))
    if args.what in ("memory", "all"):
        result["memory"] = compiled_memory(args.cases)
    if args.what in ("train", "all"):
        result["train"] = demo_training(args.steps, tuple(args.precisions.split(",")))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
