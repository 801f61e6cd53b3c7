"""Interleaved A/B of the train step on the CPU: fp32 and the bf16 routes, one process, rounds alternating.

    python benchmarks/bf16_ab.py --preset smollm2-135m --batch 4 --seq 128 --rounds 8 \
        --variants fp32,bf16,bf16-dots,bf16-xla,bf16-unrolled

Variants: ``fp32``; ``bf16`` (what ``lora train`` runs: bf16 dots, uint16 kernel stacks passed
in, packed layer residuals); ``bf16-dots`` (``LORA_BF16_DOTS=dots``: bf16 dots only, kernel
stacks viewed inside the step, JAX's own residuals); ``bf16-xla`` (``LORA_BF16_DOTS=xla``:
XLA:CPU's own bf16 handling); ``-unrolled`` on any of them: layers unrolled instead of scanned.
Each variant is built and compiled first; then every round runs one step of each in turn, so a
machine whose load changes slows every variant alike. Reports the median step per variant
(and the first step: trace + compile + run). Sharing the machine still moves the figures; the
ratios within one invocation are what to compare (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from flax_lora.lora import LoraConfig
from flax_lora.perf.shapes import PRESETS
from flax_lora.perf.throughput import build_model, machine
from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

ROUTES = {"fp32": ("fp32", None), "bf16": ("bf16", None), "bf16-dots": ("bf16", "dots"), "bf16-xla": ("bf16", "xla")}


def build(name: str, shape: dict, batch: int, seq: int):
    """(step, state, params, device batch, first-step seconds) of one variant, compiled and run once."""
    base = name.removesuffix("-unrolled")
    precision, route = ROUTES[base]
    os.environ.pop("LORA_BF16_DOTS", None)
    if route:
        os.environ["LORA_BF16_DOTS"] = route  # read while building and tracing, so set before both
    model, params, lora, _ = build_model(shape, seq=seq, precision=precision, scan=base == name, remat=False,
                                         quantization="none", r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    oc = OptimConfig(2e-4, total_steps=10_000, max_grad_norm=1.0)
    opt = make_optimizer(oc)
    step = make_train_step(model, LoraConfig(r=8, alpha=16), opt, make_schedule(oc))
    state = init_state(lora, opt, 0)
    ids = np.random.default_rng(0).integers(0, shape["vocab"], (1, batch, seq), dtype=np.int32)
    dev = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)})
    t0 = time.perf_counter()
    state, m = step(state, params, dev)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    os.environ.pop("LORA_BF16_DOTS", None)
    return [step, state, params, dev, first]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--variants", default="fp32,bf16,bf16-dots")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    shape, names = PRESETS[args.preset], args.variants.split(",")
    built = {n: build(n, shape, args.batch, args.seq) for n in names}
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, v in built.items():
            t0 = time.perf_counter()
            v[1], m = v[0](v[1], v[2], v[3])
            jax.block_until_ready(m)
            times[n].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    rows = {n: {"median_ms": 1000 * statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts),
                "first_step_s": built[n][4]} for n, ts in times.items()}
    base = rows[names[0]]["tokens_per_s"]
    for n, r in rows.items():
        print(f"{n:16s} {r['median_ms']:8.0f} ms/step {r['tokens_per_s']:8.1f} tok/s  "
              f"{r['tokens_per_s'] / base:5.2f}x {names[0]}  first step {r['first_step_s']:.1f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
