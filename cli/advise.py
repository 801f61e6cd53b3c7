"""`lora advise` and `lora recipes`: the advisor on the command line.

Imports only click and the advisor (pydantic), never jax: this is the fast path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import get_args

import click

from advisor import schema
from advisor.errors import AdviceError
from cli.main import UserFacingError


class _OneLineErrors(click.Command):
    """Bad flag values end in one stderr line (exit 2), not click's usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise UserFacingError(exc.format_message()) from None


class _Vram(click.ParamType):
    name = "GB|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            gb = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of GB or 'auto'", param, ctx)
        if not gb > 0:
            self.fail(f"{value!r} must be more than 0 GB", param, ctx)
        return gb


def gpu_memory_gb() -> float:
    """The smallest GPU's total memory in GiB, from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise AdviceError("--vram auto: no nvidia-smi found (no NVIDIA GPU here); pass a number of GB, e.g. --vram 12")
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return min(float(line) for line in out.split()) / 1024  # MiB -> GiB
    except (subprocess.SubprocessError, OSError, ValueError):
        raise AdviceError("--vram auto: nvidia-smi did not report GPU memory; pass a number of GB, e.g. --vram 12") from None


def _choice(literal) -> click.Choice:
    return click.Choice(get_args(literal), case_sensitive=False)


def _targets(value: str | None):
    if value is None:
        return None
    if value in get_args(schema.TargetPreset):
        return value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise AdviceError("--targets needs a preset or comma-separated module names")
    return names


@click.command(cls=_OneLineErrors)
@click.option("--samples", type=click.IntRange(min=1), help="Number of training samples.")
@click.option("--vram", "vram", type=_Vram(), required=True, help="GPU memory in GB, or 'auto' (nvidia-smi).")
@click.option("--task", type=_choice(schema.Task), help="What the model learns (sets the rank).")
@click.option("--model", help="Hugging Face id or local folder with config.json.")
@click.option("--model-params", help="Size class when the model is unknown, e.g. 1.3B or 350M.")
@click.option("--max-length", type=click.IntRange(min=1), help="Tokens per sample.")
@click.option("--text-length", type=_choice(schema.TextLength), help="Text length class instead of --max-length.")
@click.option("--noisy", is_flag=True, help="The data is noisy (heavier dropout).")
@click.option("--style", type=_choice(schema.Style), help="alpha = r, 2r or 4r.")
@click.option("--recipe", type=_choice(schema.RecipeName), help="Start from one of the guide's recipes.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--data", help="JSONL/JSON/CSV/Parquet file: counts samples, measures lengths.")
@click.option("--format", "data_format", type=_choice(schema.DataFormat), help="How to read --data (default: detected).")
@click.option("--input-field", help="--data: the column holding the prompt.")
@click.option("--target-field", help="--data: the column holding the target (a chat's turns, a document).")
@click.option("--chat-template", help="--data with chats: a Jinja template file or 'chatml' (default: the model's).")
@click.option("--r", "r", type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True))
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True))
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1), help="Per-device batch size.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Gradient accumulation steps.")
@click.option("--learning-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--lr-schedule", type=_choice(schema.Schedule))
@click.option("--warmup-steps", type=click.IntRange(min=0))
@click.option("--targets", help="Preset (attention-qv, attention, attention-mlp) or module names a,b,c.")
@click.option("--quantization", type=_choice(schema.Quantization))
@click.option("--precision", type=_choice(schema.Precision))
@click.option("--remat/--no-remat", "gradient_checkpointing", default=None,
              help="Gradient checkpointing on/off (default: on only when batch 1 does not fit without it).")
@click.option("--shard-frozen/--no-shard-frozen", "shard_frozen", default=None,
              help="Split the frozen weights over the --gpus (default: when a full copy does not fit one GPU).")
@click.option("--packing/--no-packing", default=None,
              help="Several examples per row (default: on when the data is short for max_length and the model can).")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the advice JSON here (atomically).")
def advise(vram, task, targets, grad_accum, as_json, output, **fields) -> None:
    """Recommend a complete LoRA training config, with the reason for every value."""
    from advisor import advise as run_advisor

    request = {k: v for k, v in fields.items() if v is not None}
    request["vram_gb"] = gpu_memory_gb() if vram == "auto" else vram
    if task:
        request["task"] = task
    if grad_accum:
        request["gradient_accumulation_steps"] = grad_accum
    if targets is not None:
        request["target_modules"] = _targets(targets)
    advice = run_advisor(**request)
    if output:
        from advisor.io import atomic_write_text

        atomic_write_text(output, advice.to_json() + "\n")
    if as_json:
        click.echo(advice.to_json())
    else:
        click.echo(render(advice))
        if output:
            click.echo(f"\nwrote {output}")


BAR = 30


def render(advice: schema.Advice) -> str:
    """The advice as a readable table: value and reason per field, memory bar, warnings."""
    req, m, t = advice.request, advice.memory, advice.training
    samples = req.samples if req.samples is not None else advice.data.samples
    lines = [f"lora advise: {samples:,} samples, {req.vram_gb:g} GB GPU x {t.gpus}, task {req.task}"
             + (f", recipe {req.recipe}" if req.recipe else ""), ""]
    values = {**advice.lora.model_dump(), **t.model_dump()}
    width = max(len(r.field.split(".")[-1]) for r in advice.reasons)
    vwidth = max(len(r.value) for r in advice.reasons if r.field != "model")
    section = None
    for reason in advice.reasons:
        head, _, name = reason.field.rpartition(".")
        if head != section:
            section = head
            lines.append({"lora": "LoRA", "training": "Training"}.get(head, "Input"))
        if reason.field == "model":  # the reason names the model
            lines.append(f"  {name:<{width}}  {reason.why}")
            continue
        value = reason.value if name not in values else _show(values[name])
        lines.append(f"  {name:<{width}}  {value:<{vwidth}}  {reason.why}")
    share = advice.trainable_params / advice.model.params
    lines += ["", f"trainable params  {advice.trainable_params:,} ({share:.3%} of {advice.model.params / 1e9:.2f}B)"]
    used = min(BAR, round(BAR * m.total_gb / m.vram_gb))
    verdict = f"fits, {m.headroom_gb:.2f} GB headroom" if m.fits else f"DOES NOT FIT, {-m.headroom_gb:.2f} GB over"
    lines += ["", f"memory  [{'#' * used}{'.' * (BAR - used)}]  {m.total_gb:.2f} / {m.vram_gb:g} GB per GPU: {verdict}"]
    for name, gb in m.breakdown_gb.items():
        lines.append(f"  {name.replace('_', ' '):<18} {gb:7.2f} GB")
    lines.append(f"  ({m.assumptions[-1]})")
    if advice.data is not None:
        d = advice.data
        unit = "tokens" if d.tokenizer else f"tokens, estimated at {d.chars_per_token:g} chars/token"
        cut = (f"split into {d.windows:,} windows of {t.max_length}" if d.windows is not None
               else f"{d.truncated_at_max_length} truncated at {t.max_length}")
        lines += ["", f"data  {d.path}: {d.samples:,} samples ({d.format}); length p50 {d.p50}, p95 {d.p95}, "
                      f"max {d.max} ({unit}); {cut}"]
    if advice.warnings:
        lines += ["", "warnings"] + [f"  - {w}" for w in advice.warnings]
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@click.command(cls=_OneLineErrors)
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def recipes(as_json: bool) -> None:
    """List the configuration guide's four recipes."""
    from advisor.tables import RECIPES

    if as_json:
        click.echo(json.dumps({k: r._asdict() for k, r in RECIPES.items()}, indent=2))
        return
    cols = ("name", "samples", "max_length", "r", "alpha", "dropout", "epochs", "batch_size", "learning_rate")
    rows = [[str(getattr(r, c)) if not isinstance(getattr(r, c), float) else f"{getattr(r, c):g}" for c in cols]
            for r in RECIPES.values()]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  best for")
    for recipe, row in zip(RECIPES.values(), rows):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)) + f"  {recipe.best_for}")
    click.echo("\nUse one with: lora advise --recipe NAME --samples N --vram GB (flags override it)")
