"""The training loop around the jitted step: data, eval, checkpoints, metrics, progress.

The loop never waits on the device except every ``log_every`` steps (metrics fetched in one
``device_get``), at eval and at checkpoint time. Everything that shapes the result (data
order, dropout keys, optimizer state) is a function of the seed and the step, so a resumed
run replays exactly the batches and keys an uninterrupted one would.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax_lora.errors import UserError
from flax_lora.run import RunConfig, RunDir

GUIDE_DEFAULTS = {"r": 8, "alpha": 16.0, "dropout": 0.1, "learning_rate": 2e-4, "batch_size": 4, "epochs": 3,
                  "target_preset": "attention-qv"}


def config_from_advice(advice, *, model: str | None, data: str | None, output: str, overrides: dict[str, Any]) -> RunConfig:
    """Advice (or the guide's defaults when None) < demo settings < explicit flags."""
    from flax_lora import demo as demo_mod

    is_demo = model is None and data is None
    if (model is None) != (data is None):
        raise UserError("give both --model and --data, or neither (the built-in demo)")
    base: dict[str, Any] = dict(GUIDE_DEFAULTS)
    if advice is not None:
        lo, tr = advice.lora, advice.training
        base.update(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, use_rslora=lo.use_rslora,
                    target_preset=lo.target_preset, target_modules=list(lo.target_modules),
                    epochs=tr.epochs, batch_size=tr.per_device_batch_size, grad_accum=tr.gradient_accumulation_steps,
                    max_length=tr.max_length, learning_rate=tr.learning_rate, lr_schedule=tr.lr_schedule,
                    warmup_steps=tr.warmup_steps, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
                    precision=tr.precision)
    if is_demo:
        base.update(demo_mod.OVERRIDES)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if is_demo or not _on_accelerator():
        base["precision"] = overrides.get("precision") or "fp32"  # CPU: fp32 unless asked
    return RunConfig(model=model or "demo", data=data or "demo", output=str(output), demo=is_demo,
                     **{k: v for k, v in base.items() if k not in ("model", "data", "output")})


def _on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


@dataclass
class Setup:
    """Everything built from a RunConfig: model, tokenizer, data, adapter, evaluator."""

    cfg: RunConfig
    model: Any
    tokenizer: Any
    train_examples: list
    eval_examples: list
    linears: dict
    targets: dict
    lora_cfg: Any


def build(cfg: RunConfig, rd: RunDir, *, with_train: bool = True) -> Setup:
    import jax.numpy as jnp

    from flax_lora import data as D
    from flax_lora import demo as demo_mod
    from flax_lora.lora import LoraConfig
    from flax_lora.models import load_model, load_tokenizer
    from flax_lora.targets import resolve_targets

    if cfg.demo:
        model_dir, train_path, eval_path = demo_mod.materialize(rd.path, cfg.seed)
        cfg.resolved.update(model_path=str(model_dir), data_path=str(train_path), eval_data_path=str(eval_path))
    model_src = cfg.resolved.get("model_path", cfg.model)
    data_src = cfg.resolved.get("data_path", cfg.data)
    eval_src = cfg.resolved.get("eval_data_path", cfg.eval_data)

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[cfg.precision]
    rows = D.load_rows(data_src)  # data errors first: they are cheap to find
    fmt = D.detect_format(list(rows[0].keys()), cfg.input_field, cfg.target_field)
    if eval_src:
        eval_rows = D.load_rows(eval_src)
        D.detect_format(list(eval_rows[0].keys()), fmt.input_field if fmt.kind != "text" else None, fmt.target_field)
        train_rows = rows
    else:
        train_rows, eval_rows = D.split_eval(rows, seed=cfg.seed)
    tokenizer = load_tokenizer(model_src)
    model = load_model(model_src, dtype=dtype)
    to_ex = lambda rs: D.tokenize([D.to_text(r, fmt, tokenizer) for r in rs], tokenizer, cfg.max_length)
    train_ex = to_ex(train_rows) if with_train else []
    eval_ex = to_ex(eval_rows)
    linears = model.linears()
    targets = resolve_targets(linears, model.model_type, preset=cfg.target_preset, modules=cfg.target_modules)
    lora_cfg = LoraConfig(cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
    cfg.resolved.update(
        model_type=model.model_type, data_format=fmt.describe(), train_examples=len(train_ex) or cfg.resolved.get("train_examples"),
        eval_examples=len(eval_ex), targets=sorted(targets), scaling=lora_cfg.scaling,
    )
    return Setup(cfg, model, tokenizer, train_ex, eval_ex, linears, targets, lora_cfg)


def train(cfg: RunConfig, *, resume: bool = False, advice_json: str | None = None, quiet: bool = False,
          note: str | None = None) -> dict[str, Any]:
    """Run (or resume) training into ``cfg.output``; returns eval.json's content."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from flax_lora.adapter import save_adapter
    from flax_lora.checkpoint import Checkpoints
    from flax_lora.data import Batches, Position
    from flax_lora.evaluate import Evaluator
    from flax_lora.io import atomic_write_json, atomic_write_text
    from flax_lora.lora import init_lora
    from flax_lora.train import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rd = RunDir(cfg.output)
    resuming = rd.prepare(cfg, resume)
    if resuming:  # keep what the first run resolved (demo paths, targets), take the new step budget
        cfg.resolved = {**rd.load_config().resolved, **cfg.resolved}
    if cfg.demo:
        say("lora: no --model/--data given: training the built-in demo (a small random-init GPT-2 learning to "
            "reverse and spell digits, fully offline)")
    t_start = time.time()
    s = build(cfg, rd)
    if note:  # said only once the inputs are known good (a bad input's error stays one line)
        say(f"lora: {note}")
    batches = Batches(s.train_examples, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.max_length, s.tokenizer.pad_token_id)
    cfg.total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    cfg.resolved["steps_per_epoch"] = batches.steps_per_epoch
    if advice_json is not None and not rd.advice.exists():
        atomic_write_text(rd.advice, advice_json)
    rd.write_config(cfg)

    oc = OptimConfig(cfg.learning_rate, cfg.lr_schedule, cfg.warmup_steps, cfg.total_steps, cfg.weight_decay, cfg.max_grad_norm)
    optimizer, schedule = make_optimizer(oc), make_schedule(oc)
    step_fn = make_train_step(s.model, s.lora_cfg, optimizer, schedule)
    lora0 = init_lora(s.targets, cfg.r, jax.random.PRNGKey(cfg.seed))
    state = init_state(lora0, optimizer, cfg.seed)
    frozen = s.model.params
    ckpt = Checkpoints(rd.checkpoints, keep=cfg.keep_checkpoints)
    pos = Position()
    if resuming and ckpt.latest_step() is not None:
        state, pos, _ = ckpt.restore(state)
        rd.truncate_metrics(int(state.step))
        say(f"lora: resuming {rd.path} at step {int(state.step)} (epoch {pos.epoch}, batch {pos.batch})")
    elif resuming:
        rd.truncate_metrics(0)

    ev = Evaluator(s.model, s.lora_cfg, s.tokenizer, s.eval_examples, max_length=cfg.max_length,
                   batch_size=min(16, max(1, len(s.eval_examples))), max_new_tokens=cfg.max_new_tokens)
    if rd.eval_before.is_file():
        import json

        before = json.loads(rd.eval_before.read_text())
    else:
        before = ev.evaluate(lora0, frozen, cfg.rouge_examples)
        atomic_write_json(rd.eval_before, before)
        rd.log({"step": 0, "epoch": 0.0, "eval_loss": before["loss"], "eval_perplexity": before["perplexity"]})
    say(f"lora: before training: eval loss {before['loss']:.3f}, ROUGE-L {before.get('rougeL', 0):.3f}")

    start = int(state.step)
    bar = tqdm(total=cfg.total_steps, initial=start, disable=quiet, unit="step", dynamic_ncols=True, file=sys.stderr)
    pending: list[tuple[int, float, dict]] = []
    window_tokens, window_t0 = 0, time.time()
    eval_loss = None
    steady_tokens, steady_time, compile_s = 0, 0.0, 0.0
    it = batches.iterate(pos)
    step = start
    while step < cfg.total_steps:
        pos, batch = next(it)
        state, metrics = step_fn(state, frozen, batch)
        step += 1
        window_tokens += int(batch["attention_mask"].sum())
        pending.append((step, pos.epoch + pos.batch / batches.steps_per_epoch, metrics))
        last = step == cfg.total_steps
        if step == start + 1 and not last:  # compile time stays out of tokens/s
            jax.block_until_ready(metrics)
            compile_s, window_tokens, window_t0 = time.time() - window_t0, 0, time.time()
        if step % cfg.log_every == 0 or last:
            fetched = jax.device_get([m for _, _, m in pending])  # the loop's only regular sync
            dt = time.time() - window_t0
            tok_s = window_tokens / max(dt, 1e-9)
            steady_tokens, steady_time = steady_tokens + window_tokens, steady_time + dt
            n = sum(float(m["tokens"]) for m in fetched)
            loss = sum(float(m["loss"]) * float(m["tokens"]) for m in fetched) / max(n, 1.0)
            m = fetched[-1]
            row = {"step": step, "epoch": round(pending[-1][1], 4), "loss": loss, "learning_rate": float(m["learning_rate"]),
                   "grad_norm": float(m["grad_norm"]), "tokens_per_second": round(tok_s, 1)}
            rd.log(row)
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {step}; lower the learning rate (e.g. halve it) and --resume")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(step - bar.n)
            pending, window_tokens, window_t0 = [], 0, time.time()
        if cfg.eval_every and step % cfg.eval_every == 0 and not last:
            e = ev.loss(state.lora, frozen)
            eval_loss = e["loss"]
            rd.log({"step": step, "epoch": round(pos.epoch + pos.batch / batches.steps_per_epoch, 4),
                    "eval_loss": e["loss"], "eval_perplexity": e["perplexity"]})
            window_t0 = time.time()
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            ckpt.save(state, pos, eval_loss)
            window_t0 = time.time()
    bar.close()

    after = ev.evaluate(state.lora, frozen, cfg.rouge_examples)
    rd.log({"step": step, "epoch": round(pos.epoch + pos.batch / batches.steps_per_epoch, 4),
            "eval_loss": after["loss"], "eval_perplexity": after["perplexity"]})
    ckpt.save(state, pos, after["loss"])
    ckpt.close()
    save_adapter(rd.adapter, jax.device_get(state.lora), s.lora_cfg, s.linears,
                 target_modules=sorted(s.targets), base_model=cfg.resolved.get("model_path", cfg.model),
                 model_type=s.model.model_type)
    result = {
        "step": step,
        "before": before,
        "after": after,
        "train_tokens_per_second": round(steady_tokens / steady_time, 1) if steady_time else None,
        "first_step_seconds": round(compile_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    atomic_write_json(rd.eval, result)
    rd.plot()
    say(f"lora: after training:  eval loss {after['loss']:.3f} (perplexity {after['perplexity']:.2f}), "
        f"ROUGE-1/2/L {after.get('rouge1', 0):.3f}/{after.get('rouge2', 0):.3f}/{after.get('rougeL', 0):.3f}")
    say(f"lora: wrote {rd.adapter}, {rd.metrics.name}, {rd.loss_png.name}, {rd.eval.name} in {rd.path}")
    return result


def load_run(run_dir: str | Path, *, data: str | None = None):
    """(Setup, lora) of a finished run: for ``lora eval`` and ``lora generate``."""
    from flax_lora.adapter import load_adapter

    rd = RunDir(run_dir)
    cfg = rd.load_config()
    if data:
        cfg.eval_data = data
        cfg.resolved.pop("eval_data_path", None)
    s = build(cfg, rd, with_train=False)
    lora, _, _, _ = load_adapter(rd.adapter)
    return s, lora
