"""LoRA training throughput of the real train step, side by side with PyTorch + PEFT.

    python benchmarks/bench.py --preset smollm2-135m --batch 4 --seq 128 --precision fp32,bf16 --torch

Per precision it reports steady-state tokens/s of ``flax_lora.training.step.make_train_step`` (the step
``lora train`` runs) on the project's Flax Llama port, the time to the first step (trace +
compile + run), XLA compiles after the first step (must be 0), peak memory (device stats on
GPU; XLA's compiled memory analysis and the process RSS on CPU), MFU on GPUs of known peak,
the advisor's memory estimate, and, with ``--torch``, the PyTorch + PEFT baseline
(``flax_lora.perf.torch_baseline``, run in a subprocess first so neither framework holds the
other's memory or threads) and the ratio. ``--json OUT`` writes everything.

The frozen weights are random, made leaf by leaf on the device (``flax_lora.perf.shapes.random_params``:
~N(0, 0.02) from a counter hash, RMSNorm ones) in the exact tree the model's init gives: seconds,
where the model's jitted flax init of the unrolled layers (``--init flax``) takes more than a
minute (figures in ``benchmarks/RESULTS.md``). Throughput does not depend on the values.
The measuring code lives in ``flax_lora.perf.throughput``; this script is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from flax_lora.perf.estimates import advisor_estimate_gb
from flax_lora.perf.shapes import PRESETS
from flax_lora.perf.throughput import machine, run_jax
from flax_lora.perf.torch_baseline import run_torch_subprocess, torch_available

SHAPE_KEYS = ("hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate", "vocab", "head_dim")


def shape_from_args(args) -> dict:
    """The preset's shape with the command line's overrides (``--hidden`` alone derives ``head_dim``)."""
    shape = dict(PRESETS[args.preset])
    for key in SHAPE_KEYS:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.hidden is not None and args.head_dim is None:
        shape["head_dim"] = shape["hidden"] // shape["n_heads"]
    if args.untied:
        shape["tied_embeddings"] = False
    return shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    for key in SHAPE_KEYS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: the preset's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan over layers")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--quantization", default="none", choices=["none", "int8", "nf4", "nf4-dq"])
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--torch", action="store_true", help="also run PyTorch + PEFT (needs torch, peft)")
    p.add_argument("--torch-only", action="store_true")
    p.add_argument("--torch-timeout", type=int, default=900)
    p.add_argument("--init", default="fast", choices=["fast", "flax"],
                   help="frozen params: fast = per-leaf hashed ~N(0, 0.02) on the device (default); "
                        "flax = the model's jitted flax init (slow: over a minute for any preset)")
    p.add_argument("--memory-analysis", action="store_true", help="XLA compiled memory analysis (extra compile)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--profile", metavar="DIR", help="after timing, trace 3 steps with jax.profiler into DIR/<precision> "
                   "and print where the time goes (flax_lora.perf.trace, as benchmarks/trace_summary.py; on CPU "
                   "set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true to see XLA ops)")
    return p.parse_args(argv)


def run_torch_all(args, shape, targets, precisions, result, dump) -> None:
    """The PyTorch + PEFT baseline per precision (same tokens per optimizer step as ours)."""
    if not torch_available():
        print("torch/peft not importable: skipping the PyTorch + PEFT baseline", file=sys.stderr)
        return
    for prec in precisions:
        res = run_torch_subprocess(shape, batch=args.batch * args.accum, seq=args.seq, r=args.r,
                                   alpha=args.alpha, targets=targets, precision=prec,
                                   steps=args.steps, warmup=args.warmup, timeout=args.torch_timeout)
        result["torch"][prec] = res
        print(f"torch+peft {prec}: " + (f"{res['tokens_per_second']:.1f} tok/s" if "error" not in res
                                        else "ERROR " + res["error"][-300:]), flush=True)
        dump()


def run_ours(args, shape, targets, prec) -> dict:
    """Our step in one precision, with the advisor's estimate; an ``error`` entry on failure."""
    try:
        res = run_jax(shape, batch=args.batch, seq=args.seq, accum=args.accum, r=args.r, alpha=args.alpha,
                      targets=targets, precision=prec, scan=args.scan, remat=args.remat,
                      quantization=args.quantization, steps=args.steps, warmup=args.warmup,
                      memory_analysis=args.memory_analysis, init=args.init,
                      profile=args.profile and os.path.join(args.profile, prec))
    except Exception as exc:
        traceback.print_exc()
        return {"impl": "flax_lora", "precision": prec, "error": f"{type(exc).__name__}: {exc}"}
    res["advisor_estimate_gb"] = advisor_estimate_gb(
        shape, r=args.r, targets=targets, batch=args.batch, seq=args.seq, precision=prec,
        quantization=args.quantization, remat=args.remat, scan=args.scan, platform=res.get("platform"))
    return res


def print_ours(prec, res) -> None:
    if "error" in res:
        print(f"flax_lora {prec}: ERROR {res['error']}", flush=True)
        return
    mfu = f", MFU {res['mfu']:.1%}" if res.get("mfu") else ""
    mem = res.get("peak_memory_gb") or res.get("xla_peak_gb")
    print(f"flax_lora {prec}: {res['tokens_per_second']:.1f} tok/s ({res['step_seconds']*1e3:.0f} ms/step), "
          f"first step {res['first_step_seconds']:.1f} s (XLA compile {res['xla_compile_seconds']:.1f} s), recompiles {res['recompiles_after_first_step']}"
          + (f", peak {mem:.2f} GiB" if mem else "") + mfu, flush=True)


def ratios(result, precisions) -> None:
    for prec in precisions:
        o, t = result["ours"].get(prec, {}), result["torch"].get(prec, {})
        if "tokens_per_second" in o and "tokens_per_second" in t:
            result["ratio"][prec] = o["tokens_per_second"] / t["tokens_per_second"]
            print(f"ratio ours/torch {prec}: {result['ratio'][prec]:.2f}x")
    best_o = max((o["tokens_per_second"] for o in result["ours"].values() if "tokens_per_second" in o), default=None)
    best_t = max((t["tokens_per_second"] for t in result["torch"].values() if "tokens_per_second" in t), default=None)
    if best_o and best_t:
        result["ratio"]["best_vs_best"] = best_o / best_t
        print(f"ratio ours (best precision) / torch (best precision): {best_o / best_t:.2f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = shape_from_args(args)
    targets = [t for t in args.targets.split(",") if t]
    precisions = [x for x in args.precision.split(",") if x]
    result = {"machine": machine(), "shape": shape, "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
              "ours": {}, "torch": {}, "ratio": {}}

    def dump():
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=str))

    if args.torch or args.torch_only:  # first: neither framework holds the other's memory or threads
        run_torch_all(args, shape, targets, precisions, result, dump)
    if not args.torch_only:
        for prec in precisions:
            result["ours"][prec] = run_ours(args, shape, targets, prec)
            print_ours(prec, result["ours"][prec])
            dump()
    ratios(result, precisions)
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
