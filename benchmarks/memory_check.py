"""The advisor's memory estimate against XLA's compiled memory analysis of the real train step.

    python benchmarks/memory_check.py [--cases smollm2-135m:4:128:bf16,...] [--json OUT]

Each case lowers and compiles ``flax_lora.training.step.make_train_step`` on abstract arguments (no
weights are allocated, so 1B shapes compile on a laptop) and reads
``compiled.memory_analysis()``: arguments (frozen weights, LoRA state, batch) + temporaries +
outputs not aliased to the donated state = the step's peak live bytes on the device. The
advisor's figure is compared without its fixed runtime context (CUDA/XLA context and
workspaces, not part of what XLA allocates).

A case is ``preset:batch:seq:precision[:int8|nf4|nf4-dq][:remat][:noscan]`` (preset: a benchmark
shape, or any model of the advisor's catalog such as ``qwen3-0.6b``; ``noscan``: layers unrolled,
as ``lora train`` loads models; default scan over layers, as the benchmarks run them).

``--gpu h200`` compiles for an H200 without one: XLA's deviceless GPU compile (jax with the
CUDA plugin, ``JAX_PLATFORMS=cpu``, a GPU target config, autotuning off). It has no cuDNN, so
only explicit attention (what the port traces when jax's backend is the CPU); the advisor is
then asked for the same setup (explicit attention, on a GPU). The project's CPU venv has no
CUDA plugin; how closely this reproduces a measured H200 peak is in ``benchmarks/RESULTS.md``.

The library code is ``flax_lora.perf.compiled`` (compiling) and ``flax_lora.perf.estimates``
(the advisor's side); this script is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flax_lora.perf.compiled import GPU_TARGETS, gpu_device, parse_case, xla_peak
from flax_lora.perf.estimates import advisor_gb

DEFAULT = ("smollm2-135m:4:128:fp32,smollm2-135m:4:128:bf16,smollm2-135m:16:512:bf16,"
           "smollm2-135m:8:1024:bf16:remat,smollm2-135m:4:128:bf16:int8,llama-1b:1:2048:bf16,"
           "llama-1b:4:2048:bf16:remat")


def check(text: str, device=None, gpu: str | None = None) -> dict:
    """One case's row: the case, XLA's compiled figures, the advisor's, and their ratio."""
    case = parse_case(text)
    row = {"case": text, **case, **xla_peak(case, device=device), **advisor_gb(case, device="gpu" if gpu else "cpu")}
    if gpu:
        row["target"] = gpu
    row["ratio"] = row["advisor_device_gb"] / row["xla_peak_gb"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--gpu", choices=sorted(GPU_TARGETS), help="deviceless compile for this GPU (see above)")
    args = p.parse_args(argv)
    device = gpu_device(args.gpu) if args.gpu else None
    rows = []
    print(f"{'case':<36} {'XLA peak GiB':>12} {'advisor GiB':>11} {'ratio':>6}")
    for text in args.cases.split(","):
        try:
            row = check(text, device, args.gpu)
            print(f"{text:<36} {row['xla_peak_gb']:12.3f} {row['advisor_device_gb']:11.3f} {row['ratio']:6.2f}",
                  flush=True)
        except Exception as exc:
            row = {"case": text, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{text:<36} ERROR {row['error'][:200]}", flush=True)
        rows.append(row)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
