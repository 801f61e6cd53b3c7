"""The advisor's memory estimate against XLA's compiled memory analysis of the real train step.

    python benchmarks/memory_check.py [--cases smollm2-135m:4:128:bf16,...] [--json OUT]

Each case lowers and compiles ``flax_lora.train.make_train_step`` on abstract arguments (no
weights are allocated, so 1B shapes compile on a laptop) and reads
``compiled.memory_analysis()``: arguments (frozen weights, LoRA state, batch) + temporaries +
outputs not aliased to the donated state = the step's peak live bytes on the device. The
advisor's figure is compared without its fixed runtime context (CUDA/XLA context and
workspaces, not part of what XLA allocates).

A case is ``preset:batch:seq:precision[:int8][:remat][:noscan]`` (``noscan``: layers unrolled,
as ``lora train`` loads models; default scan over layers, as the benchmarks run them).

``--gpu h200`` compiles for an H200 without one: XLA's deviceless GPU compile (jax with the
CUDA plugin, ``JAX_PLATFORMS=cpu PYTHONPATH=.``, a GPU target config, autotuning off). It has
no cuDNN, so only explicit attention (what the port traces when jax's backend is the CPU); the
advisor is then asked for the same setup (explicit attention, on a GPU). With jax 0.11.2 and
jax-cuda13-plugin (a Python 3.12 venv; the project's CPU venv has no plugin) it reproduced the
H200's measured peak for explicit attention: 96.7 GiB compiled vs 98.4 GiB
``peak_bytes_in_use`` (Llama-3.2-1B shape, 4 x 2048, bf16, scan).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT = ("smollm2-135m:4:128:fp32,smollm2-135m:4:128:bf16,smollm2-135m:16:512:bf16,"
           "smollm2-135m:8:1024:bf16:remat,smollm2-135m:4:128:bf16:int8,llama-1b:1:2048:bf16,"
           "llama-1b:4:2048:bf16:remat")


GPU_TARGETS = {  # XLA GpuTargetConfigProto (text) for deviceless compiles
    "h200": """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version { major: 13 } platform_name: "CUDA" dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H200"
""",
}


def parse_case(text: str) -> dict:
    parts = text.split(":")
    return {"preset": parts[0], "batch": int(parts[1]), "seq": int(parts[2]), "precision": parts[3],
            "quantization": "int8" if "int8" in parts[4:] else "none", "remat": "remat" in parts[4:],
            "scan": "noscan" not in parts[4:]}


def gpu_device(target: str):
    """A compile-only GPU device for ``target`` (no GPU needed; see the module docstring)."""
    import os

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    from jax.experimental import topologies

    return topologies.get_topology_desc(target, "cuda", target_config=GPU_TARGETS[target], topology="1x1x1").devices[0]


def compile_step(case: dict, device=None, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """The compiled train step of ``case`` on abstract arguments (no weights allocated), for the
    default backend or for ``device`` (a compile-only GPU from ``gpu_device``)."""
    import jax
    import jax.numpy as jnp

    from bench import PRESETS, flat_linears, llama_config
    from flax_lora.lora import LoraConfig, init_lora
    from flax_lora.models import CausalLM
    from flax_lora.models.llama import LlamaForCausalLM, param_shapes, stack_layers
    from flax_lora.targets import resolve_targets
    from flax_lora.train import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    shape = PRESETS[case["preset"]]
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[case["precision"]]
    config = llama_config(shape, case["seq"])
    scan = case.get("scan", True)
    module = LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, scan=scan, remat=case["remat"])
    flat_shapes = param_shapes(module.clone(scan=False, remat=False))
    flat = CausalLM(module.clone(scan=False, remat=False), None, config, "llama", "mem", dtype)
    chosen = resolve_targets(flat_linears(flat, flat_shapes), "llama", modules=list(targets))
    L = config.num_hidden_layers
    stack = (lambda tree: stack_layers(tree, L)) if scan else (lambda tree: tree)
    params = jax.eval_shape(stack, flat_shapes)
    if case["quantization"] == "int8":
        from flax_lora.quant import quantize_params

        params = jax.eval_shape(quantize_params, params)
    lora = jax.eval_shape(lambda: stack(init_lora(chosen, r, jax.random.PRNGKey(0))))
    oc = OptimConfig(1e-4, total_steps=10)
    opt = make_optimizer(oc)
    state = jax.eval_shape(lambda lo: init_state(lo, opt, 0), lora)
    model = CausalLM(module, params, config, "llama", "mem", dtype)
    step = make_train_step(model, LoraConfig(r, 2 * r), opt, make_schedule(oc))
    ids = jax.ShapeDtypeStruct((1, case["batch"], case["seq"]), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    args = (state, params, batch)
    if device is not None:
        on = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), args)
    return step.lower(*args).compile()


def xla_peak(case: dict, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), device=None) -> dict:
    """Compiled memory analysis of the train step for ``case`` (see :func:`compile_step`)."""
    t0 = time.perf_counter()
    ma = compile_step(case, device, r, targets).memory_analysis()
    gib = 2**30
    out = {"argument_gb": ma.argument_size_in_bytes / gib, "temp_gb": ma.temp_size_in_bytes / gib,
           "output_gb": ma.output_size_in_bytes / gib, "alias_gb": ma.alias_size_in_bytes / gib,
           "compile_seconds": time.perf_counter() - t0}
    out["xla_peak_gb"] = out["argument_gb"] + out["temp_gb"] + out["output_gb"] - out["alias_gb"]
    return out


def advisor_gb(case: dict, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), device="cpu") -> dict:
    """The advisor's estimate for the compiled setup: scan or not, on XLA:CPU (explicit attention,
    the port's only kind there) or, with ``device="gpu"``, explicit attention on a GPU."""
    import os

    from advisor.memory import GIB, RUNTIME_FIXED_GB, Setup, breakdown
    from advisor.schema import ModelShape
    from bench import PRESETS, llama_params

    s = PRESETS[case["preset"]]
    ms = ModelShape(name=case["preset"], source="config", model_type="llama", params=llama_params(s),
                    n_layers=s["n_layers"], hidden=s["hidden"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                    head_dim=s["head_dim"], intermediate=s["intermediate"], vocab=s["vocab"],
                    max_positions=max(case["seq"], 2048), tied_embeddings=s["tied_embeddings"])
    kw = {"remat": case["remat"]} if "remat" in Setup._fields else {}
    if "device" in Setup._fields:
        # the port picks cuDNN only when jax's default backend is a GPU: never here, unless forced
        explicit = device == "cpu" or os.environ.get("LORA_ATTENTION", "xla") == "xla"
        kw.update(scan=case.get("scan", True), device=device, attention="explicit" if explicit else "auto")
    parts = breakdown(ms, Setup(r=r, targets=tuple(targets), batch=case["batch"], max_length=case["seq"],
                                precision=case["precision"], quantization=case["quantization"], **kw))
    total = sum(parts.values()) / GIB
    return {"advisor_total_gb": total, "advisor_device_gb": total - RUNTIME_FIXED_GB,
            "advisor_parts_gb": {k: v / GIB for k, v in parts.items()}}


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
        case = parse_case(text)
        try:
            row = {"case": text, **case, **xla_peak(case, device=device),
                   **advisor_gb(case, device="gpu" if args.gpu else "cpu")}
            if args.gpu:
                row["target"] = args.gpu
            row["ratio"] = row["advisor_device_gb"] / row["xla_peak_gb"]
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
