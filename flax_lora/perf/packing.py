"""Packed vs unpacked training throughput on an instruction-like length mix (``benchmarks/packing.py``).

The same examples train one epoch each way through the real train step
(:func:`flax_lora.training.step.make_train_step`) fed by :class:`flax_lora.data.batch.Batches`,
as ``lora train`` feeds it with and without ``--packing``: unpacked, one example per row padded
to the batch's length bucket; packed, several per row up to ``max_length``. The figure is target
tokens per second (loss-mask tokens, equal both ways), so the padding the packed rows avoid is
what it measures. Every bucket shape is compiled before the clock starts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from advisor.examples import Example
from flax_lora.data.batch import Batches, Position
from flax_lora.lora import LoraConfig
from flax_lora.perf.throughput import build_model, machine
from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step


def instruction_examples(n: int, *, median: float, sigma: float, max_length: int, vocab: int,
                         seed: int = 0) -> list[Example]:
    """``n`` examples with log-normal lengths (``median`` tokens, log-space ``sigma``), in
    [8, ``max_length``]: random ids, the first ~40% a prompt, the rest a trained answer."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 8, max_length).astype(int)
    out = []
    for n_tok in lengths:
        prompt = int(0.4 * n_tok)
        mask = (np.arange(n_tok) >= prompt).astype(np.int32)
        out.append(Example(rng.integers(3, vocab, n_tok).astype(np.int32), mask, prompt, "", ""))
    return out


def time_epoch(step, state, params, batches: Batches) -> dict:
    """One epoch of ``batches`` through ``step``, timed after one untimed step per distinct shape
    (each compiles once); target tokens, padding share, seconds and target tokens per second."""
    epoch = [batches.batch(Position(0, i)) for i in range(batches.steps_per_epoch)]
    shapes = {}
    for b in epoch:
        shapes.setdefault(b["input_ids"].shape, b)
    t0 = time.perf_counter()
    for b in shapes.values():
        state, metrics = step(state, params, jax.device_put(b))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in epoch:  # like the run loop: no host sync between steps
        state, metrics = step(state, params, jax.device_put(b))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    targets = sum(int(b["loss_mask"][..., 1:].sum()) for b in epoch)
    slots = sum(b["input_ids"].size for b in epoch)
    return {"steps": len(epoch), "shapes": sorted(s[-1] for s in shapes), "target_tokens": targets,
            "real_token_share": sum(int(b["attention_mask"].sum()) for b in epoch) / slots,
            "warmup_compile_seconds": compile_s, "seconds": seconds, "target_tokens_per_second": targets / seconds}


def cpu_flags() -> dict:
    """Whether the CPU has ``avx512_bf16`` (XLA:CPU bf16 matmuls), from /proc/cpuinfo."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return {}
    return {"avx512_bf16": "avx512_bf16" in flags.split()}


def compare(shape: dict, *, examples: int, median: float, sigma: float, max_length: int, batch: int, accum: int,
            precision: str, r: int, targets: tuple[str, ...], seed: int = 0) -> dict:
    """Unpacked then packed: one epoch each over the same examples, same model and step."""
    model, params, lora, _ = build_model(shape, seq=max_length, precision=precision, scan=True, remat=False,
                                         quantization="none", r=r, targets=targets, seed=seed)
    ex = instruction_examples(examples, median=median, sigma=sigma, max_length=max_length, vocab=shape["vocab"],
                              seed=seed)
    oc = OptimConfig(2e-4, total_steps=10_000)
    opt = make_optimizer(oc)
    step = make_train_step(model, LoraConfig(r=r, alpha=2.0 * r), opt, make_schedule(oc))
    out = {"examples": examples, "median_length": float(np.median([len(e.ids) for e in ex])),
           "mean_length": float(np.mean([len(e.ids) for e in ex])), "max_length": max_length,
           "batch": batch, "accum": accum, "precision": precision, "jax": jax.__version__,
           "machine": {**machine(), **cpu_flags()}}
    for packing in (False, True):
        batches = Batches(ex, batch, accum, seed, max_length, pad_id=0, packing=packing)
        out["packed" if packing else "unpacked"] = time_epoch(step, init_state(lora, opt, seed), params, batches)
    out["speedup"] = out["packed"]["target_tokens_per_second"] / out["unpacked"]["target_tokens_per_second"]
    return out
