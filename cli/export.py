"""`lora export RUN_DIR --format peft|merged --out DIR`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), default="peft", show_default=True,
              help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                   "merged: a full Hugging Face checkpoint with the adapter folded in.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--base", default=None, help="Base model folder or Hub id (merged; default: the adapter's base_model).")
@click.option("--force", is_flag=True, help="Write into a non-empty output directory.")
def export(run_dir: Path, fmt: str, out: Path, base: str | None, force: bool) -> None:
    """Export RUN_DIR's adapter (RUN_DIR/adapter/, or an adapter directory) for PEFT, or merged."""
    from flax_lora.adapters.find import find_adapter
    from flax_lora.adapters.merged import export_merged
    from flax_lora.adapters.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
    from flax_lora.errors import UserError

    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty (use --force to write into it)")
    adapter, _ = find_adapter(run_dir, kinds=("native",))
    if fmt == "peft":
        export_peft(adapter, out)
        click.echo(f"wrote {out / PEFT_CONFIG} and {out / PEFT_WEIGHTS} (from {adapter})")
    else:
        export_merged(adapter, out, base)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        click.echo(f"wrote merged checkpoint to {out}: {files}")
