"""The `lora` click group.

Subcommands live in their own modules and are imported only when invoked, so
`lora advise` never pays for importing jax. Errors a user can cause end in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from advisor.errors import UserError

# command name -> "module:attribute"; modules are imported lazily.
COMMANDS: dict[str, str] = {
    "advise": "cli.advise:advise",
    "recipes": "cli.advise:recipes",
    "train": "cli.train:train",
    "eval": "cli.train:eval_cmd",
    "generate": "cli.train:generate",
    "export": "cli.export:export",
    "diagnose": "cli.diagnose:diagnose",
    "data": "cli.data:data",
}

HELP = {
    "advise": "Recommend a complete LoRA training config for your data and GPU.",
    "recipes": "List the configuration guide's four recipes.",
    "train": "Train a LoRA adapter (from an advice file, or the built-in demo).",
    "eval": "Evaluate a run directory: loss, perplexity, ROUGE.",
    "generate": "Generate text from a run directory or a model (+ adapter).",
    "export": "Export a run's adapter: PEFT, a merged checkpoint, or GGUF for llama.cpp.",
    "diagnose": "Read a run's metrics and apply the guide's 'Signs of ...' rules.",
    "data": "Show how a data file's rows become training tokens (format, drops, lengths, trained spans).",
}


class UserFacingError(click.ClickException):
    """A mistake the user can fix: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: D102 - one clean line, no "Error:" noise twice
        click.echo(f"error: {self.format_message()}", err=True)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not built yet
                return None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every command module (and jax with them).
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except UserError as exc:
            raise UserFacingError(str(exc)) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise UserFacingError(f"{exc.strerror or exc}: {exc.filename}") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora", prog_name="lora")
def cli() -> None:
    """lora: the right LoRA configuration for your data and GPU, trained fast in JAX."""


def main() -> None:
    """Console entry point: every click error becomes one ``error:`` line (exit 2 for usage)."""
    try:
        code = cli.main(prog_name="lora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"error: {message}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
