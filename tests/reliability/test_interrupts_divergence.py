"""SIGINT / SIGTERM during a real `lora train` subprocess, and the divergence guard.

Interrupts: the step in flight finishes, a checkpoint is saved (no half-written files), the
message says how to resume, the exit code is 130 / 143, and ``--resume`` continues from it.
Divergence is forced with an absurd learning rate through the API (the CLI caps it at 1, which
the demo survives); the rest goes through the real CLI.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_config
from click.testing import CliRunner

from cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(jax_cache):
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _ckpts(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_130_143(tmp_path, env):
    args = ["--max-steps", "2000", "--save-every", "0", "--eval-every", "0", "--rouge-examples", "0", "-q"]
    procs = {sig: subprocess.Popen([sys.executable, "-m", "cli", "train", "--output", f"run_{sig.name}", *args],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.time() + 240
        pending = dict(procs)
        while pending:  # signal each run once it has logged a training step (it is in the loop)
            assert time.time() < deadline, "no training step logged in time"
            for sig, proc in list(pending.items()):
                metrics = tmp_path / f"run_{sig.name}" / "metrics.jsonl"
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                if metrics.is_file() and '"loss"' in metrics.read_text():
                    proc.send_signal(sig)
                    del pending[sig]
            time.sleep(0.05)
        outs = {sig: p.communicate(timeout=120) for sig, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run, (_, err) = tmp_path / f"run_{sig.name}", outs[sig]
        assert procs[sig].returncode == code, err[-2000:]
        assert "Traceback" not in err
        assert f"Continue with: lora train --output run_{sig.name} --resume" in err, err[-2000:]
        steps = [n for n in _ckpts(run) if n.isdigit()]
        assert len(steps) == 1 and 0 < int(steps[0]) < 2000, _ckpts(run)
        assert not [p for p in run.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]
        assert not (run / "eval.json").exists()

    run = tmp_path / "run_SIGINT"
    at = int([n for n in _ckpts(run) if n.isdigit()][0])
    res = CliRunner().invoke(cli, ["train", "--output", str(run), "--resume", "--max-steps", str(at + 4), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "eval.json").read_text())["step"] == at + 4


def _api_run(out: Path, resume: bool = False, **over):
    from flax_lora.training.loop import train

    base = dict(max_steps=6, save_every=3, log_every=3, eval_every=0, rouge_examples=0)
    return train(run_config(None, None, out, **{**base, **over}), resume=resume, quiet=True)


def _latest_checkpoint_is_finite(run: Path) -> int:
    import jax
    import orbax.checkpoint as ocp

    from flax_lora.training.checkpoint import Checkpoints

    ckpt = Checkpoints(run / "checkpoints")
    step = ckpt.latest_step()
    raw = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree_util.tree_leaves(raw["state"])
    ckpt.close()
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves if np.asarray(x).dtype.kind == "f")
    return step


def test_divergence_stops_keeps_the_last_good_checkpoint_and_prints_the_command(tmp_path, monkeypatch, jax_cache):
    from flax_lora.errors import Diverged

    monkeypatch.chdir(tmp_path)
    _api_run(Path("run"), max_steps=3, learning_rate=1e-3)  # a good checkpoint at step 3
    with pytest.raises(Diverged) as info:  # NaN from step 5; detected when metrics are pulled at step 6
        _api_run(Path("run"), resume=True, learning_rate=1e30)
    msg = str(info.value)
    assert "diverged at step 5" in msg and "kept the last good checkpoint (step 3)" in msg, msg
    assert "halve the learning rate (1e+30 -> 5e+29)" in msg
    assert "lora train --output run --resume --learning-rate 5e+29" in msg
    assert _latest_checkpoint_is_finite(Path("run")) == 3  # the diverged state was never saved
    rows = _rows(Path("run"))
    assert any(r.get("event") == "diverged" and r["diverged_at_step"] == 5 for r in rows)
    assert any("loss" in r and math.isnan(r["loss"]) for r in rows)  # for `lora diagnose`

    # The printed remedy through the real CLI: the stored (diverging) rate first, then a sane one.
    res = CliRunner().invoke(cli, ["train", "--output", "run", "--resume", "-q"])
    assert res.exit_code == 2 and "diverged at step 5" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["train", "--output", "run", "--resume", "--learning-rate", "1e-3", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("run/run_config.json").read_text())["learning_rate"] == 1e-3
    train_rows = [r for r in _rows(Path("run")) if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in train_rows)


def test_a_signal_while_loading_stops_before_training_and_resumes(tmp_path, monkeypatch, jax_cache):
    """SIGINT during the model/data load: exit 130 before any compile, the folder a resumable run."""
    import os

    from flax_lora.errors import Interrupted
    from flax_lora.training import loop

    real_build = loop.build

    def build_then_signal(*a, **k):
        out = real_build(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: sets the flag, the load finishes
        return out

    monkeypatch.setattr(loop, "build", build_then_signal)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        _api_run(run)
    assert info.value.exit_code == 130
    assert "while loading, before training started" in str(info.value)
    assert f"lora train --output {run} --resume" in str(info.value)
    assert (run / "run_config.json").is_file() and not (run / "metrics.jsonl").exists() and not [n for n in _ckpts(run) if n.isdigit()]
    monkeypatch.setattr(loop, "build", real_build)
    assert _api_run(run, resume=True)["step"] == 6


def test_a_checkpoint_saved_just_before_the_divergence_is_not_kept(tmp_path, jax_cache):
    """Checkpoint 1 is saved after an update at 1e30: finite, but its weights give step 2's NaN.
    It is dropped, so neither a rollback nor --resume starts from it."""
    from flax_lora.errors import Diverged

    run = tmp_path / "run"
    with pytest.raises(Diverged) as info:
        _api_run(run, learning_rate=1e30, save_every=1, log_every=1)
    msg = str(info.value)
    assert "diverged at step 2" in msg and "no good checkpoint precedes it" in msg, msg
    assert not [n for n in _ckpts(run) if n.isdigit()]
    result = _api_run(run, resume=True, learning_rate=1e-3, save_every=1, log_every=1)
    assert result["step"] == 6
    losses = [r["loss"] for r in _rows(run) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)  # restarted from step 0


def test_halve_lr_rolls_back_and_finishes(tmp_path, jax_cache):
    # q/v only, batch 4 x 1: on the demo's GPT-2 port, a run that diverges at this rate at step 2 and,
    # halved, at step 4 (after a good checkpoint at step 2), then finishes at a quarter of it
    result = _api_run(tmp_path / "run", learning_rate=6e7, save_every=2, log_every=2, on_divergence="halve-lr",
                      batch_size=4, grad_accum=1, dropout=0.1, target_preset="attention-qv")
    assert result["step"] == 6
    events = [r for r in _rows(tmp_path / "run") if r.get("event") == "diverged"]
    assert 1 <= len(events) <= 3 and [e["retry"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["lr_after"] == e["lr_before"] / 2 for e in events)
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert cfg["learning_rate"] == 6e7 / 2 ** len(events)
    train_rows = [r for r in _rows(tmp_path / "run") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert re.search(r"eval_loss", (tmp_path / "run" / "metrics.jsonl").read_text())
