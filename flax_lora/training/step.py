"""The training step: a pure, jitted update of the LoRA params only.

``step(state, frozen, batch) -> (state, metrics)``. The frozen weights are an argument, never
differentiated nor returned, so they stay bit-for-bit unchanged; ``state`` (LoRA params, AdamW
state, step, RNG) is donated so XLA updates it in place.

Loss: token-weighted cross-entropy in float32 over the target tokens only (``loss_mask``
marks them; prompt and padding are 0). Gradient accumulation runs *inside* the step as a
``lax.scan`` over ``k`` micro-batches (batch arrays ``[k, b, T]``); each micro-batch's
summed loss is divided by the target-token count of the whole ``[k, b, T]`` batch, so ``k``
accumulated micro-batches give the same update as one ``k``-times larger batch. A packed batch
(``lora train --packing``: several examples per row, with ``segment_ids`` and ``position_ids``)
runs through the same step: the model confines attention to each example and each example's first
token has loss mask 0, so the loss and its normalisation equal the unpacked batch's.

Why scan and not ``optax.MultiSteps`` (speed is a tie on CPU; figures in
``benchmarks/RESULTS.md``): one dispatch and one executable per update (no per-micro-batch host
round trip), the AdamW update runs once instead of k masked times, state is donated once, and
the loss is normalised by the true target-token count of the whole batch, which MultiSteps (a
mean of per-micro-batch means) cannot do without a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flax_lora.lora import DROPOUT_RNG, LoraConfig, lora_active
from flax_lora.training.losses import model_token_nll  # fused chunked vocab loss where the model allows it


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates done
    lora: Any  # {path...: {"a": [in, r], "b": [r, out]}} float32
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key; dropout keys are fold_in(rng, step)


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at total_steps)
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0, then constant, linear decay or cosine decay to 0 at ``total_steps``."""
    lr, warm = cfg.learning_rate, max(cfg.warmup_steps, 0)
    decay = max(cfg.total_steps - warm, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, 0.0, decay)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay)
    else:
        raise ValueError(f"unknown lr schedule {cfg.schedule!r}")
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW on the schedule, after optional global-norm clipping."""
    adamw = optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def init_state(lora, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0. ``lora`` is copied: the step donates the state, the caller keeps its arrays."""
    lora = jax.tree_util.tree_map(jnp.array, lora)
    return TrainState(jnp.zeros((), jnp.int32), lora, optimizer.init(lora), jax.random.PRNGKey(seed))


def make_loss_fn(model, lora_cfg: LoraConfig):
    """``loss(lora, frozen, batch, key, deterministic) -> (nll_sum, n_tokens)`` for one [b, T] batch."""

    def loss(lora, frozen, batch, key, deterministic: bool):
        with lora_active(lora_cfg.scaling, lora_cfg.dropout, deterministic):
            return model_token_nll(model, {"params": frozen, "lora": lora}, batch, rngs={DROPOUT_RNG: key})

    return loss


def make_train_step(model, lora_cfg: LoraConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """Jitted ``step(state, frozen, batch) -> (state, metrics)``; batch arrays are [k, b, T].

    metrics: loss (mean NLL per target token), grad_norm (before clipping), learning_rate
    (the one applied), tokens (target tokens in the batch). All stay on device.
    """
    loss = make_loss_fn(model, lora_cfg)

    def step(state: TrainState, frozen, batch):
        n_total = jnp.maximum(jnp.sum(batch["loss_mask"][..., 1:]).astype(jnp.float32), 1.0)
        key = jax.random.fold_in(state.rng, state.step)

        def micro(carry, xs):
            grads, total = carry
            i, mb = xs
            f = lambda lo: loss(lo, frozen, mb, jax.random.fold_in(key, i), False)[0] / n_total
            value, g = jax.value_and_grad(f)(state.lora)
            return (jax.tree_util.tree_map(jnp.add, grads, g), total + value), None

        k = batch["input_ids"].shape[0]
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
        (grads, value), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(k), batch))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = {
            "loss": value,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": n_total,
        }
        return TrainState(state.step + 1, lora, opt_state, state.rng), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(model, lora_cfg: LoraConfig):
    """Jitted ``eval(lora, frozen, batch[b, T]) -> (nll_sum, n_tokens)``, no dropout."""
    loss = make_loss_fn(model, lora_cfg)
    return jax.jit(lambda lora, frozen, batch: loss(lora, frozen, batch, jax.random.PRNGKey(0), True))
