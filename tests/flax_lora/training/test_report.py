"""--report-to: TensorBoard event files readable back, W&B only when installed and configured."""

from __future__ import annotations

import math
import struct
import sys
import types

import pytest

from flax_lora.errors import UserError
from flax_lora.training.report import TensorBoard, check, make_writers, scalars, wandb_configured
from flax_lora.training.rundir import RunDir


def test_scalars_name_train_and_eval_values_and_skip_the_rest():
    row = {"step": 4, "epoch": 0.1, "loss": 1.5, "eval_loss": 2.0, "eval_perplexity": 7.4, "mfu": None,
           "grad_norm": math.nan, "flag": True}
    assert scalars(row) == {"train/loss": 1.5, "eval/loss": 2.0, "eval/perplexity": 7.4}


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a folder's TensorBoard event files (TFRecord frames of Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_events_read_back(tmp_path):
    tb = TensorBoard(tmp_path / "events", {"r": 8})
    tb.write({"step": 10, "loss": 2.5, "learning_rate": 1e-3})
    tb.write({"step": 20, "loss": 1.25, "eval_loss": 1.5})
    tb.close()
    events = read_events(tmp_path / "events")
    assert events["train/loss"] == [(10, 2.5), (20, 1.25)] and events["eval/loss"] == [(20, 1.5)]
    assert events["train/learning_rate"] == [(10, pytest.approx(1e-3))]


def test_only_process_zero_writes_and_unknown_names_are_refused(tmp_path):
    rd = RunDir(tmp_path)
    assert make_writers(("tensorboard",), rd, {}, primary=False) == [] and not (tmp_path / "events").exists()
    with pytest.raises(UserError, match="--report-to 'mlflow'"):
        make_writers(("mlflow",), rd, {})


def test_wandb_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        make_writers(("wandb",), RunDir(tmp_path), {})
    with pytest.raises(UserError, match="pip install wandb"):
        check(("tensorboard", "wandb"))
    check(("tensorboard",))


def test_a_writer_that_cannot_run_stops_lora_train_before_it_writes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli.main import cli

    monkeypatch.setitem(sys.modules, "wandb", None)
    res = CliRunner().invoke(cli, ["train", "--output", str(tmp_path / "run"), "--report-to", "wandb"])
    assert res.exit_code == 2 and "pip install wandb" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(cli, ["train", "--output", str(tmp_path / "run"), "--report-to", "mlflow"])
    assert res.exit_code == 2 and "--report-to 'mlflow'" in res.output


def test_wandb_needs_a_login_or_offline_mode(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_configured()
    with pytest.raises(UserError, match="WANDB_MODE=offline"):
        make_writers(("wandb",), RunDir(tmp_path), {})


def test_wandb_offline_logs_each_row_at_its_step(tmp_path, monkeypatch):
    """A stand-in wandb module records the calls the writer makes (the real package is optional)."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (w,) = make_writers(("wandb",), RunDir(tmp_path / "myrun"), {"r": 8})
    w.write({"step": 3, "loss": 1.0})
    w.close()
    init = calls[0][1]
    assert init["name"] == "myrun" and init["dir"] == str(tmp_path / "myrun") and init["config"] == {"r": 8}
    assert calls[1:] == [("log", 3, {"train/loss": 1.0}), ("finish",)]
