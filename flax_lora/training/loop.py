"""``lora train``: prepare a run, then the training loop, read top to bottom in :func:`fit`.

The loop never waits on the device except to keep at most one step in flight, at log points
(metrics fetched in one transfer), at eval and at checkpoint time. Everything that shapes the
result (data order, dropout keys, optimizer state) is a function of the seed and the step, so a
resumed run replays exactly the batches and keys an uninterrupted one would.

SIGINT / SIGTERM: the step in flight finishes, a checkpoint is saved, :class:`Interrupted` is
raised; a second signal exits at once (:mod:`flax_lora.training.signals`). A non-finite loss or
gradient norm (checked whenever metrics are fetched: at each log and before each checkpoint, so a
diverged state is never saved) raises :class:`Diverged` with the last good checkpoint kept, or,
with ``on_divergence="halve-lr"``, rolls back to it at half the learning rate.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flax_lora.errors import Interrupted, UserError
from flax_lora.training.build import Setup, build
from flax_lora.training.config import Resolved, RunConfig
from flax_lora.training.hooks import Clock, DivergenceGuard, Log, Pending, Saver, Throughput, due, step_of
from flax_lora.training.rundir import RunDir
from flax_lora.training.signals import Signals


def train(cfg: RunConfig, *, resume: bool = False, advice_json: str | None = None, quiet: bool = False,
          note: str | None = None) -> dict[str, Any]:
    """Run (or resume) training into ``cfg.output``; returns eval.json's content."""
    t0, clock = time.time(), Clock()
    with Signals() as signals:
        with clock.section("load"):
            job = prepare(cfg, resume=resume, advice_json=advice_json, quiet=quiet, note=note, signals=signals)
        job.clock = clock
        try:
            result = fit(job)
        finally:
            job.close()
    return job.finish(result, wall_seconds=time.time() - t0)


def fit(job: "Job") -> dict[str, Any]:
    """Train from the job's first step to its last; returns the evaluations and throughput."""
    cfg, total = job.cfg, job.resolved.total_steps
    # Start: a fresh adapter or the resumed checkpoint, and the evaluation before training.
    state, pos = job.start()
    step = start = job.step_of(state)
    with job.clock.section("eval_before"):
        before = job.evaluate_before()
    job.stop_if_signalled(state, pos, "before the first step")
    pending, guard = Pending(), DivergenceGuard()
    meter = Throughput(job.flops_per_token, job.resolved.device_kind, job.resolved.devices)
    log = job.log = Log(job.rd, job.writers, total, start, show=job.show_progress)
    clock = job.clock
    batches = job.batches.iterate(pos)
    while step < total:
        # 1. One optimizer step, dispatched without waiting; at most one more stays in flight.
        pos, batch = next(batches)
        state, metrics = job.step_fn(state, job.frozen, job.feed(batch))
        step += 1
        pending.add(step, job.epoch(pos), metrics)
        meter.count(batch)
        if step == start + 1 and step < total:
            meter.first_step_done(metrics)  # compile time stays out of tokens/s
            log.row(clock.first_step_row(step, meter.first_step_seconds))
        pending.wait_previous()
        last = step == total
        point = due(step, cfg.log_every) or due(step, cfg.save_every) or last
        sig = job.stop_signal(point)
        # 2. Log point: fetch the pending metrics; a non-finite one rolls back or stops the run.
        if point or sig:
            fetched = pending.fetch()
            rolled = guard.check(job, fetched, job.epoch(pos))
            if rolled is not None:
                state, pos = rolled
                step = start = job.step_of(state)
                batches = job.batches.iterate(pos)
                log.restart(total, step)
                meter.restart()
                continue
            if due(step, cfg.log_every) or last:
                log.train(step, job.epoch(pos), fetched, meter.window())
        # 3. Eval point: the validation loss.
        if due(step, cfg.eval_every) and not last:
            with meter.paused(), clock.section("eval"):
                result = job.evaluator.loss(state.lora, job.frozen)
            job.saver.eval_loss = result["loss"]
            log.eval(step, job.epoch(pos), result)
        # 4. Save point.
        if due(step, cfg.save_every) and not last:
            with meter.paused():
                job.saver.save(state, pos)
        # 5. A stop signal: save and stop.
        if sig:
            job.interrupt(state, pos, f"at step {step}", sig)
    log.bar.close()
    job.stop_if_signalled(state, pos, "before the final evaluation")
    # End: the evaluation after training and a last checkpoint.
    with clock.section("eval"):
        after = job.evaluator.evaluate(state.lora, job.frozen, cfg.rouge_examples)
    log.eval(step, job.epoch(pos), after)
    job.saver.eval_loss = after["loss"]
    job.saver.save(state, pos)
    return {"step": step, "state": state, "before": before, "after": after, **meter.summary()}


@dataclass
class Job:
    """Everything the loop needs, built once by :func:`prepare`. ``cfg`` and ``step_fn`` change
    only when the divergence guard halves the learning rate (a new config, written to the run)."""

    cfg: RunConfig
    rd: RunDir
    setup: Setup
    resolved: Resolved
    resuming: bool
    batches: Any  # flax_lora.data.batch.Batches
    frozen: Any
    feed: Callable  # host batch -> device batch (this process's rows)
    place: Callable  # train state -> placed on the devices
    lora0: Any
    saver: Saver
    evaluator: Any  # flax_lora.evaluation.evaluator.Evaluator
    writers: list
    say: Callable[[str], None]
    show_progress: bool
    flops_per_token: Callable[[int], float]
    signals: Signals
    dp: Any = None  # flax_lora.training.parallel.DataParallel with several devices
    log: Log | None = None
    clock: Clock = field(default_factory=Clock)
    step_fn: Callable = field(init=False)
    optimizer: Any = field(init=False)

    def __post_init__(self):
        self.optimizer, self.step_fn = self.compile(self.cfg.learning_rate)

    def compile(self, lr: float):
        """(optimizer, jitted step) at learning rate ``lr`` (placed for several devices)."""
        from flax_lora.training.step import OptimConfig, make_optimizer, make_schedule, make_train_step

        c = self.cfg
        oc = OptimConfig(lr, c.lr_schedule, c.warmup_steps, self.resolved.total_steps, c.weight_decay, c.max_grad_norm)
        optimizer = make_optimizer(oc)
        step = make_train_step(self.setup.model, self.setup.lora_cfg, optimizer, make_schedule(oc))
        return optimizer, (self.dp.wrap(step, self.frozen) if self.dp else step)

    def set_learning_rate(self, lr: float) -> None:
        self.cfg = self.cfg.replace(learning_rate=lr)
        self.rd.write_config(self.cfg)
        self.optimizer, self.step_fn = self.compile(lr)

    def start(self):
        """(state, data position): the latest checkpoint if there is one, else a fresh adapter."""
        from flax_lora.data.batch import Position
        from flax_lora.training.step import init_state

        state, pos = self.place(init_state(self.lora0, self.optimizer, self.cfg.seed)), Position()
        if self.saver.ckpt.latest_step() is not None:
            state, pos = self.saver.restore(state)  # restored with the placed state's shardings
        if self.resuming:  # once: metrics after the checkpoint are logged again
            self.resuming = False
            self.rd.truncate_metrics(self.step_of(state))
            if self.step_of(state):
                self.say(f"lora: resuming {self.rd.path} at step {self.step_of(state)} (epoch {pos.epoch}, "
                         f"batch {pos.batch})")
        return state, pos

    def step_of(self, state) -> int:
        return step_of(state)

    def epoch(self, pos) -> float:
        return pos.epoch + pos.batch / self.batches.steps_per_epoch

    def evaluate_before(self) -> dict[str, Any]:
        """The evaluation of the untrained adapter (read back when a resumed run already has it)."""
        from flax_lora.training.parallel import from_primary

        if from_primary(self.rd.eval_before.is_file()):  # every process must take the same branch
            before = json.loads(self.rd.eval_before.read_text())
        else:
            before = self.evaluator.evaluate(self.lora0, self.frozen, self.cfg.rouge_examples)
            self.rd.write_json(self.rd.eval_before, before)
            self.rd.log({"step": 0, "epoch": 0.0, "eval_loss": before["loss"], "eval_perplexity": before["perplexity"]})
        self.say(f"lora: before training: eval loss {before['loss']:.3f}, ROUGE-L {before.get('rougeL', 0):.3f}")
        return before

    def stop_signal(self, point: bool = True) -> int:
        """The signal to stop on (0: none). One process acts on its own at once; several agree at
        log and save points (``point``), where every process calls the same collective."""
        from flax_lora.training.parallel import max_over_processes

        if self.resolved.processes == 1:
            return self.signals.signum or 0
        return max_over_processes(self.signals.signum or 0) if point else 0

    def interrupt(self, state, pos, where: str, sig: int):
        self.saver.save(state, pos)
        raise Interrupted(f"lora: {signal.Signals(sig).name} {where}: saved a checkpoint at step {self.step_of(state)} "
                          f"of {self.resolved.total_steps}. Continue with: lora train --output {self.cfg.output} --resume",
                          128 + sig)

    def stop_if_signalled(self, state, pos, where: str) -> None:
        if sig := self.stop_signal():
            self.interrupt(state, pos, where, sig)

    def finish(self, fitted: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
        """Write the adapter, eval.json and loss.png; say where they are; return eval.json's content."""
        from flax_lora.adapters.native import save_adapter
        from flax_lora.targets import shortest_names
        from flax_lora.training.parallel import to_host

        s, state = self.setup, fitted.pop("state")
        if self.rd.primary:
            save_adapter(self.rd.adapter, s.model.unstack_lora(to_host(state.lora), keep=s.targets), s.lora_cfg,
                         s.linears, target_modules=shortest_names(s.targets, s.linears),
                         base_model=self.resolved.model_path, model_type=s.model.model_type)
        result = {**fitted, "wall_seconds": round(wall_seconds, 1), **self.clock.summary(wall_seconds)}
        self.rd.write_json(self.rd.eval, result)
        self.rd.plot()
        after = result["after"]
        self.say(f"lora: after training:  eval loss {after['loss']:.3f} (perplexity {after['perplexity']:.2f}), "
                 f"ROUGE-1/2/L {after.get('rouge1', 0):.3f}/{after.get('rouge2', 0):.3f}/{after.get('rougeL', 0):.3f}")
        self.say(f"lora: time to first step {result['time_to_first_step_seconds']:.1f} s (load "
                 f"{result['load_seconds']:.1f} s, compile and first step {fitted.get('first_step_seconds', 0):.1f} s); "
                 f"evaluation {result['eval_seconds']:.1f} s of {wall_seconds:.1f} s wall "
                 f"({100 * (result['eval_share'] or 0):.0f}%)")
        self.say(f"lora: wrote {self.rd.adapter}, {self.rd.metrics.name}, {self.rd.loss_png.name}, "
                 f"{self.rd.eval.name} in {self.rd.path}")
        return result

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        self.saver.ckpt.close()


def prepare(cfg: RunConfig, *, resume: bool, advice_json: str | None, quiet: bool, note: str | None,
            signals: Signals) -> Job:
    """Check the run folder, build model and data, place them on the devices, write the run's config.

    A user error before the config is written removes the folder if this call created it, so a
    corrected command can use the same ``--output`` (an existing run is never touched).
    """
    from flax_lora.training import report
    from flax_lora.training.parallel import agreed, is_primary

    agreed(report.check, cfg.report_to)  # a writer that cannot run stops the run before it writes anything
    primary = is_primary()  # several processes: process 0 alone writes, prints and shows progress
    say = (lambda msg: None) if quiet or not primary else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rd = RunDir(cfg.output, primary=primary)
    fresh = primary and (not rd.path.exists() or not any(rd.path.iterdir()))
    resuming = agreed(rd.prepare, cfg, resume)
    try:
        job = _start_job(cfg, rd, resuming, note, say, signals, quiet)
    except UserError:
        if fresh and not rd.exists():
            shutil.rmtree(rd.path, ignore_errors=True)
        raise
    if advice_json is not None and not rd.advice.exists():
        rd.write_text(rd.advice, advice_json)
    rd.write_config(cfg)
    rd.write_resolved(job.resolved)
    _stop_if_signalled_while_loading(job, signals)
    return job


def _start_job(cfg: RunConfig, rd: RunDir, resuming: bool, note, say, signals: Signals, quiet: bool) -> Job:
    """Build the run's model and data (agreed over processes), report bad rows, place the job."""
    from flax_lora.training.parallel import agreed

    if cfg.demo:
        say("lora: no --model/--data given: training the built-in demo (a small random-init GPT-2 learning to "
            "reverse and spell digits, fully offline)")
    s = agreed(build, cfg, rd)
    _report_data(s, rd, rd.primary)
    if note:  # said only once the inputs are known good (a bad input's error stays one line)
        say(f"lora: {note}")
    return agreed(_place, cfg, rd, s, resuming, signals, say, show=not quiet and rd.primary)


def _stop_if_signalled_while_loading(job: Job, signals: Signals) -> None:
    """A signal during loading stops before compiling: the folder is a run now, resumable."""
    from flax_lora.training.parallel import max_over_processes

    if sig := max_over_processes(signals.signum or 0):
        job.close()
        raise Interrupted(f"lora: {signal.Signals(sig).name} while loading, before training started (nothing to "
                          f"save). Continue with: lora train --output {job.cfg.output} --resume", 128 + sig)


def _report_data(s: Setup, rd: RunDir, primary: bool) -> None:
    """Bad and truncated rows: one line each on stderr (even with --quiet) and data_report.json."""
    from flax_lora.data.load import report_json

    for name, rep in s.reports.items():
        if rep.summary() and primary:
            print(f"lora: {name} data: {rep.summary()}", file=sys.stderr, flush=True)
    rd.write_json(rd.data_report, {name: report_json(rep, s.cfg.on_bad_row) for name, rep in s.reports.items()})


def _place(cfg: RunConfig, rd: RunDir, s: Setup, resuming: bool, signals: Signals, say, show: bool) -> Job:
    """Data parallel over every visible device: batches, frozen weights and state placed, the job built."""
    import jax

    from flax_lora.data.batch import Batches
    from flax_lora.evaluation.evaluator import Evaluator
    from flax_lora.lora import init_lora
    from flax_lora.matmul import storage_view
    from flax_lora.perf.flops import model_flops_fn
    from flax_lora.training.checkpoint import Checkpoints
    from flax_lora.training.parallel import bytes_per_device
    from flax_lora.training.report import make_writers

    n_dev, nproc, pid = jax.device_count(), jax.process_count(), jax.process_index()
    before = rd.load_resolved() if resuming else None
    if before is not None and before.devices != n_dev:
        raise UserError(f"--resume: {rd.path} was trained on {before.devices} device(s), {n_dev} are visible now; "
                        "the batches would differ. Resume with the same device count")
    dp = s.dp  # the frozen weights are already placed on its mesh (build: FrozenPlan)
    for note in s.notes:
        say(f"lora: {note}")
    global_batch = cfg.batch_size * n_dev
    batches = Batches(s.train_examples, global_batch, cfg.grad_accum, cfg.seed, cfg.max_length, s.tokenizer.pad_id,
                      packing=s.model.check_packing(cfg.packing))  # --packing with a family that cannot: UserError
    rows = slice(pid * global_batch // nproc, (pid + 1) * global_batch // nproc)  # this process's rows
    lora0 = s.init_lora if s.init_lora is not None else s.model.stack_lora(
        init_lora(s.targets, cfg.r, jax.random.PRNGKey(cfg.seed)))
    resolved = Resolved(
        model_path=s.sources.model, data_path=s.sources.data, eval_data_path=s.sources.eval_data,
        model_type=s.model.model_type, scan_layers=s.model.layers_stacked, data_format=s.data_format.describe(),
        train_examples=len(s.train_examples), eval_examples=len(s.eval_examples), targets=tuple(sorted(s.targets)),
        scaling=s.lora_cfg.scaling, devices=n_dev, processes=nproc, device_kind=jax.devices()[0].device_kind,
        frozen_sharded=bool(dp and dp.shard_frozen), frozen_bytes_per_device=bytes_per_device(s.model.params),
        effective_batch_size=cfg.batch_size * cfg.grad_accum * n_dev,
        steps_per_epoch=batches.steps_per_epoch, total_steps=cfg.max_steps or cfg.epochs * batches.steps_per_epoch)
    return Job(
        cfg=cfg, rd=rd, setup=s, resolved=resolved, resuming=resuming, batches=batches,
        frozen=storage_view(dp.put_frozen(s.model.params) if dp else s.model.params),
        feed=(lambda b: dp.put_batch({k: v[:, rows] for k, v in b.items()})) if dp else (lambda b: b),
        place=dp.put_state if dp else (lambda st: st), lora0=lora0,
        saver=Saver(Checkpoints(rd.checkpoints, keep=cfg.keep_checkpoints)),
        evaluator=Evaluator(s.model, s.lora_cfg, s.tokenizer, s.eval_examples, max_length=cfg.max_length,
                            max_new_tokens=cfg.max_new_tokens, stop_ids=s.stop_ids),
        writers=make_writers(cfg.report_to, rd, cfg.to_json(), rd.primary), say=say, show_progress=show,
        flops_per_token=model_flops_fn(s.model.params, lora0, s.model.config), signals=signals, dp=dp)
