"""PyTorch + PEFT baseline alone: steady-state LoRA training tokens/s for a benchmark Llama shape.

    python benchmarks/torch_baseline.py --preset tiny --batch 4 --seq 128 --precision fp32 [--steps 5 --warmup 2]

transformers' LlamaForCausalLM (random init from the shape), PEFT LoRA on the same targets,
AdamW, one optimizer step per batch, eager mode: what ``bench.py --torch`` runs in a subprocess
beside our step. Needs torch and peft. Prints the result as JSON. The code is
``flax_lora.perf.torch_baseline`` (also runnable as ``python -m flax_lora.perf.torch_baseline
KWARGS_JSON``, the form ``bench.py`` uses).
"""

from __future__ import annotations

import argparse
import json
import sys

from flax_lora.perf.shapes import PRESETS
from flax_lora.perf.torch_baseline import run_torch, torch_available


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first included")
    args = p.parse_args(argv)
    if not torch_available():
        print("torch/peft not importable", file=sys.stderr)
        return 1
    res = run_torch(PRESETS[args.preset], batch=args.batch, seq=args.seq, r=args.r, alpha=args.alpha,
                    targets=[t for t in args.targets.split(",") if t], precision=args.precision,
                    steps=args.steps, warmup=args.warmup)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
