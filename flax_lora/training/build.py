"""A run config made concrete: the model, tokenizer, tokenized data, targets and adapter it names.

Used by ``lora train`` before its loop and by ``lora eval`` / ``lora generate`` on a finished run
(:func:`load_run`). Data errors come first: they are cheap to find.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from advisor.formats import Format
from advisor.rows import RowReport
from flax_lora.training.config import RunConfig, local_path
from flax_lora.training.rundir import RunDir


class Sources(NamedTuple):
    """Where the model and the data come from (the demo's live in the run folder)."""

    model: str
    data: str
    eval_data: str | None


@dataclass(frozen=True)
class Setup:
    """Everything built from a RunConfig: model, tokenizer, data, adapter targets."""

    cfg: RunConfig
    sources: Sources
    model: Any  # flax_lora.models.CausalLM
    tokenizer: Any
    data_format: Format
    train_examples: list
    eval_examples: list
    linears: dict
    targets: dict
    lora_cfg: Any  # flax_lora.lora.LoraConfig
    reports: dict[str, RowReport]  # "train" / "eval"
    init_lora: Any = None  # from --adapter
    template_origin: str | None = None  # where a chat's template came from
    dp: Any = None  # flax_lora.training.parallel.DataParallel with several devices (the frozen weights' mesh)
    notes: tuple[str, ...] = ()  # how the frozen weights were placed, to say once
    stop_ids: tuple[int, ...] = ()  # a chat template's one-token end-of-turn: evaluation's answers end there


def sources(cfg: RunConfig, rd: RunDir) -> Sources:
    """The run's model and data as it reads and records them (``resolved.json``): a dataset's split
    made explicit and its eval split chosen (:func:`flax_lora.data.load.resolve`; eval_data None:
    hold out a share of the training rows). The demo's files are written into the run folder first
    (by process 0)."""
    from flax_lora.data.load import resolve

    if not cfg.demo:
        return Sources(cfg.model, *resolve(cfg.data, cfg.eval_data, split=cfg.split, eval_split=cfg.eval_split))
    from flax_lora import demo
    from flax_lora.training.parallel import barrier

    if rd.primary:
        demo.materialize(rd.path, cfg.seed)
    barrier("lora-demo-files")  # the other processes read what process 0 wrote (one shared folder)
    model_dir, train_path, eval_path = demo.materialize(rd.path, cfg.seed)
    data, eval_data = resolve(str(train_path.resolve()), cfg.eval_data or str(eval_path.resolve()),
                              split=cfg.split, eval_split=cfg.eval_split)
    return Sources(str(model_dir.resolve()), data, eval_data)


def _rows(cfg: RunConfig, src: Sources):
    """(train rows, eval rows, format, reports): eval rows from the eval source (--eval-data, or the
    dataset's eval split :func:`sources` chose), else a held-out share of the training rows. The
    sources name their splits, so both sides go through the same reader and row checks."""
    from flax_lora.data.load import load_checked, split_eval

    train_rows, fmt, train_report = load_checked(src.data, input_field=cfg.input_field, target_field=cfg.target_field,
                                                 name=cfg.data_format, policy=cfg.on_bad_row)
    reports = {"train": train_report}
    if src.eval_data:
        eval_rows, _, reports["eval"] = load_checked(src.eval_data, fmt=fmt, policy=cfg.on_bad_row)
    else:
        train_rows, eval_rows = split_eval(train_rows, seed=cfg.seed)
    return train_rows, eval_rows, fmt, reports


def _examples(cfg: RunConfig, rows, fmt: Format, tokenizer, template: str | None, report: RowReport) -> list:
    """Rows as the examples the loop trains on (:mod:`advisor.examples`, the advisor's own path):
    whole sequences cut to max_length, or a text document's windows; cut rows and windows counted."""
    from advisor.examples import encode_rows, fit

    out = []
    for ex in encode_rows(rows, fmt, tokenizer, template, report, cfg.on_bad_row):
        parts = fit(ex, cfg.max_length, fmt.kind)
        out += parts
        if len(parts) > 1:
            report.windows += len(parts)
            report.split.append(ex.row)
        elif parts[0].truncated:
            report.truncated.append(ex.row)
    report.truncated.sort()
    return out


def _model(cfg: RunConfig, src: Sources):
    """(model, tokenizer, linears, plan): frozen weights in the run's precision and format (int8 /
    nf4 when asked), placed on the devices as :class:`~flax_lora.training.parallel.FrozenPlan`
    decides: the port reads each leaf straight into its shards and quantizes it there; a loader
    that reads whole (transformers' Flax classes) is quantized and placed afterwards."""
    import jax.numpy as jnp

    from flax_lora.models import load_model, load_tokenizer
    from flax_lora.training.parallel import FrozenPlan

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[cfg.precision]
    tokenizer = load_tokenizer(src.model)
    plan = FrozenPlan(shard=cfg.shard_frozen, quantization=cfg.quantization)
    model = load_model(src.model, dtype=dtype, scan=True, remat=cfg.remat, placement=plan)  # scan where it can
    linears = model.linears()  # found on the float shapes (an nf4 kernel has another shape)
    if not plan.decided:
        from flax_lora.models.stacking import in_layout
        from flax_lora.quant import quantize_as

        conv1d = in_layout([p for p, i in linears.items() if i.kind == "conv1d"], model.layers_stacked)
        model.params = quantize_as(model.params, cfg.quantization, conv1d)
        plan.decide(model.params, quantized=True)
        model.params = plan.place(model.params)
    return model, tokenizer, linears, plan


def _targets(cfg: RunConfig, model, linears):
    """(targets, LoraConfig, initial adapter or None): from --adapter, else the config's targets."""
    from flax_lora.lora import LoraConfig, lora_paths
    from flax_lora.targets import resolve_targets

    if not cfg.adapter:
        targets = resolve_targets(linears, model.model_type, preset=cfg.target_preset, modules=cfg.target_modules)
        return targets, LoraConfig(cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora), None
    from flax_lora.adapters.find import load_any_adapter

    lora, acfg = load_any_adapter(cfg.adapter, linears, model.model_type)
    targets = {p: linears[p] for p in lora_paths(lora)}
    return targets, LoraConfig(acfg.r, acfg.alpha, cfg.dropout, acfg.use_rslora), model.stack_lora(lora)


def build(cfg: RunConfig, rd: RunDir, *, with_train: bool = True) -> Setup:
    """Load and check everything ``cfg`` names (``with_train=False``: the eval set only)."""
    src = sources(cfg, rd)
    train_rows, eval_rows, fmt, reports = _rows(cfg, src)
    model, tokenizer, linears, plan = _model(cfg, src)
    template, template_origin, stop_ids = None, None, ()
    if fmt.kind == "chat":
        from advisor.templates import choose
        from flax_lora.evaluation.generate import end_of_turn_ids

        template, template_origin = choose(tokenizer.chat_template, cfg.chat_template)
        stop_ids = end_of_turn_ids(tokenizer, template)[0]
    train_ex = _examples(cfg, train_rows, fmt, tokenizer, template, reports["train"]) if with_train else []
    eval_ex = _examples(cfg, eval_rows, fmt, tokenizer, template, reports.get("eval", reports["train"]))
    targets, lora_cfg, init = _targets(cfg, model, linears)
    return Setup(cfg, src, model, tokenizer, fmt, train_ex, eval_ex, linears, targets, lora_cfg, reports, init,
                 template_origin, plan.dp, tuple(plan.notes(model.params)), stop_ids)


def load_run(run_dir: str | Path, *, data: str | None = None):
    """(Setup, adapter) of a finished run, for ``lora eval`` and ``lora generate``; ``data``
    replaces its eval set."""
    from flax_lora.adapters.native import load_adapter

    rd = RunDir(run_dir)
    cfg = rd.load_config()
    if data:
        cfg = cfg.replace(eval_data=local_path(data), eval_split=None)
    s = build(cfg, rd, with_train=False)
    lora, _, _, _ = load_adapter(rd.adapter)
    return s, s.model.stack_lora(lora)
