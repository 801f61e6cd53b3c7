"""Metric writers besides ``metrics.jsonl``: ``lora train --report-to tensorboard,wandb``.

Each writer takes the rows the loop logs (``{"step": 40, "loss": ..., "eval_loss": ...}``) and
sends their numbers on, as ``train/<name>`` and ``eval/<name>`` scalars. TensorBoard event files
go to ``RUN/events`` (tensorboardX, a small maintained writer that needs no TensorFlow). W&B runs
only when the ``wandb`` package is installed and configured (``wandb login``, ``WANDB_API_KEY``, or
``WANDB_MODE=offline``/``disabled``, which it respects: offline runs stay in ``RUN/wandb``).
Only process 0 writes.
"""

from __future__ import annotations

import math
import netrc
import os
from typing import Any, Protocol

from flax_lora.errors import UserError

REPORTERS = ("tensorboard", "wandb")
_SKIP = ("step", "epoch", "event")


class Writer(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as ``{"train/loss": ..., "eval/loss": ...}`` (finite numbers only)."""
    out = {}
    for key, value in row.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class TensorBoard:
    """Event files under ``logdir`` (one scalar per value, at the row's step)."""

    def __init__(self, logdir, config: dict[str, Any]):
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(logdir=str(logdir))
        self._w.add_text("run_config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self._w.add_scalar(tag, value, global_step=int(row["step"]))

    def close(self) -> None:
        self._w.close()


def wandb_configured() -> bool:
    """Whether W&B can run without asking for a login: an API key, a netrc entry, or offline mode."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb():
    """The wandb module, or the UserError that says what is missing (package, login)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
    if not wandb_configured():
        raise UserError("--report-to wandb: W&B is not configured; run `wandb login`, set WANDB_API_KEY, "
                        "or set WANDB_MODE=offline to keep the run local")
    return wandb


class WandB:
    """A W&B run in ``directory`` (project ``WANDB_PROJECT`` or "lora", named after the run folder)."""

    def __init__(self, directory, name: str, config: dict[str, Any]):
        wandb = _wandb()
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lora"), name=name, dir=str(directory),
                               config=config)

    def write(self, row: dict[str, Any]) -> None:
        self._run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


def check(report_to) -> None:
    """Fail early (before anything is loaded or written) when a named writer cannot run."""
    for name in report_to:
        if name not in REPORTERS:
            raise UserError(f"--report-to {name!r}: use {', '.join(REPORTERS)} or none")
        if name == "wandb":
            _wandb()


def make_writers(report_to, run_dir, config: dict[str, Any], primary: bool = True) -> list[Writer]:
    """The writers ``report_to`` names (none on processes other than 0)."""
    if not primary:
        return []
    writers: list[Writer] = []
    for name in report_to:
        if name == "tensorboard":
            writers.append(TensorBoard(run_dir.events, config))
        elif name == "wandb":
            writers.append(WandB(run_dir.path, run_dir.path.name, config))
        else:
            raise UserError(f"--report-to {name!r}: use {', '.join(REPORTERS)} or none")
    return writers
