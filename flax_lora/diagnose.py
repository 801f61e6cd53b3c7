"""`lora diagnose`: the configuration guide's "Signs of ..." rules applied to a finished run.

Pure Python (no jax): reads a run directory's ``metrics.jsonl`` and ``eval.json`` (plus
``advice.json`` / ``run_config.json`` for the values the run used) and reports findings with
their evidence, and optionally a revised :class:`advisor.schema.Advice`.

The guide's rules and the detectors behind them (thresholds are module constants):

* **Learning rate too high** ("loss oscillates or diverges, NaN values" -> halve it):
  - *non-finite*: any logged loss or gradient norm is NaN/inf (or null);
  - *diverging*: the median of the last 10% of losses is more than ``DIVERGE_RISE`` above the
    minimum of the rolling-median-smoothed curve (window: 10% of the points), by at least
    ``DIVERGE_MIN_SHARE`` of the start level, and a Mann-Kendall test finds a significant rise
    (z > ``MK_Z``) over the >= 5 points from that minimum on;
  - *oscillating*: after the first 10% of steps, at least ``OSC_SIGN_SHARE`` of consecutive
    differences change sign (a zig-zag, not a trend) and their median size is at least
    ``OSC_REL_STEP`` of the median loss (large swings, not mini-batch noise).
* **Learning rate too low** ("loss decreases very slowly" -> double it): the loss fell less than
  ``SLOW_TOTAL_DROP`` of its start level over the whole run, while the tail still trends down
  (or it fell less than ``FLAT_TOTAL_DROP``: nothing learned). Losses already near zero are exempt.
* **Underfitting** ("loss still decreasing, ROUGE improving" -> more epochs): over the last
  ``TAIL_SHARE`` of logged steps a Mann-Kendall test finds a significant downward trend
  (z < -``MK_Z``) and the Theil-Sen slope projects a fall of at least ``TAIL_MIN_DROP`` of the
  tail's level; or the validation loss is lowest at the last of >= 3 evaluations. A rising ROUGE
  across evaluations is reported as supporting evidence.
* **Overfitting** ("training loss decreases but validation loss increases" -> fewer epochs, more
  dropout): the validation loss is lowest before the last evaluation, ends more than
  ``OVERFIT_RISE`` above that minimum, and the training loss kept falling after that step.

When findings conflict, the learning rate being too high wins (its symptoms hide the others),
overfitting beats underfitting, and a too-low learning rate beats underfitting.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flax_lora.errors import UserError

TAIL_SHARE = 0.25
MK_Z = 1.96
TAIL_MIN_DROP = 0.02
SLOW_TOTAL_DROP = 0.10
FLAT_TOTAL_DROP = 0.02
CONVERGED_LOSS = 0.05
DIVERGE_RISE = 0.30
DIVERGE_MIN_SHARE = 0.10
OSC_SIGN_SHARE = 0.5
OSC_REL_STEP = 0.4
OVERFIT_RISE = 0.02
MIN_POINTS = 5
DROPOUT_LADDER = (0.05, 0.1, 0.2)  # the guide's dropout values, light -> heavy
EVAL_MARKS = ("eval", "validation", "val")
HALVE_LR_REMEDY = "guide: reduce the learning rate by 50% (e.g. 2e-4 -> 1e-4)"


# --------------------------------------------------------------------------- run loading


@dataclass
class Run:
    """What diagnose needs from a run directory."""

    path: Path
    train: list[tuple[int, float]]  # (step, loss), sorted, one per step; loss may be non-finite
    grad_norm: list[tuple[int, float]]
    epoch_at: dict[int, float]
    evals: list[tuple[int, float]]  # (step, validation loss)
    rouge: list[tuple[int, float]]  # (step, ROUGE-L or the best ROUGE key found)
    final_eval: dict[str, Any]
    learning_rate: float | None
    epochs: int | None
    dropout: float | None
    samples: int | None
    advice: Any = None  # advisor.schema.Advice when advice.json was readable
    notes: list[str] = field(default_factory=list)


def _number(value: Any, where: str, name: str) -> float:
    if value is None:
        return math.nan  # a null loss is how some writers spell NaN
    if isinstance(value, bool):
        raise UserError(f"{where}: {name} is {value!r}, not a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{where}: {name} is {value!r}, not a number") from None
        if math.isfinite(number):  # numbers as strings: not something lora writes
            raise UserError(f"{where}: {name} is the string {value!r}, not a number")
        return number
    raise UserError(f"{where}: {name} is {type(value).__name__}, not a number")


def _is_eval(entry: dict) -> bool:
    for key in ("split", "kind", "type", "event", "phase"):
        if str(entry.get(key, "")).lower() in EVAL_MARKS:
            return True
    return entry.get("eval") is True


def _rouge_of(entry: dict) -> float | None:
    flat = dict(entry)
    if isinstance(entry.get("rouge"), dict):
        flat.update(entry["rouge"])
    for key in ("rougeL", "rouge_l", "rougeLsum", "rouge1", "rouge_1"):
        for name in (key, f"eval_{key}"):
            if isinstance(flat.get(name), (int, float)) and not isinstance(flat.get(name), bool):
                return float(flat[name])
    return None


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """JSON objects from a metrics.jsonl, with line numbers; notes about skipped lines.

    Blank lines are skipped. A garbled *last* line without a newline is what a crash mid-write
    leaves, so it is skipped with a note; any other garbled line is an error.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path.parent} has no metrics.jsonl: not a lora run directory, or the run "
                        "has not logged a step yet") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a metrics file") from None
    lines = raw.split(b"\n")
    entries, notes = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        is_unterminated_tail = number == len(lines) and not raw.endswith(b"\n")
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            if is_unterminated_tail:
                notes.append(f"skipped {where}: cut off mid-write (the run was probably killed)")
                continue
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc})"
            raise UserError(f"{where}: {reason}") from None
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        entry["_line"] = number
        entries.append(entry)
    if not entries:
        raise UserError(f"{path} is empty: the run has not logged a step yet")
    return entries, notes


def _find(obj: Any, names: tuple[str, ...]) -> Any:
    """The first value under any of ``names`` in a nested dict (depth first)."""
    if isinstance(obj, dict):
        for name in names:
            if name in obj and obj[name] is not None and not isinstance(obj[name], (dict, list)):
                return obj[name]
        for value in obj.values():
            found = _find(value, names)
            if found is not None:
                return found
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; anything missing or malformed -> UserError with one clear line."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"no such run directory: {run_dir}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: pass the run's output folder (lora train --output)")
    entries, notes = read_metrics(run_dir / "metrics.jsonl")

    train: dict[int, float] = {}
    grads: dict[int, float] = {}
    epoch_at: dict[int, float] = {}
    evals: dict[int, float] = {}
    rouge: dict[int, float] = {}
    repeats = 0
    for entry in entries:
        where = f"metrics.jsonl line {entry['_line']}"
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            if "loss" in entry or "eval_loss" in entry:
                raise UserError(f"{where}: step is {step!r}, not a non-negative integer")
            continue  # an event line (e.g. "resumed"), not a measurement
        if "eval_loss" in entry:
            evals[step] = _number(entry["eval_loss"], where, "eval_loss")
        if _is_eval(entry):
            if "loss" in entry:
                evals[step] = _number(entry["loss"], where, "loss")
        elif "loss" in entry:
            repeats += step in train
            train[step] = _number(entry["loss"], where, "loss")
            if "grad_norm" in entry:
                grads[step] = _number(entry["grad_norm"], where, "grad_norm")
            if isinstance(entry.get("epoch"), (int, float)) and not isinstance(entry.get("epoch"), bool):
                epoch_at[step] = float(entry["epoch"])
        value = _rouge_of(entry)
        if value is not None and (_is_eval(entry) or "eval_loss" in entry or "loss" not in entry):
            rouge[step] = value
    if not train:
        raise UserError(f"{run_dir / 'metrics.jsonl'} has no training-loss entries (objects with step and loss)")
    if repeats:
        notes.append(f"{repeats} step(s) logged more than once (a resumed run?); the last value of each was used")

    final_eval = _read_json(run_dir / "eval.json")
    if final_eval is not None and not isinstance(final_eval, dict):
        raise UserError(f"{run_dir / 'eval.json'}: expected a JSON object")
    final_eval = final_eval or {}
    if isinstance(final_eval.get("after"), dict):  # lora train writes {"before": {...}, "after": {...}}
        final_eval = final_eval["after"]
    if final_eval and not rouge:
        value = _rouge_of(final_eval)
        if value is not None:
            rouge[max(train)] = value

    advice = None
    advice_path = run_dir / "advice.json"
    if advice_path.exists():
        from pydantic import ValidationError

        from advisor.schema import Advice

        try:
            advice = Advice.from_json(advice_path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError) as exc:
            notes.append(f"advice.json is not a valid advice file ({str(exc).splitlines()[0]}); ignored")
    config = _read_json(run_dir / "run_config.json") or {}

    def current(names: tuple[str, ...], from_advice):
        value = _find(config, names)
        if value is None and advice is not None:
            value = from_advice(advice)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    lr = current(("learning_rate", "lr", "peak_learning_rate"), lambda a: a.training.learning_rate)
    if lr is None:  # fall back to the largest logged learning rate (the schedule's peak)
        logged = [e["learning_rate"] for e in entries if isinstance(e.get("learning_rate"), (int, float))]
        lr = max(logged) if logged else None
    epochs = current(("epochs", "num_epochs", "num_train_epochs"), lambda a: a.training.epochs)
    dropout = current(("dropout", "lora_dropout"), lambda a: a.lora.dropout)
    samples = current(("samples", "num_samples", "train_samples"),
                      lambda a: a.request.samples or (a.data.samples if a.data else None))

    return Run(run_dir, sorted(train.items()), sorted(grads.items()), epoch_at, sorted(evals.items()),
               sorted(rouge.items()), final_eval, float(lr) if lr else None,
               int(epochs) if epochs else None, float(dropout) if dropout is not None else None,
               int(samples) if samples else None, advice, notes)


# --------------------------------------------------------------------------- statistics


def mann_kendall_z(values: list[float]) -> float:
    """Mann-Kendall trend statistic: z < -1.96 is a significant fall (p < 0.05), > 1.96 a rise."""
    n = len(values)
    if n < 3:
        return 0.0
    s = sum((values[j] > values[i]) - (values[j] < values[i]) for i in range(n) for j in range(i + 1, n))
    var = n * (n - 1) * (2 * n + 5) / 18
    return (s - (s > 0) + (s < 0)) / math.sqrt(var)


def theil_sen_slope(points: list[tuple[float, float]]) -> float:
    """Median of pairwise slopes: a line fit that a few outliers cannot drag."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 != x1]
    return statistics.median(slopes) if slopes else 0.0


def rolling_median(values: list[float], window: int) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def _thin(points: list, limit: int = 300) -> list:
    """At most ``limit`` evenly spaced points (keeps the O(n^2) statistics cheap)."""
    if len(points) <= limit:
        return points
    return [points[round(i * (len(points) - 1) / (limit - 1))] for i in range(limit)]


# --------------------------------------------------------------------------- findings


@dataclass
class Finding:
    kind: str  # lr-too-high | lr-too-low | underfitting | overfitting | healthy | too-few-steps
    title: str
    evidence: list[str]
    remedy: str = ""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (old, new)


@dataclass
class Report:
    run_dir: str
    steps: int
    first_loss: float
    last_loss: float
    findings: list[Finding]
    notes: list[str]

    @property
    def changes(self) -> dict[str, tuple[Any, Any]]:
        out: dict[str, tuple[Any, Any]] = {}
        for finding in self.findings:
            out.update(finding.changes)
        return out

    def to_dict(self) -> dict:
        """JSON-ready (non-finite numbers become strings such as "nan")."""
        return _jsonable({**asdict(self), "healthy": not self.changes and self.findings[0].kind == "healthy",
                "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()}})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _g(x: float) -> str:
    return f"{x:.4g}"


def _lr_change(run: Run, factor: float) -> dict:
    if run.learning_rate is None:
        return {}
    return {"training.learning_rate": (run.learning_rate, float(f"{run.learning_rate * factor:.6g}"))}


def _epoch_of(run: Run, step: int, last_step: int) -> float | None:
    known = [(s, e) for s, e in run.epoch_at.items() if s <= step]
    if known:
        return max(known)[1]
    if run.epochs and last_step:
        return step / last_step * run.epochs
    return None


def _epochs_cap(samples: int | None) -> int | None:
    if samples is None:
        return None
    from advisor import tables

    _, (_, hi) = tables.size_row(tables.EPOCHS_BY_SIZE, samples)
    return hi


def diagnose(run: Run) -> Report:
    """Apply the guide's rules to a loaded run (see the module docstring for the detectors)."""
    steps = [s for s, _ in run.train]
    losses = [v for _, v in run.train]
    finite = [(s, v) for s, v in run.train if math.isfinite(v)]
    first = finite[0][1] if finite else math.nan
    last = finite[-1][1] if finite else math.nan
    report = Report(str(run.path), steps[-1], first, last, [], list(run.notes))
    found = report.findings

    # Learning rate too high: non-finite values.
    bad = [(s, "loss", v) for s, v in run.train if not math.isfinite(v)]
    bad += [(s, "grad_norm", v) for s, v in run.grad_norm if not math.isfinite(v)]
    if bad:
        step, name, value = min(bad)
        before = [(s, v) for s, v in finite if s < step]
        ev = [f"{name} is {value} at step {step} (first non-finite value; {len(bad)} in all)"]
        if before:
            ev.append(f"last finite loss {_g(before[-1][1])} at step {before[-1][0]}")
        grads = [(s, g) for s, g in run.grad_norm if math.isfinite(g) and s < step]
        peak = max(grads, key=lambda p: p[1], default=None)
        if len(grads) >= 3 and peak[1] > 2 * statistics.median(g for _, g in grads):
            ev.append(f"grad_norm peaked at {_g(peak[1])} (step {peak[0]}) before that")
        found.append(Finding("lr-too-high", "learning rate too high: training diverged to NaN/inf", ev,
                             HALVE_LR_REMEDY, _lr_change(run, 0.5)))
        return report

    n = len(losses)
    if n < MIN_POINTS:
        found.append(Finding("too-few-steps", f"only {n} logged step(s): too few to judge the curve",
                             [f"loss {_g(first)} at step {steps[0]} -> {_g(last)} at step {steps[-1]}"],
                             "log more often or train longer, then run lora diagnose again"))
        return report

    edge = max(1, n // 10)
    start = statistics.median(losses[:edge])
    end = statistics.median(losses[-edge:])
    scale = max(abs(start), 1e-8)
    total_drop = (start - end) / scale

    # Learning rate too high: oscillation (large zig-zags rather than a trend).
    body = losses[edge:]
    diffs = [b - a for a, b in zip(body, body[1:])]
    nonzero = [d for d in diffs if d != 0]
    if len(nonzero) >= 4:
        flips = sum((a > 0) != (b > 0) for a, b in zip(nonzero, nonzero[1:])) / (len(nonzero) - 1)
        swing = statistics.median(abs(d) for d in diffs) / max(abs(statistics.median(body)), 1e-8)
        if flips >= OSC_SIGN_SHARE and swing >= OSC_REL_STEP:
            found.append(Finding(
                "lr-too-high", "learning rate too high: the loss oscillates",
                [f"after step {steps[edge]}, {flips:.0%} of step-to-step changes flip direction and the median "
                 f"change is {swing:.0%} of the loss level ({_g(min(body))}..{_g(max(body))})"],
                HALVE_LR_REMEDY, _lr_change(run, 0.5)))
            return report

    # Learning rate too high: divergence (the curve ends well above its lowest point).
    smooth = rolling_median(losses, max(5, n // 10) | 1)
    k = min(range(n), key=smooth.__getitem__)
    low = smooth[k]
    rise_share = (end - low) / scale
    rising = n - k >= max(5, edge) and mann_kendall_z(_thin(losses[k:])) > MK_Z
    if rising and end > low * (1 + DIVERGE_RISE) and rise_share >= DIVERGE_MIN_SHARE:
        found.append(Finding(
            "lr-too-high", "learning rate too high: the loss diverges",
            [f"smoothed loss fell to {_g(low)} at step {steps[k]}, then rose to {_g(end)} by step {steps[-1]} "
             f"(+{(end / low - 1):.0%}; it started at {_g(start)})"],
            HALVE_LR_REMEDY, _lr_change(run, 0.5)))
        return report

    # Trend over the tail.
    tail_n = max(3, math.ceil(n * TAIL_SHARE))
    tail = _thin(run.train[-tail_n:])
    z = mann_kendall_z([v for _, v in tail])
    slope = theil_sen_slope([(float(s), v) for s, v in tail])
    tail_level = max(abs(statistics.median(v for _, v in tail)), 1e-8)
    tail_drop = -slope * (tail[-1][0] - tail[0][0]) / tail_level
    still_falling = z < -MK_Z and tail_drop >= TAIL_MIN_DROP
    tail_ev = (f"over the last {tail_n} logged steps ({tail[0][0]}-{tail[-1][0]}) the loss still falls: "
               f"Theil-Sen slope {slope:.3g}/step ({tail_drop:.1%} of its level across the window), "
               f"Mann-Kendall z = {z:.2f}")

    # Validation curve.
    evals = [(s, v) for s, v in run.evals if math.isfinite(v)]
    overfit = None
    eval_still_falling = False
    if len(evals) >= 2:
        b = min(range(len(evals)), key=lambda i: evals[i][1])
        best_step, best = evals[b]
        final_step, final = evals[-1]
        near_best = [v for s, v in finite if s <= best_step][-max(1, edge):] or [first]
        train_at_best = statistics.median(near_best)
        if b < len(evals) - 1 and final > best * (1 + OVERFIT_RISE) and end < train_at_best:
            overfit = (best_step, best, final_step, final, train_at_best)
        eval_still_falling = len(evals) >= 3 and b == len(evals) - 1 and final < evals[-2][1] * (1 - TAIL_MIN_DROP)
    rouge_ev = []
    if len(run.rouge) >= 2 and run.rouge[-1][1] > run.rouge[0][1]:
        rouge_ev = [f"ROUGE rose from {_g(run.rouge[0][1])} (step {run.rouge[0][0]}) to "
                    f"{_g(run.rouge[-1][1])} (step {run.rouge[-1][0]})"]

    if overfit:
        best_step, best, final_step, final, train_at_best = overfit
        changes: dict[str, tuple[Any, Any]] = {}
        epoch = _epoch_of(run, best_step, steps[-1])
        ev = [f"validation loss was lowest, {_g(best)}, at step {best_step}, then rose to {_g(final)} at step "
              f"{final_step} (+{final / best - 1:.1%})",
              f"while the training loss kept falling: {_g(train_at_best)} around step {best_step} -> {_g(end)} "
              f"at the end"]
        if run.epochs and epoch is not None:
            fewer = min(run.epochs, max(1, math.ceil(epoch - 1e-9)))
            ev.append(f"the best step is in epoch {fewer} of {run.epochs} (epoch {epoch:.2f})")
            if fewer < run.epochs:
                changes["training.epochs"] = (run.epochs, fewer)
        if run.dropout is not None:
            heavier = next((d for d in DROPOUT_LADDER if d > run.dropout + 1e-12), None)
            if heavier is None:
                ev.append(f"dropout is already {run.dropout:g}, the guide's heaviest (0.2); kept")
            else:
                changes["lora.dropout"] = (run.dropout, heavier)
        found.append(Finding("overfitting", "overfitting: validation loss rises while training loss falls", ev,
                             f"guide: decrease epochs, increase dropout; keep the checkpoint from step {best_step}",
                             changes))
    slow = abs(end) > CONVERGED_LOSS and (total_drop < FLAT_TOTAL_DROP or (total_drop < SLOW_TOTAL_DROP and z < -MK_Z))
    if slow:
        found.append(Finding(
            "lr-too-low", "learning rate too low: the loss barely falls",
            [f"the loss fell only {total_drop:.1%} over {steps[-1] - steps[0]} steps ({_g(start)} -> {_g(end)}, "
             f"medians of the first and last {edge} logged steps)"]
            + ([tail_ev] if z < -MK_Z else []),
            "guide: increase the learning rate 2x (e.g. 1e-4 -> 2e-4)", _lr_change(run, 2.0)))
    elif not overfit and abs(end) > CONVERGED_LOSS and (still_falling or eval_still_falling):
        ev = [tail_ev] if still_falling else []
        if eval_still_falling:
            ev.append(f"validation loss is lowest at the last evaluation: {_g(evals[-2][1])} (step {evals[-2][0]}) "
                      f"-> {_g(evals[-1][1])} (step {evals[-1][0]})")
        ev += rouge_ev
        changes = {}
        reached = max(run.epoch_at.values()) if run.epoch_at else None
        remedy = "guide: increase epochs"
        if run.epochs and reached is not None and reached < 0.95 * run.epochs:
            # The step budget (--max-steps) ended the run before its epochs did: more epochs
            # would change nothing; more steps would.
            ev.append(f"the run stopped at epoch {reached:.2f} of its {run.epochs} (the --max-steps budget), "
                      "so more epochs alone would not train longer")
            remedy = "guide: increase epochs; here, raise --max-steps so the run reaches them"
        elif run.epochs:
            more = run.epochs + max(1, math.ceil(run.epochs / 2))
            cap = _epochs_cap(run.samples)
            if cap is not None and run.epochs < cap < more:
                more = cap
            ev.append(f"{run.epochs} epoch(s) -> {more}: half as many again"
                      + (f" (the guide's range for {run.samples:,} samples tops out at {cap})" if cap else ""))
            changes["training.epochs"] = (run.epochs, more)
        found.append(Finding("underfitting", "underfitting: the loss is still falling at the end", ev,
                             remedy, changes))
    if not found:
        if abs(end) <= CONVERGED_LOSS:
            ev = [f"the loss fell {total_drop:.0%} ({_g(start)} -> {_g(end)}) to below {CONVERGED_LOSS} "
                  "nats/token: the targets are predicted almost surely, nothing left to fit"]
        else:
            ev = [f"the loss fell {total_drop:.0%} ({_g(start)} -> {_g(end)}) and has flattened: "
                  f"Mann-Kendall z = {z:.2f} over the last {tail_n} logged steps"]
        if evals:
            b = min(range(len(evals)), key=lambda i: evals[i][1])
            ev.append(f"validation loss {_g(evals[-1][1])} at step {evals[-1][0]} (lowest {_g(evals[b][1])} "
                      f"at step {evals[b][0]})")
        found.append(Finding("healthy", "healthy: none of the guide's warning signs", ev + rouge_ev))
    if not evals:
        report.notes.append("no validation losses in metrics.jsonl: overfitting cannot be judged "
                            "(train with --eval-data or a held-out split)")
    return report


# --------------------------------------------------------------------------- output


def render(report: Report) -> str:
    """The report as text: one block per finding with evidence, remedy and changes."""
    lines = [f"lora diagnose {report.run_dir}: {report.steps} steps, loss {_g(report.first_loss)} -> "
             f"{_g(report.last_loss)}"]
    for finding in report.findings:
        lines += ["", finding.title]
        lines += [f"  - {e}" for e in finding.evidence]
        if finding.remedy:
            lines.append(f"  remedy: {finding.remedy}")
        for name, (old, new) in finding.changes.items():
            lines.append(f"  change: {name} {old:g} -> {new:g}")
    if report.notes:
        lines.append("")
        lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _put(reasons: list, reason) -> None:
    """Replace the reason for ``reason.field`` in place (keeps the advice's section order)."""
    for i, r in enumerate(reasons):
        if r.field == reason.field:
            reasons[i] = reason
            return
    reasons.append(reason)


def revise_advice(run: Run, report: Report):
    """The run's advice with the report's changes applied, a reason per changed value.

    Changed fields that the request set explicitly are changed there too, so the request and
    the advice agree. Raises UserError when the run has no readable advice.json.
    """
    if run.advice is None:
        raise UserError(f"{run.path} has no valid advice.json to revise (-o needs the advice the run used)")
    from advisor.schema import Advice, Reason

    advice = run.advice
    data = advice.model_dump()
    reasons = list(advice.reasons)
    why_by_field = {}
    for finding in report.findings:
        for name in finding.changes:
            why_by_field[name] = f"lora diagnose {run.path}: {finding.title}; " + "; ".join(finding.evidence)
    for name, (old, new) in report.changes.items():
        section, key = name.split(".")
        data[section][key] = new
        request_key = {"per_device_batch_size": "batch_size"}.get(key, key)
        if data["request"].get(request_key) is not None:
            data["request"][request_key] = new
        if name == "training.epochs":
            t = data["training"]
            per_epoch = advice.training.total_steps / advice.training.epochs
            t["total_steps"] = max(1, math.ceil(per_epoch * new))
            _put(reasons, Reason(field="training.total_steps", value=str(t["total_steps"]),
                                 why=f"lora diagnose: {per_epoch:g} steps per epoch x {new} epochs"))
        _put(reasons, Reason(field=name, value=f"{new:g}", why=f"{why_by_field[name]} (was {old:g})"))
    data["reasons"] = [r.model_dump() for r in reasons]
    if report.changes:
        data["warnings"] = [*data.get("warnings", ()), f"revised by lora diagnose from {run.path}"]
    from pydantic import ValidationError

    try:
        return Advice.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"the revised advice is not valid ({str(exc).splitlines()[0]}): "
                        f"{'; '.join(f'{k} {a:g} -> {b:g}' for k, (a, b) in report.changes.items())}") from None
