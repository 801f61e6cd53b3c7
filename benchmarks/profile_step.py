"""Where the train step's time goes: times jitted pieces of the LoRA step in isolation.

    python benchmarks/profile_step.py --precision fp32 [--no-scan] [--parts body_fwd,head_fwd,head_grad,fwd_loss,grad,step]

Wall time is noisy on a shared machine; CPU time (process, all threads) is the steadier figure.
Pieces (each its own jitted function, median of ``--reps`` runs after one compile):
``body_fwd`` the decoder (embedding -> final norm), ``head_fwd`` lm_head + log-softmax + NLL from
the final hidden states, ``head_grad`` that plus its backward to the hidden states (each as
``_ref``, the plain logits loss, and ``_fused``, the chunked loss the step uses),
``fwd_loss`` the whole forward with the loss, ``grad`` value_and_grad w.r.t. LoRA (what the step
does minus the AdamW update), ``step`` the real train step. The model is a benchmark preset
(``flax_lora.perf.shapes``) with LoRA r=8 on q/k/v/o, built like ``bench.py`` builds it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.lora import LoraConfig, lora_active
from flax_lora.models.decoder import _Backbone
from flax_lora.perf.shapes import PRESETS
from flax_lora.perf.throughput import build_model
from flax_lora.training.losses import fused_token_nll, token_nll
from flax_lora.training.step import OptimConfig, init_state, make_loss_fn, make_optimizer, make_schedule, make_train_step

PARTS = "body_fwd,head_fwd,head_grad,fwd_loss,grad,step"


def timeit(fn, *args, reps=3):
    """(median wall s, median process CPU s, first call s) of ``fn(*args)``."""
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


def step_runner(model, lcfg, lora, params):
    """The real train step as ``run(batch) -> metrics``, carrying its (donated) state between calls."""
    oc = OptimConfig(2e-4, total_steps=1000)
    opt = make_optimizer(oc)
    step = make_train_step(model, lcfg, opt, make_schedule(oc))
    state = [init_state(lora, opt, 0)]

    def run(kb):
        state[0], m = step(state[0], params, kb)
        return m

    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", default=PARTS, help=f"comma-separated, of {PARTS}")
    p.add_argument("--init", default="fast", choices=["fast", "flax"],
                   help="frozen params: fast random (default) or the model's own flax init (slow); "
                        "timings do not depend on the values")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    parts = args.parts.split(",")
    shape = PRESETS[args.preset]
    model, params, lora = build_model(shape, seq=args.seq, precision=args.precision, scan=args.scan, remat=False,
                                      quantization="none", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                      init=args.init, seed=0)[:3]
    config, dtype = model.config, model.dtype
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
            bb = _Backbone(config, dtype, dtype, args.scan, False)
            with lora_active(lcfg.scaling):
                pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
                return bb.apply({"params": params["model"], "lora": lora["model"]}, ids, jnp.ones_like(ids), pos)[0]

        report("body_fwd", jax.jit(body), params, lora, ids)
    if "head_fwd" in parts or "head_grad" in parts:
        def head_ref(h, emb, ids):
            logits = jnp.einsum("bth,vh->btv", h, emb.astype(dtype), preferred_element_type=jnp.float32)
            return token_nll(logits, ids, jnp.ones_like(ids))[0]

        def head_fused(h, emb, ids):
            return fused_token_nll(h, emb, ids, jnp.ones_like(ids))[0]

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
        report("step", step_runner(model, lcfg, lora, params), {k: v[None] for k, v in batch.items()})
    return results


if __name__ == "__main__":
    main()
