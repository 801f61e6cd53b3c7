"""A finished run directory read for ``lora diagnose``: its curves and the values the run used.

Pure Python (no jax). :func:`load_run` reads, in this order (so that of several problems the
same one is reported first):

1. ``metrics.jsonl`` (:data:`~advisor.runfiles.METRICS`) into curves by step: training loss,
   gradient norm, epoch, validation loss and ROUGE (:class:`Curves`);
2. ``eval.json`` (:data:`~advisor.runfiles.EVAL`): the final evaluation (the ``after`` half of
   what ``lora train`` writes), whose ROUGE stands in when the log has none;
3. ``advice.json`` (:data:`~advisor.runfiles.ADVICE`): the advice the run was built from (an
   unreadable one is noted and ignored: it may be hand-edited);
4. ``run_config.json`` (:data:`~advisor.runfiles.CONFIG`) and ``resolved.json``
   (:data:`~advisor.runfiles.RESOLVED`): the values the run used.

Each value the diagnosis needs is the one the run used where the run recorded it: learning
rate, epochs and dropout from run_config.json, else the advice (the learning rate, failing
both, is the largest one logged); the sample count from run_config.json, else
``train_examples`` in resolved.json (what the run trained on), else the advice. Anything
missing or malformed that the diagnosis cannot do without is a UserError with one clear line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.errors import UserError
from advisor.runfiles import ADVICE, CONFIG, EVAL, METRICS, RESOLVED, read_metrics

EVAL_MARKS = ("eval", "validation", "val")
LR_NAMES = ("learning_rate", "lr", "peak_learning_rate")
EPOCH_NAMES = ("epochs", "num_epochs", "num_train_epochs")
DROPOUT_NAMES = ("dropout", "lora_dropout")
SAMPLE_NAMES = ("samples", "num_samples", "train_samples")
RESOLVED_SAMPLE_NAMES = ("train_examples",)


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


# --------------------------------------------------------------------------- metrics rows


def _number(value: Any, where: str, name: str) -> float:
    """A logged number; null and the strings "NaN"/"Infinity" are non-finite, anything else an error."""
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


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_eval(entry: dict) -> bool:
    """Whether a row is an evaluation (``split``/``kind``/... is eval/validation/val, or ``eval: true``)."""
    for key in ("split", "kind", "type", "event", "phase"):
        if str(entry.get(key, "")).lower() in EVAL_MARKS:
            return True
    return entry.get("eval") is True


def _rouge_of(entry: dict) -> float | None:
    """ROUGE-L (else ROUGE-Lsum, else ROUGE-1) of a row, flat or under ``rouge``, maybe ``eval_``-prefixed."""
    flat = dict(entry)
    if isinstance(entry.get("rouge"), dict):
        flat.update(entry["rouge"])
    for key in ("rougeL", "rouge_l", "rougeLsum", "rouge1", "rouge_1"):
        for name in (key, f"eval_{key}"):
            if _is_real(flat.get(name)):
                return float(flat[name])
    return None


@dataclass
class Curves:
    """The metrics log as curves keyed by step; a later line for the same step wins."""

    train: dict[int, float] = field(default_factory=dict)
    grads: dict[int, float] = field(default_factory=dict)
    epoch_at: dict[int, float] = field(default_factory=dict)
    evals: dict[int, float] = field(default_factory=dict)
    rouge: dict[int, float] = field(default_factory=dict)
    repeats: int = 0  # training steps logged more than once (a resumed run)

    def add(self, number: int, entry: dict) -> None:
        """One row: a training step, an evaluation, or an event without a step (skipped)."""
        where = f"{METRICS} line {number}"
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            if "loss" in entry or "eval_loss" in entry:
                raise UserError(f"{where}: step is {step!r}, not a non-negative integer")
            return  # an event line (e.g. "resumed"), not a measurement
        if "eval_loss" in entry:
            self.evals[step] = _number(entry["eval_loss"], where, "eval_loss")
        if _is_eval(entry):
            if "loss" in entry:
                self.evals[step] = _number(entry["loss"], where, "loss")
        elif "loss" in entry:
            self._add_train(step, entry, where)
        value = _rouge_of(entry)
        if value is not None and (_is_eval(entry) or "eval_loss" in entry or "loss" not in entry):
            self.rouge[step] = value

    def _add_train(self, step: int, entry: dict, where: str) -> None:
        self.repeats += step in self.train
        self.train[step] = _number(entry["loss"], where, "loss")
        if "grad_norm" in entry:
            self.grads[step] = _number(entry["grad_norm"], where, "grad_norm")
        if _is_real(entry.get("epoch")):
            self.epoch_at[step] = float(entry["epoch"])


def read_curves(run_dir: Path) -> tuple[Curves, list[tuple[int, dict]], list[str]]:
    """(curves, the log's rows, notes) of ``run_dir``'s metrics log; UserError when it has no training loss."""
    entries, notes = read_metrics(run_dir / METRICS)
    if not entries:
        raise UserError(f"{run_dir / METRICS} is empty: the run has not logged a step yet")
    curves = Curves()
    for number, entry in entries:
        curves.add(number, entry)
    if not curves.train:
        raise UserError(f"{run_dir / METRICS} has no training-loss entries (objects with step and loss)")
    if curves.repeats:
        notes.append(f"{curves.repeats} step(s) logged more than once (a resumed run?); the last value of each was used")
    return curves, entries, notes


# --------------------------------------------------------------------------- the other files


def _read_json(path: Path) -> Any:
    """A JSON file's content, None when it does not exist; invalid JSON -> UserError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def read_final_eval(run_dir: Path) -> dict[str, Any]:
    """The final evaluation in eval.json ({} when absent): its ``after`` part when it has one."""
    final_eval = _read_json(run_dir / EVAL)
    if final_eval is not None and not isinstance(final_eval, dict):
        raise UserError(f"{run_dir / EVAL}: expected a JSON object")
    final_eval = final_eval or {}
    if isinstance(final_eval.get("after"), dict):  # lora train writes {"before": {...}, "after": {...}}
        final_eval = final_eval["after"]
    return final_eval


def read_advice(run_dir: Path, notes: list[str]):
    """The run's advice.json as an Advice; None when absent or invalid (then with a note)."""
    path = run_dir / ADVICE
    if not path.exists():
        return None
    from pydantic import ValidationError

    from advisor.schema import Advice

    try:
        return Advice.from_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        notes.append(f"{ADVICE} is not a valid advice file ({str(exc).splitlines()[0]}); ignored")
        return None


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


def _first_number(*candidates: Any) -> float | int | None:
    """The first candidate that is not None, when it is a number (a non-number is not passed over)."""
    value = next((c for c in candidates if c is not None), None)
    return value if _is_real(value) else None


def _advice_values(advice) -> dict[str, Any]:
    """The values the advice chose, by the names diagnose uses ({} without advice)."""
    if advice is None:
        return {}
    return {"learning_rate": advice.training.learning_rate, "epochs": advice.training.epochs,
            "dropout": advice.lora.dropout,
            "samples": advice.request.samples or (advice.data.samples if advice.data else None)}


def _peak_logged_lr(entries: list[tuple[int, dict]]) -> float | None:
    """The largest learning rate in the log: the schedule's peak."""
    logged = [e["learning_rate"] for _, e in entries if isinstance(e.get("learning_rate"), (int, float))]
    return max(logged) if logged else None


def read_values(run_dir: Path, advice, entries: list[tuple[int, dict]]) -> dict[str, Any]:
    """learning_rate, epochs, dropout and samples the run used (None where unknown)."""
    config = _read_json(run_dir / CONFIG) or {}
    resolved = _read_json(run_dir / RESOLVED) or {}
    chosen = _advice_values(advice)
    lr = _first_number(_find(config, LR_NAMES), chosen.get("learning_rate"))
    if lr is None:
        lr = _peak_logged_lr(entries)
    epochs = _first_number(_find(config, EPOCH_NAMES), chosen.get("epochs"))
    dropout = _first_number(_find(config, DROPOUT_NAMES), chosen.get("dropout"))
    samples = _first_number(_find(config, SAMPLE_NAMES), _find(resolved, RESOLVED_SAMPLE_NAMES),
                            chosen.get("samples"))
    return {"learning_rate": float(lr) if lr else None, "epochs": int(epochs) if epochs else None,
            "dropout": float(dropout) if dropout is not None else None,
            "samples": int(samples) if samples else None}


# --------------------------------------------------------------------------- the run


def _check_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"no such run directory: {run_dir}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: pass the run's output folder (lora train --output)")


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; anything missing or malformed -> UserError with one clear line."""
    run_dir = Path(run_dir)
    _check_dir(run_dir)
    curves, entries, notes = read_curves(run_dir)
    final_eval = read_final_eval(run_dir)
    if final_eval and not curves.rouge:
        value = _rouge_of(final_eval)
        if value is not None:
            curves.rouge[max(curves.train)] = value
    advice = read_advice(run_dir, notes)
    values = read_values(run_dir, advice, entries)
    return Run(run_dir, sorted(curves.train.items()), sorted(curves.grads.items()), curves.epoch_at,
               sorted(curves.evals.items()), sorted(curves.rouge.items()), final_eval,
               advice=advice, notes=notes, **values)
