"""The `mlx_linear` command line: a click group whose subcommands load on first use."""

import importlib
import signal
import sys

import click

from .errors import Interrupted, UserError

# name -> "module:attribute" of a click command; each feature registers one line here.
COMMANDS = {
    "convert": "mlx_linear.convert.cli:convert",
    "lora-train": "mlx_linear.train.cli:lora_train",
    "fuse": "mlx_linear.train.cli:fuse",
    "eval": "mlx_linear.eval.cli:eval_command",
    "chat": "mlx_linear.chat.cli:chat",
    "generate": "mlx_linear.chat.cli:generate",
}


class Group(click.Group):
    """Loads subcommands lazily; user errors become one line and a non-zero exit, Ctrl-C exit 130."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx):
        signal.signal(signal.SIGTERM, terminated)
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            message = str(e) if isinstance(e, Interrupted) else "partial outputs were discarded"
            click.echo(f"\ninterrupted: {message}", err=True)
            sys.exit(130)


def terminated(signum, frame):
    """SIGTERM (kill, a closing session) cleans up as Ctrl-C does: no partial output is left."""
    raise KeyboardInterrupt


def log(message):
    """Progress messages go to stderr, leaving stdout for results."""
    click.echo(message, err=True)


@click.group(cls=Group)
@click.version_option(package_name="mlx-linear")
def cli():
    """Pretrained transformers as constant-memory linear-attention RNNs on MLX."""


def main():
    cli(prog_name="mlx_linear")


if __name__ == "__main__":
    main()
