"""LoRA training throughput of the real train step, side by side with PyTorch + PEFT.

    python benchmarks/bench.py --preset smollm2-135m --batch 4 --seq 128 --precision fp32,bf16 --torch

Per precision it reports steady-state tokens/s of ``flax_lora.train.make_train_step`` (the step
``lora train`` runs) on the project's Flax Llama port, the time to the first step (trace +
compile + run), XLA compiles after the first step (must be 0), peak memory (device stats on
GPU; XLA's compiled memory analysis and the process RSS on CPU), MFU on GPUs of known peak,
the advisor's memory estimate, and, with ``--torch``, the PyTorch + PEFT baseline
(``benchmarks/torch_baseline.py``, run in a subprocess first so neither framework holds the
other's memory or threads) and the ratio. ``--json OUT`` writes everything.

The frozen weights are random, made leaf by leaf on the device (``random_params``: ~N(0, 0.02)
from a counter hash, RMSNorm ones) in the exact tree the model's init gives: a few seconds,
where the model's jitted flax init of the unrolled layers (``--init flax``) took ~70 s on a
2-core CPU for smollm2-135m and llama-1b alike, and 81-85 s for llama-1b on an H200.
Throughput does not depend on the values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PRESETS = {
    "smollm2-135m": dict(hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate=1536, vocab=49152,
                         head_dim=64, tied_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate=8192, vocab=128256,
                     head_dim=64, tied_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128, vocab=512,
                 head_dim=16, tied_embeddings=True, rope_theta=10000.0),
}


def shape_from_args(args) -> dict:
    shape = dict(PRESETS[args.preset])
    for key in ("hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate", "vocab", "head_dim"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.hidden is not None and args.head_dim is None:
        shape["head_dim"] = shape["hidden"] // shape["n_heads"]
    if args.untied:
        shape["tied_embeddings"] = False
    return shape


def llama_config(shape: dict, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=max(seq, 2048), tie_word_embeddings=shape["tied_embeddings"],
        rope_theta=shape["rope_theta"], initializer_range=0.02,
    )


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's backend-compile event)."""

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


def advisor_estimate_gb(shape: dict, *, r, targets, batch, seq, precision, quantization, remat, scan=True,
                        platform="gpu") -> float | None:
    """The advisor's memory estimate (GiB) for this shape and setup; None if it fails."""
    try:
        from advisor.memory import GIB, Setup, breakdown
        from advisor.schema import ModelShape

        ms = ModelShape(
            name="bench", source="config", model_type="llama", max_positions=max(seq, 2048), hidden=shape["hidden"], n_layers=shape["n_layers"],
            n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
            intermediate=shape["intermediate"], vocab=shape["vocab"], tied_embeddings=shape["tied_embeddings"],
            params=llama_params(shape),
        )
        # LORA_ATTENTION=xla forces the port's explicit-score attention (what the advisor calls "explicit")
        attention = "explicit" if os.environ.get("LORA_ATTENTION") == "xla" else "auto"
        setup = Setup(r=r, targets=tuple(targets), batch=batch, max_length=seq, precision=precision,
                      quantization=quantization, remat=remat, attention=attention, scan=scan,
                      device="cpu" if platform == "cpu" else "gpu")
        return sum(breakdown(ms, setup).values()) / GIB
    except Exception as exc:  # the advisor is optional here
        print(f"  (advisor estimate unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def llama_params(shape: dict) -> int:
    h, L, v, m = shape["hidden"], shape["n_layers"], shape["vocab"], shape["intermediate"]
    q, kv = shape["n_heads"] * shape["head_dim"], shape["n_kv_heads"] * shape["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * m + 2 * h
    return L * layer + v * h * (1 if shape["tied_embeddings"] else 2) + h


def run_jax(shape: dict, *, batch, seq, accum, r, alpha, targets, precision, scan, remat, quantization,
            steps, warmup, memory_analysis, init="fast", seed=0, profile=None, profile_steps=3) -> dict:
    """Measure the real train step; returns a result dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_lora import perf
    from flax_lora.lora import LoraConfig, count_params, init_lora
    from flax_lora.models import CausalLM
    from flax_lora.models.llama import LlamaForCausalLM, load_llama, param_shapes, stack_layers
    from flax_lora.targets import resolve_targets
    from flax_lora.train import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    config = llama_config(shape, seq)
    t0 = time.perf_counter()
    if init == "flax":  # the model's own init: one jit of the unrolled flat init, then stacked (slow)
        module, params, _ = load_llama(config, dtype, dtype, scan=scan, remat=remat, seed=seed)
    else:
        module = LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, scan=scan, remat=remat)
        params = random_params(module, seed=seed, std=config.initializer_range)
    jax.block_until_ready(params)
    params_seconds = time.perf_counter() - t0
    flat = CausalLM(module.clone(scan=False, remat=False), None, config, "llama", "bench", dtype)
    linears = flat_linears(flat, param_shapes(flat.module))
    chosen = resolve_targets(linears, "llama", modules=list(targets))
    lora = init_lora(chosen, r, jax.random.PRNGKey(seed + 1))
    if scan:
        lora = stack_layers(lora, config.num_hidden_layers)
    if quantization == "int8":
        from flax_lora.quant import quantize_params

        params = quantize_params(params)
    model = CausalLM(module, params, config, "llama", "bench", dtype)
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - t0

    lcfg = LoraConfig(r=r, alpha=alpha)
    ocfg = OptimConfig(2e-4, total_steps=10_000, max_grad_norm=1.0)
    opt = make_optimizer(ocfg)
    step = make_train_step(model, lcfg, opt, make_schedule(ocfg))  # int8 kernels run through the LoRA interceptor
    state = init_state(lora, opt, seed)

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, shape["vocab"], (accum, batch, seq), dtype=np.int32)
    host_batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    dev_batch = jax.device_put(host_batch)

    counter = CompileCounter()
    t0 = time.perf_counter()
    state, metrics = step(state, params, dev_batch)
    first_loss = float(metrics["loss"])
    first_step_seconds = time.perf_counter() - t0
    compiles_first, compile_seconds = counter.count, counter.seconds
    for _ in range(warmup):
        state, metrics = step(state, params, jax.device_put(host_batch))
    jax.block_until_ready(metrics)
    times = []
    t_all = time.perf_counter()
    for _ in range(steps):  # like the run loop: no host sync between steps
        t0 = time.perf_counter()
        state, metrics = step(state, params, jax.device_put(host_batch))
        times.append(time.perf_counter() - t0)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t_all
    tokens_per_step = accum * batch * seq
    analysis = {}
    if memory_analysis:
        try:
            ma = step.lower(state, params, dev_batch).compile().memory_analysis()
            analysis = {
                "temp_gb": ma.temp_size_in_bytes / 2**30,
                "argument_gb": ma.argument_size_in_bytes / 2**30,
                "output_gb": ma.output_size_in_bytes / 2**30,
                "alias_gb": ma.alias_size_in_bytes / 2**30,
                "generated_code_gb": ma.generated_code_size_in_bytes / 2**30,
            }
            # donated state aliases the output: peak live = arguments + temporaries + non-aliased outputs
            analysis["xla_peak_gb"] = analysis["argument_gb"] + analysis["temp_gb"] + analysis["output_gb"] - analysis["alias_gb"]
        except Exception as exc:
            analysis = {"error": f"{type(exc).__name__}: {exc}"}

    tps = tokens_per_step * steps / elapsed
    profiled = {}
    if profile:  # after the timed steps, so tracing costs nothing above
        from trace_summary import format_summary, summarize

        with jax.profiler.trace(profile):
            for _ in range(profile_steps):
                state, metrics = step(state, params, dev_batch)
            jax.block_until_ready(metrics)
        summary = summarize(profile, profile_steps)
        print(format_summary(summary), file=sys.stderr)
        profiled = {"profile_dir": str(profile), "profile_kinds_ms": summary["kinds"],
                    "profile_top": [list(k) for k in summary["kernels"][:40]]}

    dev = jax.devices()[0]
    mm = perf.matmul_params(params) + (shape["vocab"] * shape["hidden"] if shape["tied_embeddings"] else 0)
    fpt = perf.lora_flops_per_token(matmul_params=mm, lora_params=count_params(lora), n_layers=shape["n_layers"],
                                    seq_len=seq, attn_dim=shape["n_heads"] * shape["head_dim"])
    return {
        "impl": "flax_lora", "device": dev.device_kind, "platform": dev.platform, "precision": precision,
        "scan": scan, "remat": remat, "quantization": quantization,
        "tokens_per_second": tps, "step_seconds": elapsed / steps,
        "first_step_seconds": first_step_seconds, "init": init, "init_seconds": init_seconds,
        "params_init_seconds": params_seconds,
        "compiles_first_step": compiles_first, "xla_compile_seconds": compile_seconds, "recompiles_after_first_step": counter.count - compiles_first,
        "first_loss": first_loss, "loss": float(metrics["loss"]),
        "peak_memory_gb": perf.peak_memory_gb(), "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        **analysis, **profiled,
        "flops_per_token": fpt, "mfu": perf.mfu(tps, fpt, dev.device_kind),
        "lora_params": count_params(lora), "frozen_gb": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**30,
        "jax": jax.__version__,
    }


_MIX = (0x7FEB352D, 0x846CA68B)  # "lowbias32" (C. Wellons): a cheap, well-mixing 32-bit hash


def _mix32(x):
    import jax.numpy as jnp

    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX[0])
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MIX[1])
    return x ^ (x >> 16)


def _hashed_normal_fn():
    """jit(a, b, shape, dtype, std): a deterministic ~N(0, std) array, computed where it lands.

    Element (row, col) of the array viewed as [prod(shape[:-1]), shape[-1]] is
    ``mix(mix(row + a) ^ (col + b))``; its four bytes summed (Irwin-Hall, 4 uniforms: mean 0,
    exact std, kurtosis 2.7 vs 3) are the value. A counter hash instead of ``jax.random``:
    threefry's normals make ~20 M values/s on a CPU core (the 1.2 B of llama-1b: ~60 s), this
    runs at memory speed on any device, and a (shape, dtype) compiles once. Same values on
    every backend, so first losses compare across machines.
    """
    from functools import partial

    import jax
    import jax.numpy as jnp
    from jax import lax

    @partial(jax.jit, static_argnums=(2, 3, 4))
    def hashed_normal(a, b, shape, dtype, std):
        rows = 1
        for d in shape[:-1]:
            rows *= d
        cols = shape[-1] if shape else 1
        r = lax.broadcasted_iota(jnp.uint32, (rows, cols), 0)
        c = lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
        x = _mix32(_mix32(r + a) ^ (c + b))
        s = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        # sum of 4 uniform bytes: mean 4 * 127.5, variance 4 * (256**2 - 1) / 12
        v = (s.astype(jnp.float32) - 510.0) * (std / (4 * (256**2 - 1) / 12) ** 0.5)
        return v.astype(dtype).reshape(shape)

    return hashed_normal


def random_params(module, *, seed: int = 0, std: float = 0.02) -> dict:
    """Random params of exactly the tree, shapes and dtypes ``module.init`` gives, made fast.

    The tree comes from ``param_shapes`` (``jax.eval_shape`` of the init: traced, nothing
    computed), so a scanned module gets its stacked ``model/layers/stack/...`` [L, ...] leaves
    directly. Each leaf is then filled on the default device by its own small jitted
    computation: RMSNorm ``weight``/``scale`` ones, ``bias`` zeros, everything else (kernels,
    embeddings) ~N(0, ``std``) from a counter hash keyed by ``seed`` and the leaf's path.
    The benchmark measures step speed, not model quality: these are not the model's exact
    initialisers, only their shapes and scales.
    """
    import zlib

    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from flax_lora.models.llama import param_shapes

    normal = _hashed_normal_fn()
    out = {}
    for path, leaf in flatten_dict(param_shapes(module)).items():
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if path[-1] in ("weight", "scale"):
            out[path] = jnp.ones(shape, dtype)
        elif path[-1] == "bias":
            out[path] = jnp.zeros(shape, dtype)
        else:
            name = f"{seed}/" + "/".join(path)
            a, b = (jnp.uint32(zlib.crc32(f"{name}#{i}".encode())) for i in range(2))
            out[path] = normal(a, b, shape, dtype, float(std))
    return unflatten_dict(out)


def flat_linears(model, shapes):
    from flax_lora.lora import discover_linears
    import jax.numpy as jnp

    ids = jnp.zeros((1, 8), jnp.int32)
    return discover_linears(lambda p: model.logits({"params": p}, ids, jnp.ones_like(ids)), shapes)


def run_torch_subprocess(shape, *, batch, seq, r, alpha, targets, precision, steps, warmup, timeout) -> dict:
    """The PyTorch + PEFT baseline in a fresh interpreter (own threads and device memory)."""
    code = (
        "import json,sys; sys.path.insert(0, %r); from torch_baseline import run_torch; "
        "print('RESULT ' + json.dumps(run_torch(**json.loads(sys.argv[1]))))" % str(HERE)
    )
    kwargs = dict(shape=shape, batch=batch, seq=seq, r=r, alpha=alpha, targets=list(targets), precision=precision,
                  steps=steps, warmup=warmup)
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": "torch+peft", "precision": precision, "error": f"timeout after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": "torch+peft", "precision": precision, "error": (proc.stderr or proc.stdout)[-2000:]}


def torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))


def machine() -> dict:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    for key in ("hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate", "vocab", "head_dim"):
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
    p.add_argument("--quantization", default="none", choices=["none", "int8"])
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--torch", action="store_true", help="also run PyTorch + PEFT (needs torch, peft)")
    p.add_argument("--torch-only", action="store_true")
    p.add_argument("--torch-timeout", type=int, default=900)
    p.add_argument("--init", default="fast", choices=["fast", "flax"],
                   help="frozen params: fast = per-leaf hashed ~N(0, 0.02) on the device (default); "
                        "flax = the model's jitted flax init (slow: ~70 s for llama-1b on CPU)")
    p.add_argument("--memory-analysis", action="store_true", help="XLA compiled memory analysis (extra compile)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--profile", metavar="DIR", help="after timing, trace 3 steps with jax.profiler into DIR/<precision> "
                   "and print where the time goes (benchmarks/trace_summary.py; on CPU set "
                   "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true to see XLA ops)")
    args = p.parse_args(argv)

    shape = shape_from_args(args)
    targets = [t for t in args.targets.split(",") if t]
    precisions = [x for x in args.precision.split(",") if x]
    result = {"machine": machine(), "shape": shape, "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
              "ours": {}, "torch": {}, "ratio": {}}

    def dump():
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=str))

    if args.torch or args.torch_only:
        if not torch_available():
            print("torch/peft not importable: skipping the PyTorch + PEFT baseline", file=sys.stderr)
        else:
            for prec in precisions:
                res = run_torch_subprocess(shape, batch=args.batch * args.accum, seq=args.seq, r=args.r,
                                           alpha=args.alpha, targets=targets, precision=prec,
                                           steps=args.steps, warmup=args.warmup, timeout=args.torch_timeout)
                result["torch"][prec] = res
                print(f"torch+peft {prec}: " + (f"{res['tokens_per_second']:.1f} tok/s" if "error" not in res
                                                else "ERROR " + res["error"][-300:]), flush=True)
                dump()
    if not args.torch_only:
        for prec in precisions:
            try:
                res = run_jax(shape, batch=args.batch, seq=args.seq, accum=args.accum, r=args.r, alpha=args.alpha,
                              targets=targets, precision=prec, scan=args.scan, remat=args.remat,
                              quantization=args.quantization, steps=args.steps, warmup=args.warmup,
                              memory_analysis=args.memory_analysis, init=args.init,
                              profile=args.profile and os.path.join(args.profile, prec))
            except Exception as exc:
                import traceback

                traceback.print_exc()
                res = {"impl": "flax_lora", "precision": prec, "error": f"{type(exc).__name__}: {exc}"}
            if "error" not in res:
                res["advisor_estimate_gb"] = advisor_estimate_gb(
                    shape, r=args.r, targets=targets, batch=args.batch, seq=args.seq, precision=prec,
                    quantization=args.quantization, remat=args.remat, scan=args.scan, platform=res.get("platform"))
            result["ours"][prec] = res
            if "error" in res:
                print(f"flax_lora {prec}: ERROR {res['error']}", flush=True)
            else:
                mfu = f", MFU {res['mfu']:.1%}" if res.get("mfu") else ""
                mem = res.get("peak_memory_gb") or res.get("xla_peak_gb")
                print(f"flax_lora {prec}: {res['tokens_per_second']:.1f} tok/s ({res['step_seconds']*1e3:.0f} ms/step), "
                      f"first step {res['first_step_seconds']:.1f} s (XLA compile {res['xla_compile_seconds']:.1f} s), recompiles {res['recompiles_after_first_step']}"
                      + (f", peak {mem:.2f} GiB" if mem else "") + mfu, flush=True)
            dump()
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
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
