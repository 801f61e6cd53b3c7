"""`lora diagnose RUN_DIR`: the guide's "Signs of ..." rules applied to a run (no jax import)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.advise import _OneLineErrors


@click.command(cls=_OneLineErrors)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a revised advice here (atomically) for lora train --from-advice.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def diagnose(run_dir: Path, output: Path | None, as_json: bool) -> None:
    """Read RUN_DIR's metrics.jsonl and eval.json; report underfitting, overfitting or a bad learning rate."""
    from advisor import diagnose as d
    from advisor.errors import UserError

    run = d.load_run(run_dir)
    report = d.diagnose(run)
    if output is not None:
        if output.resolve() == (run_dir / "advice.json").resolve():
            raise UserError(f"-o {output} would overwrite the advice this run used; choose another file")
        revised = d.revise_advice(run, report)
        from advisor.io import atomic_write_text

        atomic_write_text(output, revised.to_json() + "\n")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    click.echo(d.render(report))
    if output is not None:
        what = "revised advice" if report.changes else "advice (unchanged: nothing to revise)"
        click.echo(f"\nwrote {what} to {output}; train it with: lora train --from-advice {output}")
