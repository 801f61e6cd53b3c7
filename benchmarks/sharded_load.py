"""Host memory of loading frozen weights straight into their shards, per process, and the losses.

    python benchmarks/sharded_load.py [--preset bench|tiny] [--steps 3] [--json OUT] [--keep DIR]

Writes a random-init Llama-shaped PyTorch safetensors checkpoint of S bytes (fp32, sharded into
several files with ``model.safetensors.index.json``), then loads it in fresh interpreters on the
CPU with forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one
process or two (``jax.distributed`` on localhost, gloo collectives):

- ``whole``: what loading did before (``read_checkpoint`` memory-maps every file,
  ``torch_to_flax`` makes a host copy, the layers are stacked, then ``DataParallel.put_frozen``
  replicates onto the devices);
- ``replicated``: :func:`flax_lora.models.weights.load_params` leaf by leaf, a full copy per device;
- ``sharded``: the same with ``--shard-frozen`` (``FrozenPlan(shard=True)``): each device receives
  only its slice and each process reads only its devices' byte ranges.

Per process: the resident-memory high-water mark while loading (``VmHWM`` reset through
``/proc/self/clear_refs`` just before loading, so imports and the JAX runtime are the fixed
overhead ``rss_before``), the bytes read from files (``rchar`` of ``/proc/self/io``), the largest
frozen-weight bytes on one device; then ``--steps`` LoRA train steps on one global batch (4 rows,
the same in every configuration) whose losses must equal the single-device replicated run's.
On a CPU the devices live in host memory, so a process holds its devices' shards: S x (local
devices) / N. The worker mode (``--worker``) is what the parent starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # Llama-shaped; every split dimension divisible by 4
    "bench": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
    "test": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),  # tests/scale/test_sharded_load.py: S = 52 MiB
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
# (name, processes, devices per process, mode)
RUNS = (("1x1 replicated", 1, 1, "replicated"), ("1x1 whole (before)", 1, 1, "whole"),
        ("1x4 sharded", 1, 4, "sharded"), ("2x1 sharded", 2, 1, "sharded"), ("2x2 sharded", 2, 2, "sharded"),
        ("2x2 replicated", 2, 2, "replicated"), ("2x2 whole (before)", 2, 2, "whole"))
BATCH, SEQ = 4, 32


def _proc(field: str) -> int:
    """A ``kB`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rchar() -> int:
    return int(next(ln.split()[1] for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar")))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def write_checkpoint(folder: Path, preset: str) -> int:
    """A random-init checkpoint of ``preset`` in ``folder`` (fp32, ~64 MiB files); its bytes."""
    import numpy as np
    from transformers import LlamaConfig

    from flax_lora.models.decoder import load_decoder
    from flax_lora.models.weights import flax_to_torch, write_checkpoint as write

    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=128, initializer_range=0.02,
                      tie_word_embeddings=False)
    _, params, _ = load_decoder(cfg)
    tensors = flax_to_torch(params, dtype=np.float32)
    del params
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    write(folder, tensors, max_shard_bytes=64 * 2**20)
    return sum(t.nbytes for t in tensors.values())


def _load_whole(folder, dp):
    """The loading path before this change, for comparison."""
    import jax
    import jax.numpy as jnp

    from flax_lora.models import CausalLM
    from flax_lora.models.base import param_shapes
    from flax_lora.models.decoder import DecoderLM, load_config
    from flax_lora.models.stacking import stack_layers
    from flax_lora.models.weights import read_checkpoint, torch_to_flax

    cfg = load_config(folder)
    module = DecoderLM(cfg, scan=True)
    params = torch_to_flax(read_checkpoint(folder), param_shapes(module.clone(scan=False)), dtype=jnp.float32)
    params = stack_layers(jax.tree_util.tree_map(jnp.asarray, params), cfg.num_hidden_layers)
    params = dp.put_frozen(params) if dp is not None else params
    return CausalLM(module, params, cfg, "llama", str(folder), layers_stacked=True)


def _train(model, dp, steps: int) -> list[float]:
    """``steps`` LoRA steps (r=8, attention) on one fixed global batch; the losses."""
    import jax
    import numpy as np

    from flax_lora.lora import LoraConfig, init_lora
    from flax_lora.targets import resolve_targets
    from flax_lora.training.parallel import to_host
    from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    lora = model.stack_lora(init_lora(resolve_targets(model.linears(), "llama", preset="attention"), 8,
                                      jax.random.PRNGKey(1)))
    oc = OptimConfig(1e-2, total_steps=100)
    opt = make_optimizer(oc)
    step = make_train_step(model, LoraConfig(8, 16.0), opt, make_schedule(oc))
    state = init_state(lora, opt, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (1, BATCH, SEQ)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    if dp is not None:
        step, state = dp.wrap(step, model.params), dp.put_state(state)
        nproc, pid = jax.process_count(), jax.process_index()
        rows = slice(pid * BATCH // nproc, (pid + 1) * BATCH // nproc)
        batch = dp.put_batch({k: v[:, rows] for k, v in batch.items()})
    losses = []
    for _ in range(steps):
        state, metrics = step(state, model.params, batch)
        losses.append(float(to_host(metrics["loss"])))
    return losses


def worker(args) -> int:
    """One process of one configuration: load, measure, train, write its JSON."""
    from flax_lora.training.parallel import init_distributed

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from flax_lora.models import load_model
    from flax_lora.training.parallel import DataParallel, FrozenPlan, bytes_per_device

    from flax_lora.models.decoder import DecoderLM, load_config
    from flax_lora.models.base import param_shapes

    # the fixed overhead before the baseline: the runtime up, the modules loading imports, one trace
    param_shapes(DecoderLM(load_config(args.worker), scan=True))
    jax.block_until_ready(jax.numpy.zeros(1))
    rss0, read0 = _proc("VmRSS"), _rchar()
    _reset_peak()
    t0 = time.perf_counter()
    if args.mode == "whole":
        dp = DataParallel() if jax.device_count() > 1 else None
        model = _load_whole(args.worker, dp)
    else:
        plan = FrozenPlan(shard=args.mode == "sharded")
        model = load_model(args.worker, scan=True, placement=plan)
        dp = plan.dp
    jax.block_until_ready(model.params)
    out = dict(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
               local_devices=jax.local_device_count(), mode=args.mode, load_s=round(time.perf_counter() - t0, 2),
               rss_before=rss0, peak=_proc("VmHWM"), read=_rchar() - read0,
               per_device=bytes_per_device(model.params))
    out["losses"] = _train(model, dp, args.steps)
    Path(f"{args.out}.{jax.process_index()}.json").write_text(json.dumps(out))
    return 0


def _env(devices: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    for k in ("LORA_COORDINATOR", "LORA_NUM_PROCESSES", "LORA_PROCESS_ID", "SLURM_JOB_ID", "LORA_DEVICE_MEMORY_GB"):
        env.pop(k, None)
    return env


def run(folder: Path, out: Path, processes: int, devices: int, mode: str, steps: int) -> list[dict]:
    """One configuration in fresh interpreters; each process's figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--worker", str(folder), "--mode", mode, "--out", str(out), "--steps", str(steps)]
    procs = []
    for pid in range(processes):
        extra = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                 "--process-id", str(pid)] if processes > 1 else []
        procs.append(subprocess.Popen(cmd + extra, env=_env(devices), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        text, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{mode} {processes}x{devices} failed:\n{text[-3000:]}")
    return [json.loads(Path(f"{out}.{i}.json").read_text()) for i in range(processes)]


def environment() -> dict:
    """CPU model, avx512_bf16, cores, versions (for RESULTS.md)."""
    import flax
    import jax

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
            "cores": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__, "python": sys.version.split()[0]}


def _table(size: int, results: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    rows = ["| run | process | rss before | peak while loading | peak - before | S x local/N | read from files | "
            "frozen on one device | load s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, procs in results.items():
        for r in procs:
            share = size * r["local_devices"] / r["devices"] if r["mode"] == "sharded" else size * r["local_devices"]
            rows.append(f"| {name} | {r['process']} | {mib(r['rss_before'])} | {mib(r['peak'])} | "
                        f"{mib(r['peak'] - r['rss_before'])} | {mib(share)} | {mib(r['read'])} | "
                        f"{mib(r['per_device'])} | {r['load_s']} |")
    return "\n".join(rows)


def _step_parts(spec: dict):
    """(train step, abstract (state, frozen, batch)) of a ``flax_lora.perf.compiled`` case, the
    batch one row per visible device (as ``compile_step`` builds them, before it compiles)."""
    import jax
    import jax.numpy as jnp

    from flax_lora.lora import LoraConfig, init_lora
    from flax_lora.models.base import CausalLM
    from flax_lora.models.decoder import DecoderLM
    from flax_lora.perf import compiled as C
    from flax_lora.perf.shapes import bench_config, target_linears
    from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[spec["precision"]]
    config = bench_config(spec["preset"], spec["seq"])
    module = DecoderLM(config, dtype=dtype, param_dtype=dtype, scan=True, remat=spec["remat"])
    chosen = target_linears(module, config, C.ATTENTION, dtype)
    params, stack = C._abstract_params(spec, module, config, True)
    oc = OptimConfig(1e-4, total_steps=10)
    opt = make_optimizer(oc)
    state = jax.eval_shape(lambda: init_state(stack(init_lora(chosen, 8, jax.random.PRNGKey(0))), opt, 0))
    model = CausalLM(module, params, config, config.model_type, "mem", dtype, layers_stacked=True)
    step = make_train_step(model, LoraConfig(8, 16), opt, make_schedule(oc))
    ids = jax.ShapeDtypeStruct((1, jax.device_count(), spec["seq"]), jnp.int32)
    return step, (state, params, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids})


def compile_check(case: str) -> dict:
    """XLA's memory analysis (GiB per device) of the train step over every visible device, frozen
    weights replicated and split, for ``preset:seq:precision[:remat]`` (a ``flax_lora.perf``
    preset; abstract arguments, nothing allocated): what the advisor's split pricing rests on."""
    import jax

    from flax_lora.perf import compiled as C
    from flax_lora.training.parallel import DataParallel

    preset, seq, precision, *rest = case.split(":")
    spec = dict(preset=preset, batch=1, seq=int(seq), precision=precision, quantization="none",
                remat="remat" in rest, scan=True)
    step, (state, params, batch) = _step_parts(spec)
    out = {}
    for split in (False, True):
        dp = DataParallel(shard_frozen=split)
        placed = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        args = (placed(state, jax.tree_util.tree_map(lambda _: dp.replicated, state)),
                placed(params, dp.frozen_shardings(params)),
                placed(batch, jax.tree_util.tree_map(lambda _: dp.batch_sharding, batch)))
        out["split" if split else "replicated"] = C.memory_gb(dp.wrap(step, params).lower(*args).compile().memory_analysis())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="comma-separated run names")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--keep", help="checkpoint folder to write once and reuse")
    p.add_argument("--compile", help="preset:seq:precision[:remat]: the compiled step's memory, replicated vs split")
    p.add_argument("--worker"), p.add_argument("--mode"), p.add_argument("--out")
    p.add_argument("--coordinator"), p.add_argument("--num-processes", type=int), p.add_argument("--process-id", type=int)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.compile:
        print(json.dumps(compile_check(args.compile), indent=2))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="sharded_load_"))
    folder = Path(args.keep) if args.keep else tmp / "model"
    size = (json.loads((folder / "size.json").read_text()) if (folder / "size.json").is_file()
            else write_checkpoint(folder, args.preset))
    (folder / "size.json").write_text(json.dumps(size))
    wanted = args.runs.split(",")
    results = {name: run(folder, tmp / name.replace(" ", "_").replace("(", "").replace(")", ""), n, d, mode, args.steps)
               for name, n, d, mode in RUNS if name in wanted}
    ref = results[wanted[0]][0]["losses"]
    same = {name: all(abs(a - b) <= 1e-5 * abs(b) for r in procs for a, b in zip(r["losses"], ref))
            for name, procs in results.items()}
    report = {"size": size, "preset": args.preset, "environment": environment(), "runs": results,
              "losses_equal_first_run": same, "first_run_losses": ref}
    print(_table(size, results))
    print(f"S = {size / 2**20:,.0f} MiB; losses of {wanted[0]}: {ref}; equal in: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
