"""Steady-state throughput of the real train step on a benchmark shape (``benchmarks/bench.py``).

:func:`run_jax` builds the project's Llama port for a ``flax_lora.perf.shapes.PRESETS`` shape
(frozen params from :func:`~flax_lora.perf.shapes.random_params`, or the model's own init),
LoRA on the given targets, and times ``flax_lora.training.step.make_train_step`` (the step
``lora train`` runs) like the run loop calls it: no host sync between steps. It reports
tokens/s, the time to the first step (trace + compile + run), XLA compiles after the first
step (must be 0, counted by :class:`CompileCounter`), peak memory, MFU on GPUs of known peak,
and optionally XLA's compiled memory analysis and a profiler trace summary.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora.lora import LoraConfig, count_params, init_lora
from flax_lora.matmul import storage_view
from flax_lora.models.base import CausalLM
from flax_lora.models.decoder import DecoderLM, load_decoder
from flax_lora.models.stacking import stack_layers
from flax_lora.perf import flops
from flax_lora.perf.compiled import memory_gb
from flax_lora.perf.shapes import llama_config, random_params, target_linears
from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's backend-compile event) from its creation."""

    def __init__(self):
        import jax.monitoring
        from jax._src import dispatch

        self.count = 0
        self.seconds = 0.0
        event = dispatch.BACKEND_COMPILE_EVENT

        def listener(name, secs, **_):
            if name == event:
                self.count += 1
                self.seconds += secs

        jax.monitoring.register_event_duration_secs_listener(listener)


def machine() -> dict:
    """Host, CPU model, core count, Python, date and load average, for a result file."""
    info = {"host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def build_model(shape: dict, *, seq, precision, scan, remat, quantization, r, targets, init="fast", seed=0):
    """(model, frozen params, LoRA params, seconds to make the frozen params) for a benchmark shape.

    ``init="flax"``: the model's own init (one jit of the unrolled flat init, then stacked: slow);
    ``"fast"``: :func:`~flax_lora.perf.shapes.random_params`.
    """
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    config = llama_config(shape, seq)
    t0 = time.perf_counter()
    if init == "flax":
        module, params, _ = load_decoder(config, dtype, dtype, scan=scan, remat=remat, seed=seed)
    else:
        module = DecoderLM(config, dtype=dtype, param_dtype=dtype, scan=scan, remat=remat)
        params = random_params(module, seed=seed, std=config.initializer_range)
    jax.block_until_ready(params)
    params_seconds = time.perf_counter() - t0
    lora = init_lora(target_linears(module, config, targets, dtype), r, jax.random.PRNGKey(seed + 1))
    if scan:
        lora = stack_layers(lora, config.num_hidden_layers)
    if quantization != "none":
        from flax_lora.quant import quantize_as

        params = quantize_as(params, quantization)
    model = CausalLM(module, params, config, "llama", "bench", dtype, layers_stacked=scan)
    return model, storage_view(params), lora, params_seconds  # the frozen params as `lora train` passes them


def _time_steps(step, state, params, host_batch, *, steps, warmup):
    """Run the first step, ``warmup`` more, then ``steps`` timed ones; (state, metrics, timings)."""
    counter = CompileCounter()
    t0 = time.perf_counter()
    state, metrics = step(state, params, jax.device_put(host_batch))
    first_loss = float(metrics["loss"])
    timing = {"first_step_seconds": time.perf_counter() - t0, "first_loss": first_loss,
              "compiles_first_step": counter.count, "xla_compile_seconds": counter.seconds}
    for _ in range(warmup):
        state, metrics = step(state, params, jax.device_put(host_batch))
    jax.block_until_ready(metrics)
    t_all = time.perf_counter()
    for _ in range(steps):  # like the run loop: no host sync between steps
        state, metrics = step(state, params, jax.device_put(host_batch))
    jax.block_until_ready(metrics)
    timing["elapsed"] = time.perf_counter() - t_all
    timing["recompiles_after_first_step"] = counter.count - timing["compiles_first_step"]
    return state, metrics, timing


def _memory_analysis(step, state, params, batch) -> dict:
    """XLA's compiled memory analysis of the step (GiB; one extra compile), or an ``error`` entry."""
    try:
        ma = step.lower(state, params, batch).compile().memory_analysis()
        return {**memory_gb(ma), "generated_code_gb": ma.generated_code_size_in_bytes / 2**30}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _profile(step, state, params, batch, trace_dir, n_steps):
    """Trace ``n_steps`` steps into ``trace_dir``, print where the time goes (stderr); (state, result keys)."""
    from flax_lora.perf.trace import format_summary, summarize

    with jax.profiler.trace(trace_dir):
        for _ in range(n_steps):
            state, metrics = step(state, params, batch)
        jax.block_until_ready(metrics)
    summary = summarize(trace_dir, n_steps)
    print(format_summary(summary), file=sys.stderr)
    return state, {"profile_dir": str(trace_dir), "profile_kinds_ms": summary["kinds"],
                   "profile_top": [list(k) for k in summary["kernels"][:40]]}


def run_jax(shape: dict, *, batch, seq, accum, r, alpha, targets, precision, scan, remat, quantization,
            steps, warmup, memory_analysis, init="fast", seed=0, profile=None, profile_steps=3) -> dict:
    """Measure the real train step on ``accum`` micro-batches of ``batch`` x ``seq`` random tokens
    (every token a target); returns a result dict (see the module docstring)."""
    t0 = time.perf_counter()
    model, params, lora, params_seconds = build_model(
        shape, seq=seq, precision=precision, scan=scan, remat=remat, quantization=quantization, r=r,
        targets=targets, init=init, seed=seed)
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - t0

    ocfg = OptimConfig(2e-4, total_steps=10_000, max_grad_norm=1.0)
    opt = make_optimizer(ocfg)
    step = make_train_step(model, LoraConfig(r=r, alpha=alpha), opt, make_schedule(ocfg))  # int8 kernels run through the LoRA interceptor
    state = init_state(lora, opt, seed)
    ids = np.random.default_rng(seed).integers(0, shape["vocab"], (accum, batch, seq), dtype=np.int32)
    host_batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    state, metrics, timing = _time_steps(step, state, params, host_batch, steps=steps, warmup=warmup)
    dev_batch = jax.device_put(host_batch)
    analysis = _memory_analysis(step, state, params, dev_batch) if memory_analysis else {}
    tps = accum * batch * seq * steps / timing["elapsed"]
    profiled = {}
    if profile:  # after the timed steps, so tracing costs nothing above
        state, profiled = _profile(step, state, params, dev_batch, profile, profile_steps)

    dev = jax.devices()[0]
    mm = flops.matmul_params(params) + (shape["vocab"] * shape["hidden"] if shape["tied_embeddings"] else 0)
    fpt = flops.lora_flops_per_token(matmul_params=mm, lora_params=count_params(lora), n_layers=shape["n_layers"],
                                     seq_len=seq, attn_dim=shape["n_heads"] * shape["head_dim"])
    return {
        "impl": "flax_lora", "device": dev.device_kind, "platform": dev.platform, "precision": precision,
        "scan": scan, "remat": remat, "quantization": quantization,
        "tokens_per_second": tps, "step_seconds": timing["elapsed"] / steps,
        "first_step_seconds": timing["first_step_seconds"], "init": init, "init_seconds": init_seconds,
        "params_init_seconds": params_seconds,
        **{k: timing[k] for k in ("compiles_first_step", "xla_compile_seconds", "recompiles_after_first_step")},
        "first_loss": timing["first_loss"], "loss": float(metrics["loss"]),
        "peak_memory_gb": flops.peak_memory_gb(), "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **analysis, **profiled,
        "flops_per_token": fpt, "mfu": flops.mfu(tps, fpt, dev.device_kind),
        "lora_params": count_params(lora), "frozen_gb": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**30,
        "jax": jax.__version__,
    }
