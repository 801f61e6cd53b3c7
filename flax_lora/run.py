"""A run: its fully resolved config and its directory.

``RUN/`` holds ``advice.json`` (the advice used), ``run_config.json`` (every resolved value),
``metrics.jsonl`` (one JSON object per logged step / eval), ``loss.png``, ``eval.json``
(before/after), ``adapter/`` (native adapter), ``checkpoints/`` (orbax) and, for the demo,
``model/`` and ``data/``. A run directory is enough to evaluate, generate from or resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flax_lora.errors import UserError
from flax_lora.io import atomic_write_json, atomic_write_text, inside

# Fields a --resume may change without it being "a different run" (learning_rate: the divergence
# guard's remedy is ``--resume --learning-rate X``).
RESUMABLE = {"max_steps", "epochs", "total_steps", "save_every", "eval_every", "log_every", "learning_rate",
             "on_bad_row", "on_divergence", "shard_frozen", "remat"}
DIVERGENCE = ("stop", "halve-lr")
MAX_LR_HALVINGS = 3  # --on-divergence halve-lr: rollbacks before giving up


@dataclass
class RunConfig:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    input_field: str | None = None
    target_field: str | None = None
    # LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    use_rslora: bool = False
    target_preset: str | None = None
    target_modules: list[str] | str | None = None
    # training
    epochs: int = 3
    max_steps: int | None = None
    total_steps: int = 0  # resolved: max_steps or epochs * steps_per_epoch
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    learning_rate: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    quantization: str = "none"  # none | int8 (frozen linear weights, flax_lora.quant)
    seed: int = 0
    # bookkeeping
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only before and after
    log_every: int = 10
    rouge_examples: int = 32
    max_new_tokens: int | None = None
    keep_checkpoints: int = 3
    adapter: str | None = None  # start from this adapter (native or PEFT dir) instead of a fresh one
    on_bad_row: str = "skip"  # skip | fail (flax_lora.rows)
    on_divergence: str = "stop"  # stop | halve-lr
    shard_frozen: bool = False  # split the frozen weights over the devices (flax_lora.parallel)
    remat: bool = False  # gradient checkpointing: recompute each layer's activations in the backward pass
    demo: bool = False
    resolved: dict[str, Any] = field(default_factory=dict)  # filled by the trainer: targets, format, sizes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (for --resume and the output-folder check)."""
        return {k: v for k, v in self.to_json().items() if k not in RESUMABLE | {"resolved", "output"}}


class RunDir:
    """The run folder. With ``primary=False`` (every process but 0 of a multi-host run) it only
    reads: writes are no-ops, so one process writes each file."""

    def __init__(self, path: str | Path, primary: bool = True):
        self.path = Path(path)
        self.primary = primary

    def __getattr__(self, name):  # rd.metrics -> RUN/metrics.jsonl etc.
        files = {"config": "run_config.json", "advice": "advice.json", "metrics": "metrics.jsonl",
                 "loss_png": "loss.png", "eval": "eval.json", "adapter": "adapter", "checkpoints": "checkpoints",
                 "eval_before": "eval_before.json", "data_report": "data_report.json"}
        if name in files:
            return self.child(files[name])
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
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{self.config}: unreadable ({exc})") from None

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

    def write_json(self, path: Path, obj: Any) -> None:
        if self.primary:
            atomic_write_json(path, obj)

    def write_text(self, path: Path, text: str) -> None:
        if self.primary:
            atomic_write_text(path, text)

    # metrics.jsonl ---------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Append one line with a single ``write`` (O_APPEND): a kill leaves at most a torn last line."""
        if not self.primary:
            return
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged rows; a line cut off by a kill (unparseable, no newline) is skipped."""
        if not self.metrics.is_file():
            return []
        raw = self.metrics.read_bytes()
        lines = raw.split(b"\n")
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if number == len(lines):  # torn tail (a complete line ends with a newline)
                    continue
                raise UserError(f"{self.metrics} line {number}: not valid JSON; fix or delete the line") from None
            if isinstance(row, dict):
                rows.append(row)
        return rows

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
