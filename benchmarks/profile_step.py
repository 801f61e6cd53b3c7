"""Where the train step's time goes: times jitted pieces of the LoRA step in isolation.

    python benchmarks/profile_step.py --precision fp32 [--no-scan] [--parts fwd,fwd_loss,grad,head,...]

Wall time is noisy on a shared machine; CPU time (process, all threads) is the steadier figure.
Pieces (each its own jitted function, median of ``--reps`` runs after one compile):
``body_fwd`` the decoder (embedding -> final norm), ``head_fwd`` lm_head + log-softmax + NLL from
the final hidden states, ``head_grad`` that plus its backward to the hidden states,
``fwd_loss`` the whole forward with the loss, ``grad`` value_and_grad w.r.t. LoRA (what the step
does minus the AdamW update), ``step`` the real train step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timeit(fn, *args, reps=3):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu), compile_s


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bench import PRESETS, flat_linears, llama_config
    from flax_lora import losses
    from flax_lora.lora import LoraConfig, init_lora, lora_active
    from flax_lora.models import CausalLM
    from flax_lora.models.llama import load_llama, param_shapes, stack_layers
    from flax_lora.targets import resolve_targets
    from flax_lora.train import OptimConfig, init_state, make_loss_fn, make_optimizer, make_schedule, make_train_step

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", default="body_fwd,head_fwd,head_grad,fwd_loss,grad,step")
    args = p.parse_args(argv)
    parts = args.parts.split(",")

    shape = PRESETS[args.preset]
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.precision]
    config = llama_config(shape, args.seq)
    module, params, _ = load_llama(config, dtype, dtype, scan=args.scan)
    flat = CausalLM(module.clone(scan=False, remat=False), None, config, "llama", "bench", dtype)
    chosen = resolve_targets(flat_linears(flat, param_shapes(flat.module)), "llama",
                             modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lora = init_lora(chosen, 8, jax.random.PRNGKey(1))
    if args.scan:
        lora = stack_layers(lora, config.num_hidden_layers)
    model = CausalLM(module, params, config, "llama", "bench", dtype)
    lcfg = LoraConfig(8, 16.0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, shape["vocab"], (args.batch, args.seq), dtype=np.int32))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    emb = params["model"]["embed_tokens"]["embedding"]
    hidden = jax.random.normal(jax.random.PRNGKey(3), (args.batch, args.seq, shape["hidden"]), dtype)
    results = {}

    def report(name, fn, *a):
        med, cpu, comp = timeit(fn, *a, reps=args.reps)
        results[name] = med
        print(f"{name:>16}: {med * 1e3:8.1f} ms wall {cpu * 1e3:8.1f} ms cpu  (first call {comp:5.1f} s)", flush=True)

    if "body_fwd" in parts:
        def body(params, lora, ids):
            from flax_lora.models.llama import _Backbone

            bb = _Backbone(config, dtype, dtype, args.scan, False)
            with lora_active(lcfg.scaling):
                pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
                return bb.apply({"params": params["model"], "lora": lora["model"]}, ids, jnp.ones_like(ids), pos)[0]

        report("body_fwd", jax.jit(body), params, lora, ids)
    if "head_fwd" in parts or "head_grad" in parts:
        def head_ref(h, emb, ids):
            logits = jnp.einsum("bth,vh->btv", h, emb.astype(dtype), preferred_element_type=jnp.float32)
            from flax_lora.train import token_nll

            return token_nll(logits, ids, jnp.ones_like(ids))[0]

        def head_fused(h, emb, ids):
            return losses.fused_token_nll(h, emb, ids, jnp.ones_like(ids))[0]

        for name, f in (("ref", head_ref), ("fused", head_fused)):
            if "head_fwd" in parts:
                report(f"head_fwd_{name}", jax.jit(f), hidden, emb, ids)
            if "head_grad" in parts:
                report(f"head_grad_{name}", jax.jit(jax.grad(f)), hidden, emb, ids)
    loss = make_loss_fn(model, lcfg)
    if "fwd_loss" in parts:
        report("fwd_loss", jax.jit(lambda lo, p, b: loss(lo, p, b, jax.random.PRNGKey(0), True)[0]), lora, params, batch)
    if "grad" in parts:
        g = jax.jit(jax.value_and_grad(lambda lo, p, b: loss(lo, p, b, jax.random.PRNGKey(0), False)[0]))
        report("grad", g, lora, params, batch)
    if "step" in parts:
        oc = OptimConfig(2e-4, total_steps=1000)
        opt = make_optimizer(oc)
        step = make_train_step(model, lcfg, opt, make_schedule(oc))
        kb = {k: v[None] for k, v in batch.items()}
        state = [init_state(lora, opt, 0)]

        def run(kb):
            state[0], m = step(state[0], params, kb)
            return m

        report("step", run, kb)
    return results


if __name__ == "__main__":
    main()
