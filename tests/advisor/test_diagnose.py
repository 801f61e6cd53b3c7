"""`lora diagnose` on metric curves of each kind the guide names, and on malformed run directories."""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from advisor import Advice, advise
from cli.main import cli
from advisor import diagnose as d

ROOT = Path(__file__).resolve().parents[2]
N = 60  # logged points, every 10 steps


def make_run(path: Path, losses, evals=(), *, epochs=3, lr=2e-4, dropout=0.1, eval_style="eval_loss",
             rouge=None, eval_json=None) -> Path:
    """A run directory like `lora train --output` writes: advice.json, metrics.jsonl, eval.json."""
    path.mkdir(parents=True, exist_ok=True)
    advice = advise(samples=3000, vram_gb=12, epochs=epochs, learning_rate=lr, dropout=dropout)
    (path / "advice.json").write_text(advice.to_json())
    evals = dict(evals)
    lines = []
    for i, loss in enumerate(losses):
        step = (i + 1) * 10
        lines.append({"step": step, "epoch": step / (len(losses) * 10) * epochs, "loss": loss,
                      "learning_rate": lr, "grad_norm": 1.0, "tokens_per_second": 1000.0})
        if step in evals:
            entry = ({"step": step, "eval_loss": evals[step]} if eval_style == "eval_loss"
                     else {"step": step, "split": "eval", "loss": evals[step]})
            if rouge:
                entry["rougeL"] = rouge[step]
            lines.append(entry)
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    if eval_json is not None:
        (path / "eval.json").write_text(json.dumps(eval_json))
    return path


def noise(sd, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(0, sd) for _ in range(N)]


def healthy():
    return [1 + 2 * math.exp(-i / 8) + e for i, e in enumerate(noise(0.03))]


def invoke(*args):
    return CliRunner().invoke(cli, ["diagnose", *map(str, args)])


def kinds(report):
    return [f.kind for f in report.findings]


def report_of(path):
    return d.diagnose(d.load_run(path))


# ----------------------------------------------------------------------------- each kind


def test_healthy_run_has_no_changes(tmp_path):
    run = make_run(tmp_path / "r", healthy(), [(200, 1.6), (400, 1.5), (600, 1.5)], eval_json={"loss": 1.5})
    report = report_of(run)
    assert kinds(report) == ["healthy"] and report.changes == {}
    res = invoke(run)
    assert res.exit_code == 0 and "healthy" in res.stdout and "fell 60%" in res.stdout


def test_underfitting_suggests_more_epochs(tmp_path):
    losses = [3 - 1.5 * i / N + e for i, e in enumerate(noise(0.03))]
    evals = [(200, 2.6), (400, 2.3), (600, 2.0)]
    rouge = {200: 0.20, 400: 0.24, 600: 0.27}
    run = make_run(tmp_path / "r", losses, evals, rouge=rouge)
    report = report_of(run)
    assert kinds(report) == ["underfitting"]
    assert report.changes == {"training.epochs": (3, 5)}  # +50%, within the guide's 3-7 for 3,000 samples
    text = d.render(report)
    assert "460-600" in text and "Mann-Kendall" in text  # the tail window, by step
    assert "ROUGE rose from 0.2 (step 200) to 0.27 (step 600)" in text
    assert "validation loss is lowest at the last evaluation" in text


def test_underfitting_is_capped_by_the_guides_epoch_range(tmp_path):
    losses = [3 - 1.5 * i / N + e for i, e in enumerate(noise(0.03))]
    report = report_of(make_run(tmp_path / "r", losses, epochs=6))
    assert report.changes == {"training.epochs": (6, 7)}


def test_learning_rate_too_low_doubles_it(tmp_path):
    losses = [3 - 0.1 * i / N + e for i, e in enumerate(noise(0.01))]
    report = report_of(make_run(tmp_path / "r", losses, lr=1e-4))
    assert kinds(report) == ["lr-too-low"]
    assert report.changes == {"training.learning_rate": (1e-4, 2e-4)}
    assert "fell only" in d.render(report)


def test_flat_loss_near_zero_is_not_a_low_learning_rate(tmp_path):
    report = report_of(make_run(tmp_path / "r", [0.01 + e for e in noise(0.0005)]))
    assert kinds(report) == ["healthy"]


def test_oscillation_halves_the_learning_rate(tmp_path):
    losses = [2 + (1.2 if i % 2 else -0.8) + e for i, e in enumerate(noise(0.1))]
    report = report_of(make_run(tmp_path / "r", losses))
    assert kinds(report) == ["lr-too-high"] and "oscillates" in report.findings[0].title
    assert report.changes == {"training.learning_rate": (2e-4, 1e-4)}


def test_ordinary_minibatch_noise_is_not_oscillation(tmp_path):
    losses = [1 + 2 * math.exp(-i / 8) + e for i, e in enumerate(noise(0.15, seed=3))]
    assert "lr-too-high" not in kinds(report_of(make_run(tmp_path / "r", losses)))


def test_divergence_halves_the_learning_rate(tmp_path):
    losses = [3 * math.exp(-i / 10) + 0.8 + max(0, 0.15 * (i - 30)) + e for i, e in enumerate(noise(0.03))]
    report = report_of(make_run(tmp_path / "r", losses))
    assert kinds(report) == ["lr-too-high"] and "diverges" in report.findings[0].title
    low_step = int(re.search(r"at step (\d+), then rose", report.findings[0].evidence[0]).group(1))
    assert 250 <= low_step <= 330  # the turn is at step 310


@pytest.mark.parametrize("spelling", ["NaN", "Infinity", "null"])
def test_nan_loss_halves_the_learning_rate_with_the_step(tmp_path, spelling):
    run = make_run(tmp_path / "r", healthy()[:40])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(f'{{"step": 410, "loss": {spelling}, "grad_norm": {spelling}}}\n')
    report = report_of(run)
    assert kinds(report) == ["lr-too-high"] and report.changes == {"training.learning_rate": (2e-4, 1e-4)}
    assert "at step 410" in report.findings[0].evidence[0] and "step 400" in report.findings[0].evidence[1]
    res = invoke(run, "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["changes"] == {"training.learning_rate": {"from": 2e-4, "to": 1e-4}}


@pytest.mark.parametrize("eval_style", ["eval_loss", "split"])
def test_overfitting_fewer_epochs_more_dropout(tmp_path, eval_style):
    losses = [1 + 2 * math.exp(-i / 10) - 0.005 * i + e for i, e in enumerate(noise(0.02))]
    evals = [(s, 2 + 1.5 * math.exp(-s / 100) + 0.003 * max(0, s - 200)) for s in range(50, 610, 50)]
    report = report_of(make_run(tmp_path / "r", losses, evals, eval_style=eval_style))
    assert kinds(report) == ["overfitting"]
    assert report.changes == {"training.epochs": (3, 1), "lora.dropout": (0.1, 0.2)}
    assert "lowest, 2.203, at step 200" in report.findings[0].evidence[0]
    assert "step 200" in report.findings[0].remedy  # keep the best checkpoint


def test_overfitting_at_heaviest_dropout_keeps_it_and_says_so(tmp_path):
    losses = [1 + 2 * math.exp(-i / 10) - 0.005 * i + e for i, e in enumerate(noise(0.02))]
    evals = [(150, 2.4), (300, 2.0), (450, 2.2), (600, 2.5)]
    report = report_of(make_run(tmp_path / "r", losses, evals, dropout=0.2))
    assert kinds(report) == ["overfitting"]
    assert report.changes == {"training.epochs": (3, 2)}  # best at step 300 of 600 = epoch 1.5 -> 2
    assert any("already 0.2" in e for e in report.findings[0].evidence)


def test_too_few_steps_is_not_judged(tmp_path):
    report = report_of(make_run(tmp_path / "r", [3.0, 2.5, 2.2]))
    assert kinds(report) == ["too-few-steps"] and report.changes == {}


def test_resumed_run_with_repeated_steps_uses_the_last_value(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 600, "loss": 1.0}) + "\n")
    report = report_of(run)
    assert any("logged more than once" in n for n in report.notes)


# ----------------------------------------------------------------------------- revised advice


def test_output_writes_a_valid_revised_advice(tmp_path):
    losses = [1 + 2 * math.exp(-i / 10) - 0.005 * i + e for i, e in enumerate(noise(0.02))]
    evals = [(s, 2 + 1.5 * math.exp(-s / 100) + 0.003 * max(0, s - 200)) for s in range(50, 610, 50)]
    run = make_run(tmp_path / "r", losses, evals)
    out = tmp_path / "out" / "revised.json"
    res = invoke(run, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"lora train --from-advice {out}" in res.stdout
    old = Advice.from_json((run / "advice.json").read_text())
    new = Advice.from_json(out.read_text())
    assert (new.training.epochs, new.lora.dropout) == (1, 0.2)
    assert new.training.total_steps == math.ceil(old.training.total_steps / 3)
    assert new.request.epochs == 1 and new.request.dropout == 0.2  # the explicit request agrees
    assert new.lora.r == old.lora.r and new.training.learning_rate == old.training.learning_rate
    why = {r.field: r.why for r in new.reasons}
    assert why["training.epochs"].startswith(f"lora diagnose {run}: overfitting") and "(was 3)" in why["training.epochs"]
    assert "step 200" in why["lora.dropout"] and "(was 0.1)" in why["lora.dropout"]
    assert [r.field for r in new.reasons] == [r.field for r in old.reasons]  # replaced in place
    assert why["lora.r"] == {r.field: r.why for r in old.reasons}["lora.r"]
    assert list(out.parent.iterdir()) == [out]  # written atomically, no temp file left


def test_output_of_a_healthy_run_is_the_same_advice(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    res = invoke(run, "-o", tmp_path / "a.json")
    assert res.exit_code == 0 and "unchanged" in res.stdout
    assert Advice.from_json((tmp_path / "a.json").read_text()) == Advice.from_json((run / "advice.json").read_text())


def test_lr_from_run_config_wins_over_the_advice(tmp_path):
    """A run started with --learning-rate 1e-3 is judged by the rate it actually used."""
    losses = [2 + (1.2 if i % 2 else -0.8) + e for i, e in enumerate(noise(0.1))]
    run = make_run(tmp_path / "r", losses)
    (run / "run_config.json").write_text(json.dumps({"training": {"learning_rate": 1e-3, "epochs": 3}}))
    res = invoke(run, "-o", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    assert Advice.from_json((tmp_path / "a.json").read_text()).training.learning_rate == 5e-4


# ----------------------------------------------------------------------------- malformed input


def _bad(res, needle):
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert "Traceback" not in res.output and res.stdout == ""


def test_missing_run_dir(tmp_path):
    _bad(invoke(tmp_path / "nope"), "no such run directory")


def test_run_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _bad(invoke(tmp_path / "f"), "not a directory")


def test_no_metrics_file(tmp_path):
    (tmp_path / "r").mkdir()
    _bad(invoke(tmp_path / "r"), "has no metrics.jsonl")


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"\n\n  \n", "is empty"),
    (b'{"step": 10, "loss": 2.0}\nnot json\n{"step": 30, "loss": 1.0}\n', "line 2: not valid JSON"),
    (b'{"step": 10, "loss": 2.0}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
    (b'{"step": 10, "loss": "low"}\n', "line 1: loss is 'low', not a number"),
    (b'{"step": 10, "loss": true}\n', "line 1: loss is True"),
    (b'{"step": "ten", "loss": 2.0}\n', "line 1: step is 'ten'"),
    (b'{"step": 10, "loss": 2.0}\n\xff\xfe{}\n', "line 2: not UTF-8"),
    (b'{"step": 10, "tokens_per_second": 5}\n', "no training-loss entries"),
])
def test_malformed_metrics(tmp_path, content, needle):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_bytes(content)
    _bad(invoke(tmp_path / "r"), needle)


def test_line_cut_off_by_a_crash_is_skipped_with_a_note(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 610, "lo')  # no newline: the writer was killed mid-line
    res = invoke(run)
    assert res.exit_code == 0, res.output
    assert "line 61: cut off mid-write" in res.stdout


def test_garbled_eval_json(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    (run / "eval.json").write_text("{ truncated")
    _bad(invoke(run), "eval.json: not valid JSON")


def test_output_needs_the_runs_advice(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    (run / "advice.json").unlink()
    _bad(invoke(run, "-o", tmp_path / "a.json"), "no valid advice.json")
    assert not (tmp_path / "a.json").exists()


def test_hand_edited_nonsense_advice_is_reported_not_trusted(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    (run / "advice.json").write_text('{"lora": {"r": -3}}')
    res = invoke(run)
    assert res.exit_code == 0 and "advice.json is not a valid advice file" in res.stdout
    _bad(invoke(run, "-o", tmp_path / "a.json"), "no valid advice.json")


def test_output_refuses_to_overwrite_the_runs_own_advice(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    before = (run / "advice.json").read_text()
    _bad(invoke(run, "-o", run / "advice.json"), "would overwrite the advice this run used")
    assert (run / "advice.json").read_text() == before


# ----------------------------------------------------------------------------- statistics, imports


def test_mann_kendall_and_theil_sen_by_hand():
    # 10 increasing values: S = 45, var = 10*9*25/18 = 125, z = (45 - 1) / sqrt(125)
    assert d.mann_kendall_z(list(range(10))) == pytest.approx(44 / math.sqrt(125))
    assert d.mann_kendall_z([5.0] * 10) == 0
    pts = [(x, 2 * x + 1) for x in range(10)] + [(10, 1000.0)]  # one wild outlier
    assert d.theil_sen_slope(pts) == 2


def test_diagnose_does_not_import_jax(tmp_path):
    run = make_run(tmp_path / "r", healthy())
    code = ("import sys; from click.testing import CliRunner; from cli.main import cli; "
            f"r = CliRunner().invoke(cli, ['diagnose', {str(run)!r}]); assert r.exit_code == 0, r.output; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _write_run(tmp_path, losses, *, epochs, epoch_per_step):
    import json
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "epoch": s * epoch_per_step, "loss": v, "learning_rate": 2e-4, "grad_norm": 1.0}
            for s, v in losses]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run_config.json").write_text(json.dumps({"epochs": epochs, "learning_rate": 2e-4, "dropout": 0.1}))
    return run


def test_converged_run_is_not_underfitting(tmp_path):
    """A loss that still falls but is already near zero (the demo) needs no more epochs."""
    from advisor.diagnose import diagnose, load_run
    losses = [(s, 3.0 * 0.985 ** s) for s in range(10, 610, 10)]
    assert losses[-1][1] < 0.05
    report = diagnose(load_run(_write_run(tmp_path, losses, epochs=5, epoch_per_step=5 / 600)))
    assert [f.kind for f in report.findings] == ["healthy"]
    assert "nothing left to fit" in report.findings[0].evidence[0]


def test_underfitting_capped_by_max_steps_asks_for_more_steps(tmp_path):
    from advisor.diagnose import diagnose, load_run
    losses = [(s, 2.0 - 0.002 * s) for s in range(10, 410, 10)]  # still falling steeply
    report = diagnose(load_run(_write_run(tmp_path, losses, epochs=5, epoch_per_step=2 / 400)))
    (f,) = report.findings
    assert f.kind == "underfitting" and "--max-steps" in f.remedy and not f.changes
