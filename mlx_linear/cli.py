"""The `mlx_linear` command line: a click group whose subcommands load on first use."""

import importlib
import signal
import sys

import click

from .errors import Interrupted, UserError

# name -> ("module:attribute" of a click command, the first line of its help); each feature
# registers one line here. `--help` lists the commands from here: importing them (MLX, mlx-lm,
# transformers) would take seconds.
COMMANDS = {
    "convert": ("mlx_linear.convert.cli:convert",
                "Convert a checkpoint; with no --hf/--gguf, the bundled SmolLM2-135M-Instruct."),
    "lora-train": ("mlx_linear.train.cli:lora_train", "Uptrain a converted model with LoRA (Liger's recipe by default)."),
    "fuse": ("mlx_linear.train.cli:fuse", "Merge an adapter into a standalone converted model folder."),
    "eval": ("mlx_linear.eval.cli:eval_command",
             "Zero-shot tasks and perplexity, scored like lm-evaluation-harness; with --baseline, side by side."),
    "chat": ("mlx_linear.chat.cli:chat", "Chat in the terminal; the conversation lives in the model's constant-size state."),
    "generate": ("mlx_linear.chat.cli:generate", "Generate one reply, streamed to stdout; speed and memory go to stderr."),
    "serve": ("mlx_linear.chat.serve:serve", "Serve the chat's model over HTTP with OpenAI's API (mlx_lm.server), requests batched."),
}


NO_BACKEND = ("MLX has no backend installed here: pip install 'mlx-linear[cpu]' (any Linux machine) "
              "or 'mlx-linear[cuda]' (an NVIDIA GPU), one of the two")


class Group(click.Group):
    """Loads subcommands lazily; user errors become one line and a non-zero exit, Ctrl-C exit 130."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx, formatter):
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        summaries = {name: click.Command(name, help=COMMANDS[name][1]) for name in self.list_commands(ctx)}
        rows = [(name, stand_in.get_short_help_str(limit)) for name, stand_in in summaries.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        signal.signal(signal.SIGTERM, terminated)
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            if e.name != "mlx.core":
                raise
            raise click.ClickException(NO_BACKEND) from None
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
