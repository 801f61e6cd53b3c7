"""scan-in-step accumulation vs optax.MultiSteps: one optimizer update of k=4 micro-batches."""
import time, jax, jax.numpy as jnp, numpy as np, optax
from transformers import GPT2Config
from flax_lora.models import hf
from flax_lora.lora import LoraConfig, init_lora
from flax_lora.targets import resolve_targets
from flax_lora.train import *
m = hf.from_config(GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=512, n_positions=128))
lc = LoraConfig(8, 16)
lora = init_lora(resolve_targets(m.linears(), "gpt2", preset="attention"), 8, jax.random.PRNGKey(0))
k, b, T = 4, 4, 64
ids = np.random.default_rng(0).integers(0, 512, (k, b, T)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
oc = OptimConfig(1e-3, total_steps=1000)
opt = make_optimizer(oc)
scan_step = make_train_step(m, lc, opt, make_schedule(oc))
ms = optax.MultiSteps(opt, every_k_schedule=k)
loss = make_loss_fn(m, lc)
@jax.jit
def ms_step(lora, st, frozen, mb):
    f = lambda lo: (lambda s, n: s / n)(*loss(lo, frozen, mb, jax.random.PRNGKey(0), False))
    v, g = jax.value_and_grad(f)(lora)
    u, st = ms.update(g, st, lora)
    return optax.apply_updates(lora, u), st, v
ms_step = jax.jit(ms_step.__wrapped__ if hasattr(ms_step, "__wrapped__") else ms_step, donate_argnums=(0, 1))
s = init_state(lora, opt, 0)
l2 = jax.tree_util.tree_map(jnp.array, lora); st = ms.init(l2)
mbs = [{kk: v[i] for kk, v in batch.items()} for i in range(k)]
for _ in range(3):
    s, mt = scan_step(s, m.params, batch); jax.block_until_ready(mt)
    for mb in mbs: l2, st, v = ms_step(l2, st, m.params, mb)
    jax.block_until_ready(l2)
N = 20
t = time.perf_counter()
for _ in range(N): s, mt = scan_step(s, m.params, batch)
jax.block_until_ready(s); ts = (time.perf_counter() - t) / N
t = time.perf_counter()
for _ in range(N):
    for mb in mbs: l2, st, v = ms_step(l2, st, m.params, mb)
jax.block_until_ready(l2); tm = (time.perf_counter() - t) / N
print(f"scan: {ts*1e3:.1f} ms/update   MultiSteps: {tm*1e3:.1f} ms/update  ({k} micro-batches of {b}x{T})")
