"""A few LoRA train steps of a tiny Llama, data parallel over every device of every process.

Run by tests/scale/test_data_parallel.py in fresh interpreters (XLA flags and
jax.distributed must be set before JAX starts):
    python tests/scale/worker.py OUT.npz [--shard-frozen] [--coordinator H:P --num-processes N --process-id I]
Writes the per-step losses and the final adapter (process 0 only).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shard-frozen", action="store_true")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    from flax_lora.training.parallel import DataParallel, init_distributed, to_host

    init_distributed(args.coordinator, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict
    from transformers import LlamaConfig

    from flax_lora.lora import LoraConfig, init_lora
    from flax_lora.models import CausalLM
    from flax_lora.models.decoder import load_decoder
    from flax_lora.models.stacking import stack_layers
    from flax_lora.targets import resolve_targets
    from flax_lora.training.step import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.2)
    module, params, _ = load_decoder(cfg, scan=True)
    flat = CausalLM(module.clone(scan=False), load_decoder(cfg)[1], cfg, "llama", "test")
    lora = stack_layers(init_lora(resolve_targets(flat.linears(), "llama", preset="attention"), 4,
                                  jax.random.PRNGKey(1)), 2)
    model = CausalLM(module, params, cfg, "llama", "test")
    oc = OptimConfig(1e-2, total_steps=100)
    opt = make_optimizer(oc)
    dp = DataParallel(shard_frozen=args.shard_frozen)
    step = dp.wrap(make_train_step(model, LoraConfig(4, 8.0), opt, make_schedule(oc)), params)
    state = dp.put_state(init_state(lora, opt, 0))
    frozen = dp.put_frozen(params)

    rng = np.random.default_rng(0)
    k, b, t = 2, 8, 16  # global batch: 2 micro-batches of 8 rows
    nproc, pid = jax.process_count(), jax.process_index()
    rows = slice(pid * b // nproc, (pid + 1) * b // nproc)
    losses = []
    for _ in range(args.steps):
        ids = rng.integers(3, 64, (k, b, t)).astype(np.int32)
        ids[..., t // 2:] = ids[..., : t // 2]
        mask = np.ones_like(ids)
        loss_mask = np.zeros_like(ids)
        loss_mask[..., t // 2:] = 1
        loss_mask[0, 0, 12:] = 0  # unequal target counts across devices
        local = {"input_ids": ids[:, rows], "attention_mask": mask[:, rows], "loss_mask": loss_mask[:, rows]}
        state, metrics = step(state, frozen, dp.put_batch(local))
        losses.append(float(to_host(metrics["loss"])))
    if pid == 0:
        flat_lora = {"/".join(key): v for key, v in flatten_dict(to_host(state.lora)).items()}
        np.savez(args.out, losses=np.asarray(losses), devices=dp.n_devices, processes=nproc, **flat_lora)
    print(f"process {pid}/{nproc}: {dp.n_devices} devices, losses {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
