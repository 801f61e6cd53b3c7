"""`lora export RUN_DIR --format peft|merged|gguf|gguf-lora --out DIR|FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import click

FORMATS = ["peft", "merged", "gguf", "gguf-lora"]


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="peft", show_default=True,
              help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                   "merged: a full Hugging Face checkpoint with the adapter folded in; "
                   "gguf: the merged model as one llama.cpp / Ollama file; "
                   "gguf-lora: the adapter alone for llama.cpp's --lora.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output directory (peft, merged) or file (gguf, gguf-lora).")
@click.option("--base", default=None,
              help="Base model folder or Hub id (merged, gguf, gguf-lora; default: the adapter's base_model).")
@click.option("--gguf-type", type=click.Choice(["f16", "q8_0"]), default=None,
              help="--format gguf: tensor type of the weight matrices (default f16; q8_0 is about half the size).")
@click.option("--force", is_flag=True, help="Write into a non-empty output directory / over an existing file.")
def export(run_dir: Path, fmt: str, out: Path, base: str | None, gguf_type: str | None, force: bool) -> None:
    """Export RUN_DIR's adapter (RUN_DIR/adapter/, or an adapter directory) for PEFT, merged, or as GGUF."""
    from flax_lora.adapters.find import find_adapter
    from flax_lora.adapters.merged import export_merged
    from flax_lora.adapters.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
    from flax_lora.errors import UserError

    if gguf_type is not None and fmt != "gguf":
        raise UserError(f"--gguf-type is for --format gguf (the merged model); --format {fmt} has no tensor type to choose")
    _check_out(out, fmt, force)
    adapter, _ = find_adapter(run_dir, kinds=("native",))
    if fmt == "peft":
        export_peft(adapter, out)
        click.echo(f"wrote {out / PEFT_CONFIG} and {out / PEFT_WEIGHTS} (from {adapter})")
    elif fmt == "merged":
        export_merged(adapter, out, base)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        click.echo(f"wrote merged checkpoint to {out}: {files}{_quantized_note(adapter)}")
    else:
        _export_gguf(adapter, out, base, fmt, gguf_type or "f16")


def _check_out(out: Path, fmt: str, force: bool) -> None:
    """A directory format writes into an empty folder, a GGUF format one file; else a UserError."""
    from flax_lora.errors import UserError

    if fmt.startswith("gguf"):
        if out.is_dir():
            raise UserError(f"{out} is a directory; --format {fmt} writes one file (e.g. --out {out / 'model.gguf'})")
        if out.exists() and not force:
            raise UserError(f"{out} exists (use --force to overwrite it)")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty (use --force to write into it)")


def _export_gguf(adapter: Path, out: Path, base: str | None, fmt: str, gguf_type: str) -> None:
    from flax_lora.adapters.gguf import export_gguf, export_gguf_lora

    if fmt == "gguf":
        w = export_gguf(adapter, out, base, gguf_type)
        what = f"merged model, {gguf_type}, {w.arch}"
        use = f"llama-cli -m {out}"
    else:
        w = export_gguf_lora(adapter, out, base)
        what = f"LoRA adapter, f32, {w.arch}"
        use = f"llama-cli -m BASE.gguf --lora {out}"
    click.echo(f"wrote {out} ({_size(w.nbytes)}, {w.tensors} tensors; {what}; base {w.base}){_quantized_note(adapter)}")
    click.echo(f"use: {use}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _quantized_note(adapter: Path) -> str:
    """For a run trained on quantized frozen weights: where the export's weights came from."""
    run_config = (adapter.parent if adapter.name == "adapter" else adapter) / "run_config.json"
    try:
        quantization = json.loads(run_config.read_text()).get("quantization", "none")
    except (OSError, ValueError, AttributeError):
        return ""
    if quantization in (None, "none"):
        return ""
    return (f"; trained on {quantization} frozen weights: the float32 adapter was applied to the base "
            "model's unquantized weights")
