"""`lora diagnose`'s detectors, one per "Signs of ..." rule, on synthetic curves; their precedence;
and the pieces of reading a run directory (advisor.run_reader)."""

import json
import math
from pathlib import Path

import pytest

from advisor import advise
from advisor import diagnose as d
from advisor import run_reader as rr
from advisor.errors import UserError
from advisor.runfiles import ADVICE, CONFIG, EVAL, METRICS, RESOLVED

N = 60  # logged points, every 10 steps


def run_of(losses, evals=(), *, epochs=3, lr=2e-4, dropout=0.1, samples=3000, grad_norm=None,
           epoch_share=1.0, rouge=()) -> d.Run:
    """A loaded run: losses at steps 10, 20, ...; epochs reached = ``epoch_share`` of ``epochs``."""
    train = [((i + 1) * 10, float(v)) for i, v in enumerate(losses)]
    last = train[-1][0]
    return d.Run(path=Path("run"), train=train,
                 grad_norm=grad_norm if grad_norm is not None else [(s, 1.0) for s, _ in train],
                 epoch_at={s: s / last * epochs * epoch_share for s, _ in train}, evals=list(evals),
                 rouge=list(rouge), final_eval={}, learning_rate=lr, epochs=epochs, dropout=dropout, samples=samples)


def detect(detector, run):
    return detector(run, d.Curve(run))


def healthy():
    return [1 + 2 * math.exp(-i / 8) for i in range(N)]


def falling():
    return [3 - 1.5 * i / N for i in range(N)]


def barely_falling():
    return [3 - 0.1 * i / N for i in range(N)]


def zigzag():
    return [2 + (1.2 if i % 2 else -0.8) for i in range(N)]


def u_shaped():
    return [3 * math.exp(-i / 10) + 0.8 + max(0, 0.15 * (i - 30)) for i in range(N)]


U_EVALS = [(150, 2.4), (300, 2.0), (450, 2.2), (600, 2.5)]  # lowest at step 300 of 600


# ----------------------------------------------------------------------------- each detector


def test_non_finite_names_the_first_bad_value_and_the_grad_norm_spike():
    losses = healthy()[:40] + [math.nan] + healthy()[41:]
    grads = [(s, 1.0) for s in range(10, 360, 10)] + [(360, 40.0), (370, 1.0), (380, 1.0), (390, 1.0),
                                                       (400, math.inf)]
    f = detect(d.detect_non_finite, run_of(losses, grad_norm=grads))
    assert f.kind == "lr-too-high" and f.changes == {"training.learning_rate": (2e-4, 1e-4)}
    assert f.evidence[0] == "grad_norm is inf at step 400 (first non-finite value; 2 in all)"
    assert f.evidence[1].endswith("at step 390") and "peaked at 40 (step 360)" in f.evidence[2]
    assert detect(d.detect_non_finite, run_of(healthy())) is None


def test_too_few_steps():
    f = detect(d.detect_too_few_steps, run_of([3.0, 2.5, 2.2, 2.0]))
    assert f.kind == "too-few-steps" and f.changes == {} and "only 4 logged step(s)" in f.title
    assert detect(d.detect_too_few_steps, run_of([3.0, 2.5, 2.2, 2.0, 1.9])) is None


def test_oscillation_and_not_a_smooth_decay():
    f = detect(d.detect_oscillation, run_of(zigzag()))
    assert f.kind == "lr-too-high" and "oscillates" in f.title
    assert f.evidence[0].startswith("after step 70, 100% of step-to-step changes flip direction")
    assert detect(d.detect_oscillation, run_of(healthy())) is None


def test_divergence_finds_the_turn_and_not_a_falling_curve():
    f = detect(d.detect_divergence, run_of(u_shaped()))
    assert f.kind == "lr-too-high" and "diverges" in f.title and f.remedy == d.HALVE_LR_REMEDY
    low_step = int(f.evidence[0].split(" at step ")[1].split(",")[0])
    assert 250 <= low_step <= 330
    assert detect(d.detect_divergence, run_of(healthy())) is None
    assert detect(d.detect_divergence, run_of(falling())) is None


def test_lr_too_low_doubles_the_rate_unless_the_loss_is_near_zero():
    f = detect(d.detect_lr_too_low, run_of(barely_falling(), lr=1e-4))
    assert f.kind == "lr-too-low" and f.changes == {"training.learning_rate": (1e-4, 2e-4)}
    assert f.evidence[0].startswith("the loss fell only 3.0% over 590 steps (2.996 -> 2.906")
    assert detect(d.detect_lr_too_low, run_of([0.01] * N)) is None
    assert detect(d.detect_lr_too_low, run_of(healthy())) is None


def test_underfitting_adds_half_the_epochs_within_the_guides_range():
    f = detect(d.detect_underfitting, run_of(falling()))
    assert f.kind == "underfitting" and f.changes == {"training.epochs": (3, 5)}
    assert f.evidence[0].startswith("over the last 15 logged steps (460-600) the loss still falls")
    capped = detect(d.detect_underfitting, run_of(falling(), epochs=6))
    assert capped.changes == {"training.epochs": (6, 7)}  # 3,000 samples: 3-7 epochs
    assert detect(d.detect_underfitting, run_of(healthy())) is None


def test_underfitting_cut_short_by_max_steps_asks_for_steps_not_epochs():
    f = detect(d.detect_underfitting, run_of(falling(), epochs=5, epoch_share=0.4))
    assert f.changes == {} and "--max-steps" in f.remedy
    assert "stopped at epoch 2.00 of its 5" in f.evidence[-1]


def test_underfitting_from_the_validation_curve_alone():
    evals = [(200, 2.0), (400, 1.8), (600, 1.6)]
    f = detect(d.detect_underfitting, run_of(healthy(), evals, rouge=[(200, 0.2), (600, 0.3)]))
    assert f.evidence[0].startswith("validation loss is lowest at the last evaluation: 1.8 (step 400)")
    assert f.evidence[1] == "ROUGE rose from 0.2 (step 200) to 0.3 (step 600)"


def test_overfitting_stops_at_the_best_epoch_and_raises_dropout():
    f = detect(d.detect_overfitting, run_of(healthy(), U_EVALS))
    assert f.kind == "overfitting" and f.changes == {"training.epochs": (3, 2), "lora.dropout": (0.1, 0.2)}
    assert f.evidence[0].startswith("validation loss was lowest, 2, at step 300, then rose to 2.5")
    assert "step 300" in f.remedy
    assert detect(d.detect_overfitting, run_of(healthy(), [(300, 2.0), (600, 1.9)])) is None
    assert detect(d.detect_overfitting, run_of(healthy(), [(600, 1.9)])) is None


def test_healthy_flattened_or_converged():
    f = detect(d.detect_healthy, run_of(healthy(), [(300, 1.6), (600, 1.5)]))
    assert f.kind == "healthy" and f.changes == {} and "has flattened" in f.evidence[0]
    assert f.evidence[1] == "validation loss 1.5 at step 600 (lowest 1.5 at step 600)"
    converged = detect(d.detect_healthy, run_of([3.0 * 0.985 ** (10 * (i + 1)) for i in range(N)]))
    assert "nothing left to fit" in converged.evidence[0]


# ----------------------------------------------------------------------------- precedence


def kinds(run):
    return [f.kind for f in d.diagnose(run).findings]


def test_decisive_detectors_in_order():
    assert d.DECISIVE == (d.detect_non_finite, d.detect_too_few_steps, d.detect_oscillation, d.detect_divergence)


def test_non_finite_hides_oscillation():
    run = run_of(zigzag()[:30] + [math.nan] + zigzag()[31:])
    assert detect(d.detect_oscillation, run_of(zigzag())) is not None
    assert [f.title for f in d.diagnose(run).findings] == ["learning rate too high: training diverged to NaN/inf"]


def test_overfitting_beats_underfitting():
    run = run_of(falling(), U_EVALS)
    assert detect(d.detect_underfitting, run) is not None
    assert kinds(run) == ["overfitting"]


def test_lr_too_low_beats_underfitting():
    run = run_of(barely_falling(), [(200, 3.0), (400, 2.9), (600, 2.8)])
    assert detect(d.detect_underfitting, run) is not None
    assert kinds(run) == ["lr-too-low"]


def test_overfitting_and_lr_too_low_are_both_reported():
    run = run_of(barely_falling(), U_EVALS)
    assert kinds(run) == ["overfitting", "lr-too-low"]


def test_healthy_only_when_nothing_fired_and_a_note_without_evals():
    report = d.diagnose(run_of(healthy()))
    assert kinds(run_of(healthy())) == ["healthy"]
    assert report.notes == [f"no validation losses in {METRICS}: overfitting cannot be judged "
                            "(train with --eval-data or a held-out split)"]


# ----------------------------------------------------------------------------- reading a run


def write(path: Path, name: str, obj) -> None:
    (path / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def metrics_dir(tmp_path, rows) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write(run, METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_read_curves_splits_training_evaluation_and_events(tmp_path):
    run = metrics_dir(tmp_path, [
        {"step": 10, "loss": 2.0, "grad_norm": 1.5, "epoch": 0.5, "learning_rate": 1e-4},
        {"event": "resumed"},
        {"step": 10, "loss": 1.9},
        {"step": 20, "split": "eval", "loss": 1.8, "rouge": {"rougeL": 0.3}},
        {"step": 30, "eval_loss": 1.7},
    ])
    curves, entries, notes = rr.read_curves(run)
    assert curves.train == {10: 1.9} and curves.grads == {10: 1.5} and curves.epoch_at == {10: 0.5}
    assert curves.evals == {20: 1.8, 30: 1.7} and curves.rouge == {20: 0.3}
    assert len(entries) == 5 and notes == ["1 step(s) logged more than once (a resumed run?); the last value "
                                           "of each was used"]


def test_read_final_eval_takes_the_after_half(tmp_path):
    run = metrics_dir(tmp_path, [{"step": 10, "loss": 2.0}])
    assert rr.read_final_eval(run) == {}
    write(run, EVAL, {"before": {"loss": 2.0}, "after": {"loss": 1.4}})
    assert rr.read_final_eval(run) == {"loss": 1.4}
    write(run, EVAL, [1])
    with pytest.raises(UserError, match="eval.json: expected a JSON object"):
        rr.read_final_eval(run)


def test_samples_from_resolved_train_examples(tmp_path):
    """run_config.json has no sample count: resolved.json's train_examples (what the run trained
    on) comes before the advice's planned count."""
    run = metrics_dir(tmp_path, [{"step": s, "loss": 3 - 1.5 * s / 600, "epoch": s / 100} for s in range(10, 610, 10)])
    write(run, ADVICE, advise(samples=3000, vram_gb=12, epochs=6).to_json())
    write(run, CONFIG, {"epochs": 6, "learning_rate": 2e-4, "dropout": 0.1})
    assert rr.load_run(run).samples == 3000  # no resolved.json: the advice's
    write(run, RESOLVED, {"train_examples": 500, "total_steps": 600})
    loaded = rr.load_run(run)
    assert (loaded.samples, loaded.epochs, loaded.learning_rate, loaded.dropout) == (500, 6, 2e-4, 0.1)
    # the guide's epoch range follows: 500 samples allow 5-10 epochs, 3,000 only 3-7
    assert d.diagnose(loaded).changes == {"training.epochs": (6, 9)}
    write(run, CONFIG, {"epochs": 6, "learning_rate": 2e-4, "dropout": 0.1, "samples": 20000})
    assert rr.load_run(run).samples == 20000  # run_config.json still comes first


def test_garbled_resolved_json_is_one_clear_error(tmp_path):
    run = metrics_dir(tmp_path, [{"step": 10, "loss": 2.0}])
    write(run, RESOLVED, "{ truncated")
    with pytest.raises(UserError, match="resolved.json: not valid JSON"):
        rr.load_run(run)


def test_learning_rate_falls_back_to_the_logged_peak(tmp_path):
    run = metrics_dir(tmp_path, [{"step": 10, "loss": 2.0, "learning_rate": 1e-4},
                                 {"step": 20, "loss": 1.9, "learning_rate": 3e-4}])
    values = rr.read_values(run, None, rr.read_curves(run)[1])
    assert values == {"learning_rate": 3e-4, "epochs": None, "dropout": None, "samples": None}
