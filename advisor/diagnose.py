"""`lora diagnose`: the configuration guide's "Signs of ..." rules applied to a finished run.

Pure Python (no jax): :func:`~advisor.run_reader.load_run` reads a run directory's
``metrics.jsonl`` and ``eval.json`` (plus ``advice.json`` / ``run_config.json`` /
``resolved.json`` for the values the run used); :func:`diagnose` reports findings with their
evidence, and :func:`revise_advice` optionally a revised :class:`advisor.schema.Advice`.

One detector per rule of the guide, each ``detect_x(run, curve) -> Finding | None``
(thresholds are module constants; :class:`Curve` holds the statistics they share):

* **Learning rate too high** ("loss oscillates or diverges, NaN values" -> halve it):
  - :func:`detect_non_finite`: any logged loss or gradient norm is NaN/inf (or null);
  - :func:`detect_oscillation`: after the first 10% of steps, at least ``OSC_SIGN_SHARE`` of
    consecutive differences change sign (a zig-zag, not a trend) and their median size is at
    least ``OSC_REL_STEP`` of the median loss (large swings, not mini-batch noise);
  - :func:`detect_divergence`: the median of the last 10% of losses is more than
    ``DIVERGE_RISE`` above the minimum of the rolling-median-smoothed curve (window: 10% of the
    points), by at least ``DIVERGE_MIN_SHARE`` of the start level, and a Mann-Kendall test finds
    a significant rise (z > ``MK_Z``) over the >= 5 points from that minimum on.
* **Learning rate too low** ("loss decreases very slowly" -> double it), :func:`detect_lr_too_low`:
  the loss fell less than ``SLOW_TOTAL_DROP`` of its start level over the whole run, while the
  tail still trends down (or it fell less than ``FLAT_TOTAL_DROP``: nothing learned). Losses
  already near zero (below ``CONVERGED_LOSS``) are exempt.
* **Underfitting** ("loss still decreasing, ROUGE improving" -> more epochs),
  :func:`detect_underfitting`: over the last ``TAIL_SHARE`` of logged steps a Mann-Kendall test
  finds a significant downward trend (z < -``MK_Z``) and the Theil-Sen slope projects a fall of
  at least ``TAIL_MIN_DROP`` of the tail's level; or the validation loss is lowest at the last of
  >= 3 evaluations. A rising ROUGE across evaluations is reported as supporting evidence.
* **Overfitting** ("training loss decreases but validation loss increases" -> fewer epochs, more
  dropout), :func:`detect_overfitting`: the validation loss is lowest before the last
  evaluation, ends more than ``OVERFIT_RISE`` above that minimum, and the training loss kept
  falling after that step.
* **Healthy** (none of the signs), :func:`detect_healthy`: the loss has flattened, or converged
  (below ``CONVERGED_LOSS``: nothing left to fit).
* **Too few steps**, :func:`detect_too_few_steps`: fewer than ``MIN_POINTS`` logged steps are
  not judged.

Precedence: :func:`diagnose` runs the detectors in this order.

1. :data:`DECISIVE`, each of which ends the diagnosis when it fires: non-finite values, too few
   steps, oscillation, divergence. A learning rate that is too high wins over everything else:
   its symptoms hide the others.
2. Overfitting, then a too-low learning rate: both are reported when both fire.
3. Underfitting, only when neither of those fired: overfitting beats underfitting, and so does a
   too-low learning rate (its remedy comes first).
4. Healthy, when nothing fired.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from advisor import tables
from advisor.errors import UserError
from advisor.run_reader import Run, load_run
from advisor.runfiles import ADVICE, METRICS

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
HALVE_LR_REMEDY = "guide: reduce the learning rate by 50% (e.g. 2e-4 -> 1e-4)"

__all__ = ["Curve", "DECISIVE", "Finding", "Report", "Run", "Trend", "detect_divergence", "detect_healthy",
           "detect_lr_too_low", "detect_non_finite", "detect_oscillation", "detect_overfitting",
           "detect_too_few_steps", "detect_underfitting", "diagnose", "load_run", "mann_kendall_z",
           "render", "revise_advice", "rolling_median", "theil_sen_slope"]


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
    """Each value replaced by the median of the ``window`` values centred on it (fewer at the ends)."""
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


# --------------------------------------------------------------------------- the curve


@dataclass(frozen=True)
class Trend:
    """The loss over the last ``TAIL_SHARE`` of logged steps (thinned to at most 300 points)."""

    points: int  # logged steps in the window
    first_step: int
    last_step: int
    z: float  # Mann-Kendall
    slope: float  # Theil-Sen, loss per step
    drop: float  # the slope's fall across the window, as a share of the window's median level

    @classmethod
    def of_tail(cls, train: list[tuple[int, float]]) -> "Trend":
        points = max(3, math.ceil(len(train) * TAIL_SHARE))
        tail = _thin(train[-points:])
        z = mann_kendall_z([v for _, v in tail])
        slope = theil_sen_slope([(float(s), v) for s, v in tail])
        level = max(abs(statistics.median(v for _, v in tail)), 1e-8)
        drop = -slope * (tail[-1][0] - tail[0][0]) / level
        return cls(points, tail[0][0], tail[-1][0], z, slope, drop)

    @property
    def significant_fall(self) -> bool:
        return self.z < -MK_Z

    @property
    def still_falling(self) -> bool:
        """A significant downward trend that is also large enough to matter."""
        return self.significant_fall and self.drop >= TAIL_MIN_DROP

    @property
    def evidence(self) -> str:
        return (f"over the last {self.points} logged steps ({self.first_step}-{self.last_step}) the loss still "
                f"falls: Theil-Sen slope {self.slope:.3g}/step ({self.drop:.1%} of its level across the window), "
                f"Mann-Kendall z = {self.z:.2f}")


class Curve:
    """A run's training and validation curves and the statistics the detectors share.

    Each statistic is computed on first use: the early detectors end most broken runs before
    the O(n^2) trend tests are needed.
    """

    def __init__(self, run: Run):
        self.run = run
        self.steps = [s for s, _ in run.train]
        self.losses = [v for _, v in run.train]
        self.finite = [(s, v) for s, v in run.train if math.isfinite(v)]
        self.first = self.finite[0][1] if self.finite else math.nan
        self.last = self.finite[-1][1] if self.finite else math.nan
        self.n = len(self.losses)

    @cached_property
    def edge(self) -> int:
        """Logged steps in the first (and last) 10% of the curve, at least 1."""
        return max(1, self.n // 10)

    @cached_property
    def start(self) -> float:
        """Median loss of the first 10% of logged steps."""
        return statistics.median(self.losses[:self.edge])

    @cached_property
    def end(self) -> float:
        """Median loss of the last 10% of logged steps."""
        return statistics.median(self.losses[-self.edge:])

    @cached_property
    def scale(self) -> float:
        return max(abs(self.start), 1e-8)

    @cached_property
    def total_drop(self) -> float:
        """How far the loss fell over the run, as a share of its start level."""
        return (self.start - self.end) / self.scale

    @property
    def converged(self) -> bool:
        """The loss ends near zero: the targets are predicted almost surely."""
        return abs(self.end) <= CONVERGED_LOSS

    @cached_property
    def trend(self) -> Trend:
        return Trend.of_tail(self.run.train)

    @cached_property
    def evals(self) -> list[tuple[int, float]]:
        """The finite validation losses, by step."""
        return [(s, v) for s, v in self.run.evals if math.isfinite(v)]

    @cached_property
    def best_eval(self) -> int | None:
        """Index in :attr:`evals` of the lowest validation loss (the first, if tied)."""
        return min(range(len(self.evals)), key=lambda i: self.evals[i][1]) if self.evals else None

    @cached_property
    def eval_still_falling(self) -> bool:
        """The validation loss is lowest at the last of >= 3 evaluations, clearly below the one before."""
        evals = self.evals
        return (len(evals) >= 3 and self.best_eval == len(evals) - 1
                and evals[-1][1] < evals[-2][1] * (1 - TAIL_MIN_DROP))

    @cached_property
    def rouge_evidence(self) -> list[str]:
        """A line when ROUGE rose from the first evaluation to the last (supports underfitting)."""
        rouge = self.run.rouge
        if len(rouge) >= 2 and rouge[-1][1] > rouge[0][1]:
            return [f"ROUGE rose from {_g(rouge[0][1])} (step {rouge[0][0]}) to "
                    f"{_g(rouge[-1][1])} (step {rouge[-1][0]})"]
        return []


# --------------------------------------------------------------------------- detectors


def detect_non_finite(run: Run, curve: Curve) -> Finding | None:
    """Learning rate too high: a NaN/inf (or null) loss or gradient norm."""
    bad = [(s, "loss", v) for s, v in run.train if not math.isfinite(v)]
    bad += [(s, "grad_norm", v) for s, v in run.grad_norm if not math.isfinite(v)]
    if not bad:
        return None
    step, name, value = min(bad)
    before = [(s, v) for s, v in curve.finite if s < step]
    ev = [f"{name} is {value} at step {step} (first non-finite value; {len(bad)} in all)"]
    if before:
        ev.append(f"last finite loss {_g(before[-1][1])} at step {before[-1][0]}")
    grads = [(s, g) for s, g in run.grad_norm if math.isfinite(g) and s < step]
    peak = max(grads, key=lambda p: p[1], default=None)
    if len(grads) >= 3 and peak[1] > 2 * statistics.median(g for _, g in grads):
        ev.append(f"grad_norm peaked at {_g(peak[1])} (step {peak[0]}) before that")
    return Finding("lr-too-high", "learning rate too high: training diverged to NaN/inf", ev,
                   HALVE_LR_REMEDY, _lr_change(run, 0.5))


def detect_too_few_steps(run: Run, curve: Curve) -> Finding | None:
    """Fewer than ``MIN_POINTS`` logged steps: too few for any of the curve's rules."""
    if curve.n >= MIN_POINTS:
        return None
    steps = curve.steps
    return Finding("too-few-steps", f"only {curve.n} logged step(s): too few to judge the curve",
                   [f"loss {_g(curve.first)} at step {steps[0]} -> {_g(curve.last)} at step {steps[-1]}"],
                   "log more often or train longer, then run lora diagnose again")


def detect_oscillation(run: Run, curve: Curve) -> Finding | None:
    """Learning rate too high: large zig-zags (most changes flip direction) rather than a trend."""
    body = curve.losses[curve.edge:]
    diffs = [b - a for a, b in zip(body, body[1:])]
    nonzero = [d for d in diffs if d != 0]
    if len(nonzero) < 4:
        return None
    flips = sum((a > 0) != (b > 0) for a, b in zip(nonzero, nonzero[1:])) / (len(nonzero) - 1)
    swing = statistics.median(abs(d) for d in diffs) / max(abs(statistics.median(body)), 1e-8)
    if flips >= OSC_SIGN_SHARE and swing >= OSC_REL_STEP:
        return Finding(
            "lr-too-high", "learning rate too high: the loss oscillates",
            [f"after step {curve.steps[curve.edge]}, {flips:.0%} of step-to-step changes flip direction and the "
             f"median change is {swing:.0%} of the loss level ({_g(min(body))}..{_g(max(body))})"],
            HALVE_LR_REMEDY, _lr_change(run, 0.5))
    return None


def detect_divergence(run: Run, curve: Curve) -> Finding | None:
    """Learning rate too high: the curve ends well above its lowest (smoothed) point, rising."""
    losses, n, end = curve.losses, curve.n, curve.end
    smooth = rolling_median(losses, max(5, n // 10) | 1)
    k = min(range(n), key=smooth.__getitem__)
    low = smooth[k]
    rise_share = (end - low) / curve.scale
    rising = n - k >= max(5, curve.edge) and mann_kendall_z(_thin(losses[k:])) > MK_Z
    if rising and end > low * (1 + DIVERGE_RISE) and rise_share >= DIVERGE_MIN_SHARE:
        return Finding(
            "lr-too-high", "learning rate too high: the loss diverges",
            [f"smoothed loss fell to {_g(low)} at step {curve.steps[k]}, then rose to {_g(end)} by step "
             f"{curve.steps[-1]} (+{(end / low - 1):.0%}; it started at {_g(curve.start)})"],
            HALVE_LR_REMEDY, _lr_change(run, 0.5))
    return None


def _epoch_of(run: Run, step: int, last_step: int) -> float | None:
    """The (fractional) epoch at ``step``: logged, else interpolated over the run's epochs."""
    known = [(s, e) for s, e in run.epoch_at.items() if s <= step]
    if known:
        return max(known)[1]
    if run.epochs and last_step:
        return step / last_step * run.epochs
    return None


def _fewer_epochs_more_dropout(run: Run, best_step: int, last_step: int) -> tuple[list[str], dict]:
    """(evidence, changes): stop in the epoch of the best step; the next heavier dropout."""
    ev: list[str] = []
    changes: dict[str, tuple[Any, Any]] = {}
    epoch = _epoch_of(run, best_step, last_step)
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
    return ev, changes


def detect_overfitting(run: Run, curve: Curve) -> Finding | None:
    """Overfitting: the validation loss rose after its lowest point while the training loss fell."""
    evals, b = curve.evals, curve.best_eval
    if len(evals) < 2:
        return None
    best_step, best = evals[b]
    final_step, final = evals[-1]
    near_best = [v for s, v in curve.finite if s <= best_step][-max(1, curve.edge):] or [curve.first]
    train_at_best = statistics.median(near_best)
    if not (b < len(evals) - 1 and final > best * (1 + OVERFIT_RISE) and curve.end < train_at_best):
        return None
    ev = [f"validation loss was lowest, {_g(best)}, at step {best_step}, then rose to {_g(final)} at step "
          f"{final_step} (+{final / best - 1:.1%})",
          f"while the training loss kept falling: {_g(train_at_best)} around step {best_step} -> {_g(curve.end)} "
          f"at the end"]
    more_ev, changes = _fewer_epochs_more_dropout(run, best_step, curve.steps[-1])
    return Finding("overfitting", "overfitting: validation loss rises while training loss falls", ev + more_ev,
                   f"guide: decrease epochs, increase dropout; keep the checkpoint from step {best_step}", changes)


def detect_lr_too_low(run: Run, curve: Curve) -> Finding | None:
    """Learning rate too low: the loss barely fell over the run (and is not already near zero)."""
    drop, trend = curve.total_drop, curve.trend
    if curve.converged or not (drop < FLAT_TOTAL_DROP or (drop < SLOW_TOTAL_DROP and trend.significant_fall)):
        return None
    return Finding(
        "lr-too-low", "learning rate too low: the loss barely falls",
        [f"the loss fell only {drop:.1%} over {curve.steps[-1] - curve.steps[0]} steps ({_g(curve.start)} -> "
         f"{_g(curve.end)}, medians of the first and last {curve.edge} logged steps)"]
        + ([trend.evidence] if trend.significant_fall else []),
        "guide: increase the learning rate 2x (e.g. 1e-4 -> 2e-4)", _lr_change(run, 2.0))


def _epochs_cap(samples: int | None) -> int | None:
    """The top of the guide's epoch range for ``samples`` (None when unknown)."""
    if samples is None:
        return None
    _, (_, hi) = tables.size_row(tables.EPOCHS_BY_SIZE, samples)
    return hi


def _more_epochs(run: Run) -> tuple[list[str], str, dict]:
    """(evidence, remedy, changes) for an underfit run: half as many epochs again, within the
    guide's range; or more steps, when the step budget (--max-steps) ended it before its epochs."""
    reached = max(run.epoch_at.values()) if run.epoch_at else None
    if run.epochs and reached is not None and reached < 0.95 * run.epochs:
        return ([f"the run stopped at epoch {reached:.2f} of its {run.epochs} (the --max-steps budget), "
                 "so more epochs alone would not train longer"],
                "guide: increase epochs; here, raise --max-steps so the run reaches them", {})
    if not run.epochs:
        return [], "guide: increase epochs", {}
    more = run.epochs + max(1, math.ceil(run.epochs / 2))
    cap = _epochs_cap(run.samples)
    if cap is not None and run.epochs < cap < more:
        more = cap
    ev = [f"{run.epochs} epoch(s) -> {more}: half as many again"
          + (f" (the guide's range for {run.samples:,} samples tops out at {cap})" if cap else "")]
    return ev, "guide: increase epochs", {"training.epochs": (run.epochs, more)}


def detect_underfitting(run: Run, curve: Curve) -> Finding | None:
    """Underfitting: the training loss (or the validation loss) is still falling at the end."""
    trend, evals = curve.trend, curve.evals
    if curve.converged or not (trend.still_falling or curve.eval_still_falling):
        return None
    ev = [trend.evidence] if trend.still_falling else []
    if curve.eval_still_falling:
        ev.append(f"validation loss is lowest at the last evaluation: {_g(evals[-2][1])} (step {evals[-2][0]}) "
                  f"-> {_g(evals[-1][1])} (step {evals[-1][0]})")
    ev += curve.rouge_evidence
    more_ev, remedy, changes = _more_epochs(run)
    return Finding("underfitting", "underfitting: the loss is still falling at the end", ev + more_ev,
                   remedy, changes)


def detect_healthy(run: Run, curve: Curve) -> Finding:
    """None of the signs: the loss has flattened or converged. Asked only when nothing else fired."""
    if curve.converged:
        ev = [f"the loss fell {curve.total_drop:.0%} ({_g(curve.start)} -> {_g(curve.end)}) to below "
              f"{CONVERGED_LOSS} nats/token: the targets are predicted almost surely, nothing left to fit"]
    else:
        ev = [f"the loss fell {curve.total_drop:.0%} ({_g(curve.start)} -> {_g(curve.end)}) and has flattened: "
              f"Mann-Kendall z = {curve.trend.z:.2f} over the last {curve.trend.points} logged steps"]
    if curve.evals:
        evals, b = curve.evals, curve.best_eval
        ev.append(f"validation loss {_g(evals[-1][1])} at step {evals[-1][0]} (lowest {_g(evals[b][1])} "
                  f"at step {evals[b][0]})")
    return Finding("healthy", "healthy: none of the guide's warning signs", ev + curve.rouge_evidence)


# --------------------------------------------------------------------------- diagnosis

# The detectors that end the diagnosis when they fire, in order (see the module docstring).
DECISIVE = (detect_non_finite, detect_too_few_steps, detect_oscillation, detect_divergence)


def fit_findings(run: Run, curve: Curve) -> list[Finding]:
    """Overfitting and a too-low learning rate (either or both); else underfitting; else healthy."""
    found = [f for f in (detect_overfitting(run, curve), detect_lr_too_low(run, curve)) if f is not None]
    return found or [detect_underfitting(run, curve) or detect_healthy(run, curve)]


def diagnose(run: Run) -> Report:
    """Apply the guide's rules to a loaded run, in the precedence of the module docstring."""
    curve = Curve(run)
    report = Report(str(run.path), curve.steps[-1], curve.first, curve.last, [], list(run.notes))
    for detect in DECISIVE:
        finding = detect(run, curve)
        if finding is not None:
            report.findings.append(finding)
            return report
    report.findings += fit_findings(run, curve)
    if not curve.evals:
        report.notes.append(f"no validation losses in {METRICS}: overfitting cannot be judged "
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
        raise UserError(f"{run.path} has no valid {ADVICE} to revise (-o needs the advice the run used)")
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
