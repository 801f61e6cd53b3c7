"""Greedy generation speed: KV-cached decoder vs the uncached one (``flax_lora.evaluation.generate``).

    JAX_PLATFORMS=cpu python benchmarks/generate_speed.py --layers 4 --hidden 256 --batch 8 --prompt 64 --new 64

A random-init model of the project's Llama port with an adapter (B != 0) on q/k/v/o; prompts of
mixed lengths up to ``--prompt`` in a buffer ``[batch, prompt + new]`` (what ``Evaluator.generate``
builds), no eos so every row decodes all ``--new`` tokens. Reports the first call (trace + compile
+ run) and the median of ``--repeats`` steady-state calls per decoder, and checks both give the
same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers import LlamaConfig

    from flax_lora.evaluation.generate import make_greedy, make_greedy_cached
    from flax_lora.lora import LoraConfig, init_lora
    from flax_lora.models.decoder import causal_lm_from_config

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
                      vocab_size=args.vocab, max_position_embeddings=4096)
    model = causal_lm_from_config(cfg, dtype=jnp.dtype(args.dtype))
    lora_cfg = LoraConfig(r=8, alpha=16.0)
    targets = {p: i for p, i in model.linears().items() if p.rsplit("/", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    lora = flatten_dict(init_lora(targets, lora_cfg.r, jax.random.PRNGKey(1)))
    lora = unflatten_dict({k: (0.05 * jax.random.normal(jax.random.PRNGKey(i), v.shape) if k[-1] == "b" else v)
                           for i, (k, v) in enumerate(sorted(lora.items()))})

    rng = np.random.default_rng(0)
    lens = rng.integers(args.prompt // 2, args.prompt + 1, args.batch).astype(np.int32)
    lens[0] = args.prompt
    buf = np.zeros((args.batch, args.prompt + args.new), np.int32)
    for i, n in enumerate(lens):
        buf[i, :n] = rng.integers(3, args.vocab, n)

    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); llama {args.layers} layers, hidden "
          f"{args.hidden}, vocab {args.vocab}, {args.dtype}; batch {args.batch}, prompts {lens.min()}-{lens.max()} "
          f"tokens in a {args.prompt}-token block, {args.new} new tokens")
    results = {}
    for name, make in (("uncached", make_greedy), ("cached", make_greedy_cached)):
        gen = make(model, lora_cfg, args.new, None)
        t0 = time.perf_counter()
        out = jax.block_until_ready(gen(model.params, lora, buf, lens))
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(gen(model.params, lora, buf, lens))
            times.append(time.perf_counter() - t0)
        steady = statistics.median(times)
        results[name] = (jax.device_get(out), steady)
        toks = args.batch * args.new
        print(f"{name:>9}: first call {first:7.2f} s, steady {steady:7.3f} s ({toks / steady:8.1f} new tokens/s)")
    same = all(np.array_equal(a, b) for a, b in zip(results["uncached"][0], results["cached"][0]))
    print(f"speedup {results['uncached'][1] / results['cached'][1]:.1f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
