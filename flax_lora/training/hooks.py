"""The small pieces the training loop calls on their schedules.

* :class:`Pending`: the step metrics still on the device, fetched in one transfer at log points
  (the loop's only regular host sync), with at most one step left in flight.
* :class:`Throughput`: tokens/s, MFU and peak memory per log window and for the whole run, with
  the first step's compile and the time spent evaluating or saving left out.
* :class:`Log`: one metrics row to ``metrics.jsonl``, to the ``--report-to`` writers and to the
  progress bar.
* :class:`Saver`: checkpoints, at most one per step, with the latest eval loss.
* :class:`DivergenceGuard`: a non-finite loss or gradient norm rolls back at half the learning
  rate (``--on-divergence halve-lr``) or stops with the guide's remedy.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Callable

from flax_lora.errors import Diverged
from flax_lora.training.config import MAX_LR_HALVINGS


def due(step: int, every: int | None) -> bool:
    """Whether a piece that runs every ``every`` steps (0/None: never) runs at ``step``."""
    return bool(every) and step % every == 0


def fmt_lr(x: float) -> str:
    """2e-4 style (what the guide writes, and what --learning-rate accepts)."""
    if x >= 1e-2:
        return f"{x:.3g}"
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


class Pending:
    """Step metrics not yet fetched: ``(step, epoch, device metrics)`` in order."""

    def __init__(self):
        self.rows: list[tuple[int, float, Any]] = []

    def add(self, step: int, epoch: float, metrics) -> None:
        self.rows.append((step, epoch, metrics))

    def wait_previous(self) -> None:
        """Block until the step before the newest one is done: the device keeps one step queued, and
        the host never runs further ahead (so a signal waits for at most one step)."""
        import jax

        if len(self.rows) > 1:
            jax.block_until_ready(self.rows[-2][2])

    def fetch(self) -> list[tuple[int, float, dict[str, float]]]:
        """Every pending step's metrics as floats, in one transfer; the list is emptied."""
        from flax_lora.training.parallel import to_host

        host = to_host([m for _, _, m in self.rows])
        out = [(s, e, {k: float(v) for k, v in m.items()}) for (s, e, _), m in zip(self.rows, host)]
        self.rows = []
        return out


def first_nonfinite(fetched) -> tuple[int, float, float] | None:
    """(step, loss, grad norm) of the first step whose loss or gradient norm is not finite."""
    for step, _, m in fetched:
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            return step, m["loss"], m["grad_norm"]
    return None


class Throughput:
    """Tokens (non-padding) and model FLOPs per second over log windows and over the whole run."""

    def __init__(self, flops_per_token: Callable[[int], float], device_kind: str, n_devices: int):
        self.flops_per_token, self.device_kind, self.n_devices = flops_per_token, device_kind, n_devices
        self.tokens = self.flops = 0.0
        self.total_tokens = self.total_flops = self.total_time = 0.0
        self.first_step_seconds = 0.0
        self.t0 = time.time()

    def count(self, batch) -> None:
        """A dispatched step's tokens, from the host batch (no device sync)."""
        n = float(batch["attention_mask"].sum())
        self.tokens += n
        self.flops += n * self.flops_per_token(batch["input_ids"].shape[-1])

    def first_step_done(self, metrics) -> None:
        """Wait for the first step (trace + compile + run) and keep it out of the rates."""
        import jax

        jax.block_until_ready(metrics)
        self.first_step_seconds = time.time() - self.t0
        self.restart()

    def restart(self) -> None:
        self.tokens = self.flops = 0.0
        self.t0 = time.time()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluating, saving) does not count as training time."""
        start = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - start

    def window(self) -> dict[str, float]:
        """tokens/s, MFU and peak memory of the window since the last call (added to the run's totals)."""
        from flax_lora.perf.flops import mfu, peak_memory_gb

        dt = max(time.time() - self.t0, 1e-9)
        rate = self.tokens / dt
        out = {"tokens_per_second": round(rate, 1)}
        u = mfu(rate, self.flops / max(self.tokens, 1.0), self.device_kind, self.n_devices)
        if u is not None:
            out["mfu"] = round(u, 4)
        mem = peak_memory_gb()
        if mem is not None:
            out["peak_memory_gb"] = round(mem, 3)
        self.total_tokens, self.total_flops, self.total_time = (
            self.total_tokens + self.tokens, self.total_flops + self.flops, self.total_time + dt)
        self.restart()
        return out

    def summary(self) -> dict[str, Any]:
        from flax_lora.perf.flops import mfu, peak_memory_gb

        rate = self.total_tokens / self.total_time if self.total_time else None
        u = mfu(rate, self.total_flops / max(self.total_tokens, 1.0), self.device_kind, self.n_devices) if rate else None
        return {"train_tokens_per_second": None if rate is None else round(rate, 1),
                "train_mfu": None if u is None else round(u, 4), "peak_memory_gb": peak_memory_gb(),
                "devices": self.n_devices, "first_step_seconds": round(self.first_step_seconds, 1)}


class Clock:
    """Where a run's wall time goes: loading (model, data, placement), evaluation, the first step.

    ``time_to_first_step_seconds`` is what a user waits before training runs: load + the
    evaluation before training + trace, compile and run of the first step.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {"load": 0.0, "eval": 0.0, "eval_before": 0.0, "first_step": 0.0}

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - start

    def first_step_row(self, step: int, first_step_seconds: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` row written once the first step is done."""
        self.seconds["first_step"] = first_step_seconds
        s = self.seconds
        return {"event": "first_step", "step": step,
                "time_to_first_step_seconds": round(s["load"] + s["eval_before"] + first_step_seconds, 2),
                "load_seconds": round(s["load"], 2), "eval_before_seconds": round(s["eval_before"], 2),
                "compile_and_first_step_seconds": round(first_step_seconds, 2)}

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """eval.json's timing figures: time to the first step, and evaluation's share of the wall time."""
        s = self.seconds
        evals = s["eval"] + s["eval_before"]
        return {"time_to_first_step_seconds": round(s["load"] + s["eval_before"] + s["first_step"], 1),
                "load_seconds": round(s["load"], 1), "eval_seconds": round(evals, 2),
                "eval_share": round(evals / wall_seconds, 3) if wall_seconds > 0 else None}


class Log:
    """Where logged rows go: the run's ``metrics.jsonl``, the ``--report-to`` writers, the progress bar."""

    def __init__(self, rd, writers, total: int, start: int, show: bool):
        from tqdm.auto import tqdm

        self.rd, self.writers = rd, list(writers)
        self.bar = tqdm(total=total, initial=start, disable=not show, unit="step", dynamic_ncols=True, file=sys.stderr)

    def row(self, row: dict[str, Any]) -> None:
        self.rd.log(row)
        if "step" in row and "event" not in row:
            for w in self.writers:
                w.write(row)

    def train(self, step: int, epoch: float, fetched, window: dict[str, float]) -> None:
        """The row of a log point: token-weighted mean loss of the window's steps, the last step's rate and norm."""
        n = sum(m["tokens"] for _, _, m in fetched)
        loss = sum(m["loss"] * m["tokens"] for _, _, m in fetched) / max(n, 1.0)
        last = fetched[-1][2]
        self.row({"step": step, "epoch": round(epoch, 4), "loss": loss, "learning_rate": last["learning_rate"],
                  "grad_norm": last["grad_norm"], **window})
        extra = {"mfu": f"{window['mfu']:.1%}"} if "mfu" in window else {}
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window['tokens_per_second']:,.0f}", **extra, refresh=False)
        self.bar.update(step - self.bar.n)

    def eval(self, step: int, epoch: float, result: dict[str, Any]) -> None:
        self.row({"step": step, "epoch": round(epoch, 4), "eval_loss": result["loss"],
                  "eval_perplexity": result["perplexity"]})

    def restart(self, total: int, step: int) -> None:
        self.bar.reset(total=total)
        self.bar.update(step)

    def close(self) -> None:
        self.bar.close()
        for w in self.writers:
            w.close()
        self.writers = []


def step_of(state) -> int:
    """The optimizer step of a train state (replicated over devices and processes)."""
    from flax_lora.training.parallel import to_host

    return int(to_host(state.step))


class Saver:
    """The run's checkpoints: at most one per step, carrying the latest eval loss (for keep-best)."""

    def __init__(self, checkpoints):
        self.ckpt, self.eval_loss = checkpoints, None

    def save(self, state, pos) -> None:
        if self.ckpt.latest_step() != step_of(state):
            self.ckpt.save(state, pos, self.eval_loss)

    def restore(self, like):
        """(state, position) of the latest checkpoint, shaped and placed like ``like``."""
        state, pos, meta = self.ckpt.restore(like)
        self.eval_loss = meta.get("eval_loss")
        return state, pos


class DivergenceGuard:
    """What a non-finite loss or gradient norm does: roll back and halve the rate, or stop."""

    def __init__(self):
        self.halvings = 0

    def check(self, job, fetched, epoch: float):
        """None when every fetched step is finite; else (state, position) to continue from after a
        rollback at half the learning rate, or :class:`Diverged` raised with the guide's remedy."""
        bad = first_nonfinite(fetched)
        if bad is None:
            return None
        step, loss, gn = bad
        # The checkpoint of step - 1 holds the weights that gave the bad loss (finite, but ruined by
        # one update at too high a rate): only earlier ones are known good.
        job.saver.ckpt.drop_after(step - 2)
        good = job.saver.ckpt.latest_step()
        lr = job.cfg.learning_rate
        event = {"event": "diverged", "diverged_at_step": step, "diverged_loss": loss, "diverged_grad_norm": gn,
                 "lr_before": lr, "lr_after": lr / 2}
        if job.cfg.on_divergence == "halve-lr" and self.halvings < MAX_LR_HALVINGS:
            self.halvings += 1
            job.rd.truncate_metrics(good or 0)
            job.log.row({"step": good or 0, **event, "retry": self.halvings, "max_retries": MAX_LR_HALVINGS})
            job.say(f"lora: loss {loss} / grad norm {gn} at step {step}: rolling back to step {good or 0} and "
                    f"halving the learning rate ({fmt_lr(lr)} -> {fmt_lr(lr / 2)}), retry {self.halvings} of "
                    f"{MAX_LR_HALVINGS}")
            job.set_learning_rate(lr / 2)
            return job.start()
        m = next(m for s, _, m in fetched if s == step)
        job.log.row({"step": step, "epoch": round(epoch, 4), "loss": loss, "learning_rate": m["learning_rate"],
                     "grad_norm": gn})
        job.log.row({"step": step, **event})
        raise Diverged(self.message(job, step, loss, gn, good, lr))

    def message(self, job, step: int, loss: float, gn: float, good: int | None, lr: float) -> str:
        kept = (f"kept the last good checkpoint (step {good})" if good is not None
                else "no good checkpoint precedes it, so --resume restarts from step 0")
        tried = f" after {self.halvings} automatic halvings" if self.halvings else ""
        return (f"training diverged at step {step}{tried}: loss {loss}, gradient norm {gn} (learning rate too "
                f"high); {kept}. The guide's remedy: halve the learning rate ({fmt_lr(lr)} -> {fmt_lr(lr / 2)}): "
                f"lora train --output {job.cfg.output} --resume --learning-rate {fmt_lr(lr / 2)}"
                + ("" if self.halvings else " (or add --on-divergence halve-lr to do this automatically)"))
