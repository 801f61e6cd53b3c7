"""The training loop around the jitted step: data, eval, checkpoints, metrics, progress.

The loop never waits on the device except every ``log_every`` steps (metrics fetched in one
``device_get``), at eval and at checkpoint time. Everything that shapes the result (data
order, dropout keys, optimizer state) is a function of the seed and the step, so a resumed
run replays exactly the batches and keys an uninterrupted one would.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax_lora.errors import UserError
from flax_lora.run import RunConfig, RunDir

QUANTIZATION = ("none", "int8")
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
                    precision=tr.precision, quantization=tr.quantization, remat=tr.gradient_checkpointing)
    if is_demo:
        base.update(demo_mod.OVERRIDES)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("eval_data", "adapter"):
        if key in overrides:
            overrides[key] = local_path(overrides[key])
    if overrides.get("adapter"):  # continuing an adapter fixes its rank and scaling
        from flax_lora.adapter import adapter_settings

        base.update(adapter_settings(overrides["adapter"]))
    base.update(overrides)
    if is_demo or not _on_accelerator():
        base["precision"] = overrides.get("precision") or "fp32"  # CPU: fp32 unless asked
    return RunConfig(model=local_path(model) if model else "demo", data=local_path(data) if data else "demo",
                     output=str(output), demo=is_demo,
                     **{k: v for k, v in base.items() if k not in ("model", "data", "output")})


def local_path(source: str) -> str:
    """An existing local file or folder as an absolute path (export and eval read it from anywhere); else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def config_for_resume(output: str, overrides: dict[str, Any]) -> RunConfig:
    """The config stored in ``output`` with the flags a --resume may change applied.

    Any other flag must equal the stored value (else: a different run).
    """
    from flax_lora.run import RESUMABLE

    cfg = RunDir(output).load_config()
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("eval_data", "adapter"):
            value = local_path(value)
        if key in RESUMABLE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            may = ", ".join(sorted(k for k in RESUMABLE if k != "total_steps"))
            raise UserError(f"--resume: {output} holds a different run ({key} was {getattr(cfg, key)!r}, now "
                            f"{value!r}); a resume may change only {may}. Choose another --output")
    cfg.output = str(output)
    return cfg


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
    reports: dict  # "train" / "eval" -> flax_lora.rows.RowReport
    init_lora: Any = None  # from --adapter


def build(cfg: RunConfig, rd: RunDir, *, with_train: bool = True) -> Setup:
    import jax.numpy as jnp

    from flax_lora import data as D
    from flax_lora import demo as demo_mod
    from flax_lora.lora import LoraConfig
    from flax_lora.models import load_model, load_tokenizer
    from flax_lora.targets import resolve_targets

    if cfg.demo:  # process 0 writes the demo's files, the others read them (one shared folder)
        from flax_lora.parallel import barrier

        if rd.primary:
            demo_mod.materialize(rd.path, cfg.seed)
        barrier("lora-demo-files")
        model_dir, train_path, eval_path = demo_mod.materialize(rd.path, cfg.seed)
        cfg.resolved.update(model_path=str(model_dir.resolve()), data_path=str(train_path.resolve()),
                            eval_data_path=str(eval_path.resolve()))
    model_src = cfg.resolved.get("model_path", cfg.model)
    data_src = cfg.resolved.get("data_path", cfg.data)
    eval_src = cfg.resolved.get("eval_data_path", cfg.eval_data)

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[cfg.precision]
    # data errors first: they are cheap to find
    train_rows, fmt, train_report = D.load_checked(data_src, input_field=cfg.input_field,
                                                   target_field=cfg.target_field, policy=cfg.on_bad_row)
    reports = {"train": train_report}
    if eval_src:
        eval_rows, _, reports["eval"] = D.load_checked(eval_src, fmt=fmt, policy=cfg.on_bad_row)
    else:
        train_rows, eval_rows = D.split_eval(train_rows, seed=cfg.seed)
    if cfg.quantization not in QUANTIZATION:
        raise UserError(f"quantization {cfg.quantization!r}: use one of {', '.join(QUANTIZATION)}")
    tokenizer = load_tokenizer(model_src)
    model = load_model(model_src, dtype=dtype, scan=True, remat=cfg.remat)  # scan where the family can
    linears = model.linears()  # found on the float weights
    if cfg.quantization == "int8":
        from flax_lora.quant import quantize_params

        model.params = quantize_params(model.params, conv1d_paths=[p for p, i in linears.items() if i.kind == "conv1d"])
    to_ex = lambda rs: D.tokenize([D.to_text(r, fmt, tokenizer) for r, _ in rs], tokenizer, cfg.max_length)
    train_ex = to_ex(train_rows) if with_train else []
    eval_ex = to_ex(eval_rows)
    for rows, exs, rep in ((train_rows, train_ex, train_report), (eval_rows, eval_ex, reports.get("eval", train_report))):
        rep.truncated = sorted(set(rep.truncated) | {n for (_, n), ex in zip(rows, exs) if ex.truncated})
    lora_init = None
    if cfg.adapter:
        from flax_lora.adapter import load_any_adapter
        from flax_lora.lora import lora_paths

        lora_init, acfg = load_any_adapter(cfg.adapter, linears, model.model_type)
        targets = {p: linears[p] for p in lora_paths(lora_init)}
        lora_init = model.stack_lora(lora_init)
        lora_cfg = LoraConfig(acfg.r, acfg.alpha, cfg.dropout, acfg.use_rslora)
    else:
        targets = resolve_targets(linears, model.model_type, preset=cfg.target_preset, modules=cfg.target_modules)
        lora_cfg = LoraConfig(cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
    cfg.resolved.update(
        model_type=model.model_type, scan_layers=model.layers_stacked, data_format=fmt.describe(), train_examples=len(train_ex) or cfg.resolved.get("train_examples"),
        eval_examples=len(eval_ex), targets=sorted(targets), scaling=lora_cfg.scaling,
    )
    return Setup(cfg, model, tokenizer, train_ex, eval_ex, linears, targets, lora_cfg, reports, lora_init)


class _Signals:
    """SIGINT / SIGTERM set ``signum``; the loop checks it after each step. A second one aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nlora: {signal.Signals(signum).name}: stopping after the current step, saving a checkpoint once "
              "training has started (send it again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fmt_lr(x: float) -> str:
    """2e-4 style (what the guide writes, and what --learning-rate accepts)."""
    if x >= 1e-2:
        return f"{x:.3g}"
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def _first_nonfinite(pending) -> tuple[int, float, float] | None:
    """(step, loss, grad norm) of the first step whose loss or gradient norm is not finite."""
    for step, _, m in pending:
        loss, gn = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gn)):
            return step, loss, gn
    return None


def _frozen_too_big(params, share: float = 0.5) -> bool:
    """True when a full copy of the frozen weights would take over ``share`` of one device's
    memory (then they are split over the devices; devices without memory stats: never)."""
    import jax

    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    return bool(limit) and size > share * limit


def step_of(state) -> int:
    """The optimizer step of a train state (replicated over devices and processes)."""
    from flax_lora.parallel import to_host

    return int(to_host(state.step))


def train(cfg: RunConfig, *, resume: bool = False, advice_json: str | None = None, quiet: bool = False,
          note: str | None = None) -> dict[str, Any]:
    """Run (or resume) training into ``cfg.output``; returns eval.json's content.

    SIGINT / SIGTERM: the step in flight finishes, a checkpoint is saved, :class:`Interrupted`
    is raised. A non-finite loss or gradient norm (checked whenever metrics are fetched: at each
    log and before each checkpoint, so a diverged state is never saved) raises :class:`Diverged`
    with the last good checkpoint kept, or, with ``on_divergence="halve-lr"``, rolls back to it
    and continues at half the learning rate (at most ``MAX_LR_HALVINGS`` times).
    """
    with _Signals() as signals:
        return _train(cfg, resume, advice_json, quiet, note, signals)


def _train(cfg: RunConfig, resume: bool, advice_json: str | None, quiet: bool, note: str | None,
           signals: _Signals) -> dict[str, Any]:
    import jax
    from tqdm.auto import tqdm

    from flax_lora import data as D
    from flax_lora import perf
    from flax_lora.adapter import save_adapter
    from flax_lora.checkpoint import Checkpoints
    from flax_lora.data import Batches, Position
    from flax_lora.errors import Diverged, Interrupted
    from flax_lora.evaluate import Evaluator
    from flax_lora.lora import init_lora
    from flax_lora.parallel import DataParallel, agreed, from_primary, is_primary, max_over_processes, to_host
    from flax_lora.targets import shortest_names
    from flax_lora.run import DIVERGENCE, MAX_LR_HALVINGS
    from flax_lora.train import OptimConfig, init_state, make_optimizer, make_schedule, make_train_step

    primary = is_primary()  # several processes: process 0 alone writes, prints and shows progress
    say = (lambda *a: None) if quiet or not primary else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.on_divergence not in DIVERGENCE:
        raise UserError(f"--on-divergence {cfg.on_divergence!r}: use one of {', '.join(DIVERGENCE)}")
    rd = RunDir(cfg.output, primary=primary)
    resuming = agreed(rd.prepare, cfg, resume)
    if resuming:  # keep what the first run resolved (demo paths, targets), take the new step budget
        cfg.resolved = {**rd.load_config().resolved, **cfg.resolved}
    if cfg.demo:
        say("lora: no --model/--data given: training the built-in demo (a small random-init GPT-2 learning to "
            "reverse and spell digits, fully offline)")
    t_start = time.time()
    s = agreed(build, cfg, rd)
    for name, rep in s.reports.items():  # bad rows are reported even with --quiet (stderr)
        if rep.summary() and primary:
            print(f"lora: {name} data: {rep.summary()}", file=sys.stderr, flush=True)
    rd.write_json(rd.data_report, {name: D.report_json(rep, cfg.on_bad_row) for name, rep in s.reports.items()})
    if note:  # said only once the inputs are known good (a bad input's error stays one line)
        say(f"lora: {note}")
    # data parallel over every visible device: the global micro-batch is per-device batch x devices
    n_dev, nproc, pid = jax.device_count(), jax.process_count(), jax.process_index()
    if resuming and cfg.resolved.get("devices", 1) != n_dev:
        raise UserError(f"--resume: {rd.path} was trained on {cfg.resolved.get('devices', 1)} device(s), {n_dev} are "
                        "visible now; the batches would differ. Resume with the same device count")
    shard = cfg.shard_frozen or (n_dev > 1 and _frozen_too_big(s.model.params))
    if shard and not cfg.shard_frozen and n_dev > 1:
        say(f"lora: the frozen weights take over half of a device's memory: splitting them over the {n_dev} devices")
    dp = DataParallel(shard_frozen=shard) if n_dev > 1 else None
    cfg.resolved["frozen_sharded"] = bool(dp and shard)
    global_batch = cfg.batch_size * n_dev
    batches = Batches(s.train_examples, global_batch, cfg.grad_accum, cfg.seed, cfg.max_length, s.tokenizer.pad_token_id)
    rows = slice(pid * global_batch // nproc, (pid + 1) * global_batch // nproc)  # this process's rows
    feed = (lambda b: dp.put_batch({k: v[:, rows] for k, v in b.items()})) if dp else (lambda b: b)
    place = dp.put_state if dp else (lambda st: st)
    device_kind = jax.devices()[0].device_kind
    cfg.resolved.update(devices=n_dev, processes=nproc, device_kind=device_kind,
                        effective_batch_size=cfg.batch_size * cfg.grad_accum * n_dev)
    cfg.total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    cfg.resolved["steps_per_epoch"] = batches.steps_per_epoch
    if advice_json is not None and not rd.advice.exists():
        rd.write_text(rd.advice, advice_json)
    rd.write_config(cfg)
    if sig := max_over_processes(signals.signum or 0):  # while loading: the folder is a run now, resumable
        raise Interrupted(f"lora: {signal.Signals(sig).name} while loading, before training started (nothing to "
                          f"save). Continue with: lora train --output {cfg.output} --resume", 128 + sig)

    def compile_step(lr: float):
        oc = OptimConfig(lr, cfg.lr_schedule, cfg.warmup_steps, cfg.total_steps, cfg.weight_decay, cfg.max_grad_norm)
        optimizer = make_optimizer(oc)
        step = make_train_step(s.model, s.lora_cfg, optimizer, make_schedule(oc))
        return optimizer, (dp.wrap(step, frozen) if dp else step)

    frozen = dp.put_frozen(s.model.params) if dp else s.model.params
    optimizer, step_fn = compile_step(cfg.learning_rate)
    lora0 = (s.init_lora if s.init_lora is not None
             else s.model.stack_lora(init_lora(s.targets, cfg.r, jax.random.PRNGKey(cfg.seed))))
    state = place(init_state(lora0, optimizer, cfg.seed))
    flops_per_token = perf.model_flops_fn(s.model.params, lora0, s.model.config)  # of the padded length
    ckpt = Checkpoints(rd.checkpoints, keep=cfg.keep_checkpoints)
    pos = Position()
    if resuming and ckpt.latest_step() is not None:
        state, pos, _ = ckpt.restore(state)  # restored with the placed state's shardings
        rd.truncate_metrics(step_of(state))
        say(f"lora: resuming {rd.path} at step {step_of(state)} (epoch {pos.epoch}, batch {pos.batch})")
    elif resuming:
        rd.truncate_metrics(0)
    bar = None
    try:
        ev = Evaluator(s.model, s.lora_cfg, s.tokenizer, s.eval_examples, max_length=cfg.max_length,
                       batch_size=min(16, max(1, len(s.eval_examples))), max_new_tokens=cfg.max_new_tokens)
        if from_primary(rd.eval_before.is_file()):  # every process must take the same branch
            import json

            before = json.loads(rd.eval_before.read_text())
        else:
            before = ev.evaluate(lora0, frozen, cfg.rouge_examples)
            rd.write_json(rd.eval_before, before)
            rd.log({"step": 0, "epoch": 0.0, "eval_loss": before["loss"], "eval_perplexity": before["perplexity"]})
        say(f"lora: before training: eval loss {before['loss']:.3f}, ROUGE-L {before.get('rougeL', 0):.3f}")

        def save(state, pos, eval_loss=None):
            if ckpt.latest_step() != step_of(state):
                ckpt.save(state, pos, eval_loss)

        def stop_signal() -> int:
            """The signal to stop on: with several processes, any process's (all stop together)."""
            return max_over_processes(signals.signum or 0)

        def interrupted(state, pos, where: str, sig: int):
            save(state, pos)
            raise Interrupted(f"lora: {signal.Signals(sig).name} {where}: saved a checkpoint at step {step_of(state)} "
                              f"of {cfg.total_steps}. Continue with: lora train --output {cfg.output} --resume",
                              128 + sig)

        start = step_of(state)
        bar = tqdm(total=cfg.total_steps, initial=start, disable=quiet or not primary, unit="step", dynamic_ncols=True, file=sys.stderr)
        pending: list[tuple[int, float, dict]] = []
        window_tokens, window_flops, window_t0 = 0, 0.0, time.time()
        eval_loss = None
        steady_tokens, steady_flops, steady_time, compile_s = 0, 0.0, 0.0, 0.0
        halvings = 0
        it = batches.iterate(pos)
        step = start
        if sig := stop_signal():
            interrupted(state, pos, "before the first step", sig)
        while step < cfg.total_steps:
            pos, batch = next(it)
            state, metrics = step_fn(state, frozen, feed(batch))
            step += 1
            n_tok = int(batch["attention_mask"].sum())  # host arrays: no device sync
            window_tokens += n_tok
            window_flops += n_tok * flops_per_token(batch["input_ids"].shape[-1])
            epoch = pos.epoch + pos.batch / batches.steps_per_epoch
            pending.append((step, epoch, metrics))
            last = step == cfg.total_steps
            if step == start + 1 and not last:  # compile time stays out of tokens/s
                jax.block_until_ready(metrics)
                compile_s, window_tokens, window_flops, window_t0 = time.time() - window_t0, 0, 0.0, time.time()
            log_now = step % cfg.log_every == 0 or last
            save_now = bool(cfg.save_every) and step % cfg.save_every == 0 and not last
            # one process alone acts on its signal at once; several agree on it at log and save points
            if not (log_now or save_now or (signals.signum and nproc == 1)):
                continue
            sig = stop_signal()
            # The loop's only regular sync: every pending step's loss and grad norm are checked.
            pending = [(st, ep, m) for (st, ep, _), m in zip(pending, to_host([m for _, _, m in pending]))]
            bad = _first_nonfinite(pending)
            if bad:
                bad_step, bad_loss, bad_gn = bad
                # The checkpoint of step bad_step - 1 holds the weights that gave the bad loss (finite,
                # but ruined by one update at too high a rate): only earlier ones are known good.
                ckpt.drop_after(bad_step - 2)
                good = ckpt.latest_step()
                lr = cfg.learning_rate
                event = {"event": "diverged", "diverged_at_step": bad_step, "diverged_loss": bad_loss,
                         "diverged_grad_norm": bad_gn, "lr_before": lr, "lr_after": lr / 2}
                if cfg.on_divergence == "halve-lr" and halvings < MAX_LR_HALVINGS:
                    halvings += 1
                    rd.truncate_metrics(good or 0)
                    rd.log({"step": good or 0, **event, "retry": halvings, "max_retries": MAX_LR_HALVINGS})
                    say(f"lora: loss {bad_loss} / grad norm {bad_gn} at step {bad_step}: rolling back to step "
                        f"{good or 0} and halving the learning rate ({fmt_lr(lr)} -> {fmt_lr(lr / 2)}), "
                        f"retry {halvings} of {MAX_LR_HALVINGS}")
                    cfg.learning_rate = lr / 2
                    rd.write_config(cfg)
                    optimizer, step_fn = compile_step(cfg.learning_rate)
                    state = place(init_state(lora0, optimizer, cfg.seed))
                    pos = Position()
                    if good is not None:
                        state, pos, meta = ckpt.restore(state)
                        eval_loss = meta.get("eval_loss")
                    step = start = step_of(state)
                    it, pending, window_tokens, window_flops, window_t0 = batches.iterate(pos), [], 0, 0.0, time.time()
                    bar.reset(total=cfg.total_steps)
                    bar.update(step)
                    continue
                m = pending[-1][2]
                rd.log({"step": bad_step, "epoch": round(epoch, 4), "loss": bad_loss, "learning_rate": float(m["learning_rate"]),
                        "grad_norm": bad_gn})
                rd.log({"step": bad_step, **event})
                kept = (f"kept the last good checkpoint (step {good})" if good is not None
                        else "no good checkpoint precedes it, so --resume restarts from step 0")
                tried = f" after {halvings} automatic halvings" if halvings else ""
                raise Diverged(
                    f"training diverged at step {bad_step}{tried}: loss {bad_loss}, gradient norm {bad_gn} (learning rate "
                    f"too high); {kept}. The guide's remedy: halve the learning rate ({fmt_lr(lr)} -> {fmt_lr(lr / 2)}): "
                    f"lora train --output {cfg.output} --resume --learning-rate {fmt_lr(lr / 2)}"
                    + ("" if halvings else " (or add --on-divergence halve-lr to do this automatically)"))
            if log_now:
                dt = time.time() - window_t0
                tok_s = window_tokens / max(dt, 1e-9)
                steady_tokens, steady_time = steady_tokens + window_tokens, steady_time + dt
                steady_flops += window_flops
                mfu = perf.mfu(tok_s, window_flops / max(window_tokens, 1), device_kind, n_dev)
                mem = perf.peak_memory_gb()
                fetched = [m for _, _, m in pending]
                n = sum(float(m["tokens"]) for m in fetched)
                loss = sum(float(m["loss"]) * float(m["tokens"]) for m in fetched) / max(n, 1.0)
                m = fetched[-1]
                rd.log({"step": step, "epoch": round(epoch, 4), "loss": loss, "learning_rate": float(m["learning_rate"]),
                        "grad_norm": float(m["grad_norm"]), "tokens_per_second": round(tok_s, 1),
                        **({"mfu": round(mfu, 4)} if mfu is not None else {}),
                        **({"peak_memory_gb": round(mem, 3)} if mem is not None else {})})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), refresh=False)
                bar.update(step - bar.n)
                pending, window_tokens, window_flops, window_t0 = [], 0, 0.0, time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                e = ev.loss(state.lora, frozen)
                eval_loss = e["loss"]
                rd.log({"step": step, "epoch": round(epoch, 4), "eval_loss": e["loss"], "eval_perplexity": e["perplexity"]})
                window_t0 = time.time()
            if save_now:
                save(state, pos, eval_loss)
                window_t0 = time.time()
            if sig:
                interrupted(state, pos, f"at step {step}", sig)
        bar.close()
        if sig := stop_signal():
            interrupted(state, pos, "before the final evaluation", sig)

        after = ev.evaluate(state.lora, frozen, cfg.rouge_examples)
        rd.log({"step": step, "epoch": round(pos.epoch + pos.batch / batches.steps_per_epoch, 4),
                "eval_loss": after["loss"], "eval_perplexity": after["perplexity"]})
        save(state, pos, after["loss"])
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
    if primary:
        save_adapter(rd.adapter, s.model.unstack_lora(to_host(state.lora), keep=s.targets), s.lora_cfg, s.linears,
                     target_modules=shortest_names(s.targets, s.linears), base_model=cfg.resolved.get("model_path", cfg.model),
                     model_type=s.model.model_type)
    train_mfu = (perf.mfu(steady_tokens / steady_time, steady_flops / max(steady_tokens, 1), device_kind, n_dev)
                 if steady_time else None)
    result = {
        "step": step,
        "before": before,
        "after": after,
        "train_tokens_per_second": round(steady_tokens / steady_time, 1) if steady_time else None,
        "train_mfu": None if train_mfu is None else round(train_mfu, 4),
        "peak_memory_gb": perf.peak_memory_gb(),
        "devices": n_dev,
        "first_step_seconds": round(compile_s, 1),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    rd.write_json(rd.eval, result)
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
    lora = s.model.stack_lora(lora)
    return s, lora
