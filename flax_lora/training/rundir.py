"""The run directory: where a run's config, metrics, checkpoints and adapter live.

``RUN/`` holds ``advice.json`` (the advice used), ``run_config.json`` (every value the run
uses), ``resolved.json`` (what it found out while starting: devices, targets, steps),
``metrics.jsonl`` (one JSON object per logged step / eval), ``loss.png``, ``eval.json``
(before/after), ``data_report.json``, ``adapter/`` (native adapter), ``checkpoints/`` (orbax)
and, for the demo, ``model/`` and ``data/``. A run directory is enough to evaluate, generate
from or resume. File names and the metrics format: :mod:`advisor.runfiles`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from advisor import runfiles
from advisor.io import atomic_write_json, atomic_write_text
from flax_lora.errors import UserError
from flax_lora.training.config import Resolved, RunConfig

_FILES = {"config": runfiles.CONFIG, "resolved_file": runfiles.RESOLVED, "advice": runfiles.ADVICE,
          "metrics": runfiles.METRICS, "loss_png": runfiles.LOSS_PNG, "eval": runfiles.EVAL,
          "adapter": runfiles.ADAPTER, "checkpoints": runfiles.CHECKPOINTS, "eval_before": runfiles.EVAL_BEFORE,
          "data_report": runfiles.DATA_REPORT, "events": runfiles.EVENTS}


def inside(root: str | os.PathLike, name: str) -> Path:
    """``root/name``, or a UserError when it resolves outside ``root`` (``..``, absolute, symlink)."""
    root = Path(root)
    path = root / name
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{path} points outside the output folder {root} (to {target}); refusing to use it")
    return path


class RunDir:
    """The run folder. With ``primary=False`` (every process but 0 of a multi-host run) it only
    reads: writes are no-ops, so one process writes each file."""

    def __init__(self, path: str | Path, primary: bool = True):
        self.path = Path(path)
        self.primary = primary

    def __getattr__(self, name):  # rd.metrics -> RUN/metrics.jsonl etc.
        if name in _FILES:
            return self.child(_FILES[name])
        raise AttributeError(name)

    def child(self, name: str) -> Path:
        """``RUN/name``, refused when it would land outside the run folder (``..``, a planted symlink)."""
        return inside(self.path, name)

    def exists(self) -> bool:
        return self.config.is_file()

    def load_config(self) -> RunConfig:
        if not self.exists():
            raise UserError(f"{self.path} is not a run directory (no run_config.json)")
        try:
            return RunConfig.from_json(json.loads(self.config.read_text()))
        except ValueError as exc:  # not JSON, or not a config (pydantic's ValidationError)
            raise UserError(f"{self.config}: unreadable ({str(exc).splitlines()[0]})") from None

    def load_resolved(self) -> Resolved | None:
        """What the run resolved when it started (None before it got that far)."""
        if not self.resolved_file.is_file():
            return None
        return Resolved.model_validate_json(self.resolved_file.read_text())

    def prepare(self, cfg: RunConfig, resume: bool) -> bool:
        """Check the folder against ``cfg``; return True when an earlier run is resumed."""
        if self.exists():
            old = self.load_config()
            if not resume:
                raise UserError(
                    f"{self.path} already holds a run (model {old.model}, data {old.data}); "
                    "pass --resume to continue it or choose another --output"
                )
            diff = [k for k, v in cfg.identity().items() if old.identity().get(k) != v]
            if diff:
                raise UserError(
                    f"--resume: {self.path} holds a different run ({', '.join(diff[:4])} differ); choose another --output"
                )
            return True
        if self.path.exists() and any(p for p in self.path.iterdir() if not p.name.startswith(".")):
            raise UserError(f"--output {self.path} is not empty and holds no run; choose an empty or new folder")
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
        return False

    def write_config(self, cfg: RunConfig) -> None:
        self.write_json(self.config, cfg.to_json())

    def write_resolved(self, resolved: Resolved) -> None:
        self.write_json(self.resolved_file, resolved.model_dump(mode="json"))

    def write_json(self, path: Path, obj: Any) -> None:
        if self.primary:
            atomic_write_json(path, obj)

    def write_text(self, path: Path, text: str) -> None:
        if self.primary:
            atomic_write_text(path, text)

    # metrics.jsonl ---------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics line (a kill leaves at most a torn last line)."""
        if self.primary:
            runfiles.append_metric(self.metrics, row)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged rows; a line cut off by a kill is skipped."""
        rows, _ = runfiles.read_metrics(self.metrics, missing_ok=True)
        return [row for _, row in rows]

    def truncate_metrics(self, step: int) -> None:
        """Drop rows after ``step`` and any torn last line (a resumed run logs them again, exactly once)."""
        if not self.primary:
            return
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def plot(self) -> Path | None:
        """loss.png: training loss per logged step, eval loss where measured."""
        if not self.primary:
            return None
        rows = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if not train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.loss_png.with_name(".loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.loss_png)
        return self.loss_png
