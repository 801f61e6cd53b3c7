"""Gradient accumulation inside the step (``lax.scan``) vs ``optax.MultiSteps``: time per optimizer update.

    python benchmarks/accum.py [--k 4 --batch 4 --seq 64 --iters 20]

A random-init GPT-2 (n_embd 128, 4 layers, vocab 512) with LoRA r=8 on the attention; one
update of ``--k`` micro-batches of ``--batch`` x ``--seq`` tokens. ``scan``: the real train step
(``flax_lora.training.step.make_train_step``, batch arrays [k, b, T], one dispatch per update);
``MultiSteps``: one jitted call per micro-batch through ``optax.MultiSteps``. Figures and why
the step scans are in ``benchmarks/RESULTS.md`` and ``flax_lora/training/step.py``'s docstring.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import GPT2Config

from flax_lora.lora import LoraConfig, init_lora
from flax_lora.models.registry import from_config
from flax_lora.targets import resolve_targets
from flax_lora.training.step import OptimConfig, init_state, make_loss_fn, make_optimizer, make_schedule, make_train_step


def multisteps_update(model, lora_cfg, opt, k):
    """(MultiSteps optimizer, jitted (lora, opt state, frozen, micro-batch) -> (lora, opt state, loss))."""
    ms = optax.MultiSteps(opt, every_k_schedule=k)
    loss = make_loss_fn(model, lora_cfg)

    def update(lora, st, frozen, mb):
        def f(lo):
            total, count = loss(lo, frozen, mb, jax.random.PRNGKey(0), False)
            return total / count

        v, g = jax.value_and_grad(f)(lora)
        u, st = ms.update(g, st, lora)
        return optax.apply_updates(lora, u), st, v

    return ms, jax.jit(update, donate_argnums=(0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="micro-batches per update")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="timed updates (after 3 untimed)")
    args = p.parse_args(argv)
    k, b, T = args.k, args.batch, args.seq

    m = from_config(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=512, n_positions=max(128, T)))
    lc = LoraConfig(8, 16)
    lora = init_lora(resolve_targets(m.linears(), "gpt2", preset="attention"), 8, jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, 512, (k, b, T)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    oc = OptimConfig(1e-3, total_steps=1000)
    opt = make_optimizer(oc)
    scan_step = make_train_step(m, lc, opt, make_schedule(oc))
    ms, ms_step = multisteps_update(m, lc, opt, k)

    s = init_state(lora, opt, 0)
    l2 = jax.tree_util.tree_map(jnp.array, lora)
    st = ms.init(l2)
    mbs = [{kk: v[i] for kk, v in batch.items()} for i in range(k)]
    for _ in range(3):
        s, mt = scan_step(s, m.params, batch)
        jax.block_until_ready(mt)
        for mb in mbs:
            l2, st, _ = ms_step(l2, st, m.params, mb)
        jax.block_until_ready(l2)
    t = time.perf_counter()
    for _ in range(args.iters):
        s, mt = scan_step(s, m.params, batch)
    jax.block_until_ready(s)
    ts = (time.perf_counter() - t) / args.iters
    t = time.perf_counter()
    for _ in range(args.iters):
        for mb in mbs:
            l2, st, _ = ms_step(l2, st, m.params, mb)
    jax.block_until_ready(l2)
    tm = (time.perf_counter() - t) / args.iters
    print(f"scan: {ts*1e3:.1f} ms/update   MultiSteps: {tm*1e3:.1f} ms/update  ({k} micro-batches of {b}x{T})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
