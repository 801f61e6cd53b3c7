"""The real train step compiled on abstract arguments: XLA's memory analysis and optimized HLO.

:func:`compile_step` lowers and compiles ``flax_lora.training.step.make_train_step`` for a
benchmark case without allocating any weight (``jax.eval_shape`` trees), so 1B shapes compile
on a laptop. The target is the default backend or a compile-only GPU from :func:`gpu_device`:
XLA's deviceless GPU compile, which needs jax with the CUDA plugin installed but no GPU
(``JAX_PLATFORMS=cpu``), a GPU target config (``GPU_TARGETS``) and autotuning off. Without a
GPU there is no cuDNN either: :func:`allow_cudnn_without_gpu` answers jax's cuDNN checks from
the target so the port's flash attention can be compiled too.

A case is ``preset:batch:seq:precision[:int8|nf4|nf4-dq][:remat][:noscan]`` (:func:`parse_case`; preset: a
``PRESETS`` shape or a model of the advisor's catalog;
``noscan``: layers unrolled, as ``lora train`` loads non-Llama models; default scan over layers,
as the benchmarks run them).
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

from flax_lora.lora import LoraConfig, init_lora
from flax_lora.models.base import CausalLM, param_shapes
from flax_lora.models.decoder import DecoderLM
from flax_lora.models.stacking import stack_layers
from flax_lora.perf.shapes import PRESETS, bench_config, catalog_shape, target_linears
from flax_lora.training.losses import default_chunk
from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

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
    """``preset:batch:seq:precision[:int8][:remat][:noscan]`` -> a case dict."""
    parts = text.split(":")
    return {"preset": parts[0], "batch": int(parts[1]), "seq": int(parts[2]), "precision": parts[3],
            "quantization": next((p for p in parts[4:] if p in ("int8", "nf4", "nf4-dq")), "none"),
            "remat": "remat" in parts[4:],
            "scan": "noscan" not in parts[4:]}


def gpu_device(target: str):
    """A compile-only GPU device for ``target`` (a ``GPU_TARGETS`` key; no GPU needed).

    Turns XLA's GPU autotuning off (``XLA_FLAGS``): there is no device to time kernels on.
    """
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    from jax.experimental import topologies

    return topologies.get_topology_desc(target, "cuda", target_config=GPU_TARGETS[target], topology="1x1x1").devices[0]


def allow_cudnn_without_gpu(compute_capability=(9, 0), cudnn_version=91000) -> None:
    """Answer jax's cuDNN attention checks (library version, compute capability) for a
    compile-only GPU, where there is neither a device nor a cuDNN library to ask."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    def cc(c):
        return tuple(int(x) for x in c.split("."))

    fa.check_cudnn_version = lambda: cudnn_version
    fa.check_compute_capability = lambda c: compute_capability >= cc(c)
    fa.is_cuda_compute_capability_equal = lambda c: compute_capability == cc(c)


def _abstract_params(case: dict, module, config, scan: bool):
    """``jax.ShapeDtypeStruct`` frozen params of ``module`` in its layout (int8 if the case says so)."""
    flat_shapes = param_shapes(module.clone(scan=False, remat=False))
    stack = (lambda tree: stack_layers(tree, config.num_hidden_layers)) if scan else (lambda tree: tree)
    params = jax.eval_shape(stack, flat_shapes)
    if case["quantization"] != "none":
        from flax_lora.quant import quantize_as

        params = jax.eval_shape(lambda p: quantize_as(p, case["quantization"]), params)
    return params, stack


def compile_step(case: dict, device=None, r: int = 8, targets=ATTENTION):
    """The compiled train step of ``case`` on abstract arguments (no weights allocated), for the
    default backend or for ``device`` (a compile-only GPU from :func:`gpu_device`)."""
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[case["precision"]]
    config = bench_config(case["preset"], case["seq"])
    scan = case.get("scan", True)
    module = DecoderLM(config, dtype=dtype, param_dtype=dtype, scan=scan, remat=case["remat"])
    chosen = target_linears(module, config, targets, dtype)
    params, stack = _abstract_params(case, module, config, scan)
    lora = jax.eval_shape(lambda: stack(init_lora(chosen, r, jax.random.PRNGKey(0))))
    oc = OptimConfig(1e-4, total_steps=10)
    opt = make_optimizer(oc)
    state = jax.eval_shape(lambda lo: init_state(lo, opt, 0), lora)
    model = CausalLM(module, params, config, config.model_type, "mem", dtype, layers_stacked=scan)
    step = make_train_step(model, LoraConfig(r, 2 * r), opt, make_schedule(oc))
    ids = jax.ShapeDtypeStruct((1, case["batch"], case["seq"]), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    args = (state, params, batch)
    if device is not None:
        on = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), args)
    return step.lower(*args).compile()


def memory_gb(ma) -> dict:
    """GiB of a compiled step's ``memory_analysis()``, and its peak live bytes ``xla_peak_gb``.

    The donated state aliases the output: peak = arguments + temporaries + outputs - aliased.
    """
    gib = 2**30
    out = {"argument_gb": ma.argument_size_in_bytes / gib, "temp_gb": ma.temp_size_in_bytes / gib,
           "output_gb": ma.output_size_in_bytes / gib, "alias_gb": ma.alias_size_in_bytes / gib}
    out["xla_peak_gb"] = out["argument_gb"] + out["temp_gb"] + out["output_gb"] - out["alias_gb"]
    return out


def xla_peak(case: dict, r: int = 8, targets=ATTENTION, device=None) -> dict:
    """Compiled memory analysis of the train step for ``case`` (see :func:`compile_step`), GiB,
    with the compile's wall time."""
    t0 = time.perf_counter()
    out = memory_gb(compile_step(case, device, r, targets).memory_analysis())
    out["compile_seconds"] = time.perf_counter() - t0
    return out


def loss_chunks(case: dict) -> int:
    """Trips of the fused loss's chunk loop when every token is a target (the benchmark's batch)."""
    n = case["batch"] * (case["seq"] - 1)
    vocab = PRESETS[case["preset"]]["vocab"] if case["preset"] in PRESETS else catalog_shape(case["preset"]).vocab
    return math.ceil(n / default_chunk(vocab, n))
