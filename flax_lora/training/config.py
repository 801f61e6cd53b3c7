"""The run config: every value a training run uses, built once from the advice and not mutated.

Precedence: the advice (``lora advise``, or the same :func:`advisor.advise` asked by
:func:`advice_for` when no advice file is given) < the demo's settings < explicit flags. The
advisor is the one source of hyperparameter defaults: the fields that come from the advice have
no default here. Only the trainer's own settings (intervals, seed, policies) default here.

What a run resolves while it starts (devices, steps per epoch, targets found in the model) is
not config: it is recorded in ``resolved.json`` (:class:`Resolved`).
"""

from __future__ import annotations

from pathlib import Path
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from advisor.errors import UnknownModel
from advisor.schema import (Advice, DataFormat, DivergencePolicy, Precision, Quantization, RowPolicy, Schedule,
                            TargetPreset)
from flax_lora.errors import UserError

Reporter = Literal["tensorboard", "wandb"]

# Fields a --resume may change without it being "a different run" (learning_rate: the divergence
# guard's remedy is ``--resume --learning-rate X``).
RESUMABLE = frozenset({"max_steps", "epochs", "save_every", "eval_every", "log_every", "rouge_examples", "learning_rate",
                       "on_bad_row", "on_divergence", "shard_frozen", "remat", "report_to"})
MAX_LR_HALVINGS = 3  # --on-divergence halve-lr: rollbacks before giving up


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Frozen):
    """Everything that shapes a run. Fields without a default come from the advice."""

    model: str
    data: str
    output: str
    # LoRA (advice.lora)
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_preset: TargetPreset | None
    target_modules: tuple[str, ...] | str | None  # names, or one regex string
    # training (advice.training)
    epochs: int
    batch_size: int
    grad_accum: int
    max_length: int
    learning_rate: float
    lr_schedule: Schedule
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None
    precision: Precision
    quantization: Quantization
    remat: bool
    packing: bool  # several examples per row, attention confined to each (training.advice: when data is short)
    shard_frozen: bool  # split the frozen weights over the devices (training.parallel; advised for several GPUs)
    # the trainer's own settings
    eval_data: str | None = None
    split: str | None = None  # a Hub dataset's split to train on (None: "train")
    eval_split: str | None = None  # a Hub dataset's eval split (None: its validation split, else held out)
    data_format: DataFormat | None = None  # --format; None: detected from the columns
    input_field: str | None = None
    target_field: str | None = None
    chat_template: str | None = None  # a template file or a built-in name; None: the tokenizer's
    max_steps: int | None = None
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only before and after
    log_every: int = 10
    rouge_examples: int = 32
    max_new_tokens: int | None = None
    keep_checkpoints: int = 3
    adapter: str | None = None  # start from this adapter (native or PEFT dir) instead of a fresh one
    on_bad_row: RowPolicy = "skip"
    on_divergence: DivergencePolicy = "stop"
    report_to: tuple[Reporter, ...] = ()  # metric writers besides metrics.jsonl (training.report)
    demo: bool = False

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "RunConfig":
        return cls.model_validate(obj)

    def replace(self, **changes) -> "RunConfig":
        """A new config with ``changes`` (validated); this one is left as it is."""
        return make(RunConfig, {**self.model_dump(), **changes})

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (for --resume and the output-folder check)."""
        return {k: v for k, v in self.to_json().items() if k not in RESUMABLE | {"output"}}


class Resolved(_Frozen):
    """What a run found out while it started: written once to ``resolved.json``."""

    model_path: str
    data_path: str
    eval_data_path: str | None
    model_type: str
    scan_layers: bool
    data_format: str
    train_examples: int
    eval_examples: int
    targets: tuple[str, ...]
    scaling: float
    devices: int
    processes: int
    device_kind: str
    frozen_sharded: bool
    frozen_bytes_per_device: int | None = None  # the most frozen-weight bytes any one device holds
    effective_batch_size: int
    steps_per_epoch: int
    total_steps: int


def make(cls, values: dict[str, Any]):
    """``cls(**values)``, a bad value as one UserError line instead of pydantic's report."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def advice_values(advice: Advice) -> dict[str, Any]:
    """The advisor's choices under RunConfig's field names."""
    lo, tr, req = advice.lora, advice.training, advice.request
    reading = dict(data_format=req.data_format, input_field=req.input_field, target_field=req.target_field,
                   chat_template=req.chat_template)  # how the advisor read the data: the trainer reads it so
    return dict(**{k: v for k, v in reading.items() if v is not None}, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, use_rslora=lo.use_rslora,
                target_preset=lo.target_preset, target_modules=tuple(lo.target_modules),
                epochs=tr.epochs, batch_size=tr.per_device_batch_size, grad_accum=tr.gradient_accumulation_steps,
                max_length=tr.max_length, learning_rate=tr.learning_rate, lr_schedule=tr.lr_schedule,
                warmup_steps=tr.warmup_steps, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
                precision=tr.precision, quantization=tr.quantization, remat=tr.gradient_checkpointing,
                packing=tr.packing, shard_frozen=tr.shard_frozen)


def local_path(source: str) -> str:
    """An existing local file or folder as an absolute path (export and eval read it from anywhere); else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot instructions XLA:CPU's bf16 dots use


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open(path) as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_precision(flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, why) for training on this CPU: bf16 where the CPU has bf16 dot instructions,
    where it is the faster one (figures in benchmarks/RESULTS.md), else fp32, which is faster
    than bf16 emulated with float32 arithmetic. ``LORA_CPU_PRECISION=fp32|bf16`` pins the choice
    (the test suite pins fp32, so its figures do not depend on the machine's CPU)."""
    pinned = os.environ.get("LORA_CPU_PRECISION")
    if pinned in ("fp32", "bf16"):
        return pinned, f"precision {pinned}: set by LORA_CPU_PRECISION"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return "bf16", f"precision bf16: this CPU has {'/'.join(f.upper() for f in have)}, where bf16 steps are faster than fp32 (--precision fp32 to change)"
    return "fp32", "precision fp32: this CPU has no bf16 dot instructions (AVX512-BF16/AMX-BF16), where fp32 is faster"


def precision_note(cfg, overrides: dict[str, Any]) -> str | None:
    """The line saying which precision a CPU run picked and why; None when it was given or on an accelerator."""
    if cfg.demo or overrides.get("precision") or _on_accelerator():
        return None
    return cpu_precision()[1]


def _is_demo(model: str | None, data: str | None) -> bool:
    if (model is None) != (data is None):
        raise UserError("give both --model and --data, or neither (the built-in demo)")
    return model is None


def config_from_advice(advice: Advice, *, model: str | None, data: str | None, output: str,
                       overrides: dict[str, Any]) -> RunConfig:
    """Advice < demo settings < explicit flags (``overrides``; None values are not given)."""
    from flax_lora import demo

    is_demo = _is_demo(model, data)
    values = advice_values(advice)
    if is_demo:
        values.update(demo.SETTINGS)
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("eval_data", "adapter", "chat_template"):
        if key in given:
            given[key] = local_path(given[key])
    if given.get("adapter"):  # continuing an adapter fixes its rank and scaling
        from flax_lora.adapters.find import adapter_settings

        values.update(adapter_settings(given["adapter"]))
    values.update(given)
    if is_demo:  # fp32 everywhere: the README's demo figures hold on every machine
        values["precision"] = given.get("precision") or "fp32"
    elif not _on_accelerator():
        values["precision"] = given.get("precision") or cpu_precision()[0]
    return make(RunConfig, dict(values, model=local_path(model) if model else "demo",
                                data=local_path(data) if data else "demo", output=str(output), demo=is_demo))


def config_for_resume(stored: RunConfig, output: str, overrides: dict[str, Any]) -> RunConfig:
    """The config ``stored`` in the run folder ``output`` with the flags a --resume may change applied.

    Any other flag must equal the stored value (else: a different run).
    """
    cfg = stored
    changes = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("eval_data", "adapter"):
            value = local_path(value)
        if key in RESUMABLE:
            changes[key] = value
        elif getattr(cfg, key) != value:
            may = ", ".join(sorted(RESUMABLE))
            raise UserError(f"--resume: {output} holds a different run ({key} was {getattr(cfg, key)!r}, now "
                            f"{value!r}); a resume may change only {may}. Choose another --output")
    return cfg.replace(output=str(output), **changes)


def device_memory_gb() -> float:
    """The first device's memory in GiB (16 where the backend does not say, e.g. a CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return round(stats.get("bytes_limit", 16 * 2**30) / 2**30, 1)


def advice_for(model: str | None, data: str | None, split: str | None = None, **reading) -> tuple[Advice, str | None]:
    """The advisor's advice for a run started without an advice file, and a note when it had to
    assume something (the same ``advise()`` users call; no second table of defaults).

    The demo asks with its own settings; a local data file is read by the advisor (the trainer's
    reader: same rows); a Hub dataset is counted by the trainer's loader. A model the advisor
    cannot find offline gets the advice for the reference shape, with targets resolved by preset
    on the real model. Any other advisor error is the user's to fix: it is raised. ``split``: the
    dataset split trained on (``--split``); ``reading``: data_format, input_field, target_field,
    chat_template, as the flags give them.
    """
    from advisor import advise
    from flax_lora import demo
    from flax_lora.data.load import is_local, read_rows

    if _is_demo(model, data):
        return advise(demo.request()), None
    request: dict[str, Any] = dict(vram_gb=device_memory_gb(), model=model,
                                   **{k: v for k, v in reading.items() if v is not None})
    notes = []
    if data is not None and is_local(data):
        request["data"] = data
    else:  # a dataset: count the split that will be trained on
        records, _, report = read_rows(data, split)
        request["samples"] = max(1, len(records))
        notes.append(f"{report.source} is a dataset: the advice counts its rows but does not measure their lengths")
    try:
        advice = advise(**request)
    except UnknownModel as exc:
        advice = advise(**{**request, "model": None})
        notes.append(f"the advisor has no offline shape for {model} ({exc}); the advice assumes "
                     f"{advice.model.name}, and its target preset {advice.lora.target_preset!r} is resolved "
                     "on the real model")
    return advice, "; ".join(notes) or None
