"""`mlx_linear chat` and `mlx_linear generate`."""

import contextlib
import signal
import sys

import click

from mlx_linear.cli import log
from mlx_linear.errors import Interrupted, UserError
from mlx_linear.progress import Progress

HELP = '''commands:
  /reset        start a new conversation (same system prompt)
  /save FILE    write the conversation state to FILE (the same size at any length)
  /load FILE    go on with a conversation written by /save
  /stats        tokens so far, state size, prefill and decode speed
  /help         this list
  /quit         leave (Ctrl-D too)
A line holding only """ starts and ends a multi-line message. Ctrl-C stops a reply.'''
PROGRESS_FROM = 2048  # prompt tokens: shorter prefills finish before a progress line helps


def model_options(f):
    f = click.option("--keep-quantized", is_flag=True,
                     help="Run a quantized model quantized on the CPU too [dequantized at load there: ~30x faster].")(f)
    f = click.option("--adapter", type=click.Path(), help="LoRA adapter folder (mlx_linear lora-train -o).")(f)
    return click.option(
        "--model", type=click.Path(), help="Converted model folder [the bundled SmolLM2, converted once]."
    )(f)


def generation_options(f):
    options = [
        click.option("--system", help="System prompt."),
        click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1), help="Per reply."),
        click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(0), help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="1 is off."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 is off."),
        click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="0 is off."),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), help="e.g. 1.1 [off]."),
        click.option("--seed", default=0, show_default=True, type=int),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def setup(model, adapter, keep_quantized, seed, temp, top_p, top_k, min_p, repetition_penalty):
    """(model, tokenizer, name, sampling kwargs)."""
    import mlx.core as mx

    from .model import load_chat_model
    from .session import sampling

    loaded = load_chat_model(model, adapter, log=log, dequantize=False if keep_quantized else "auto")
    mx.random.seed(seed)  # after loading: building a model draws random initial weights
    return (*loaded, sampling(temp, top_p, top_k, min_p, repetition_penalty))


def prefill_progress():
    """A prompt_progress_callback drawing a progress line for long prompts."""
    bar = None

    def update(done, total):
        nonlocal bar
        if total < PROGRESS_FROM:
            return
        bar = bar or Progress(total, "tok", "prefill")
        bar.update(done - bar.done)
        if done == total:
            bar.close()

    return update


@contextlib.contextmanager
def ctrl_c_stops():
    """Yield a `stopped()` check; Ctrl-C sets it instead of raising, so replies end cleanly."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def note(message):
    log(f"note: {message}")


def format_stats(session):
    import mlx.core as mx

    last = session.last
    kind = "recurrent states + window: the same at any length"
    if session.grows:
        kind = "a KV cache: it grows with the conversation"
    return (
        f"tokens so far: {session.num_tokens}\n"
        f"state: {session.state_bytes:,} bytes ({kind})\n"
        f"last turn: prefill {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tok/s, "
        f"decode {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s\n"
        f"peak memory: {mx.get_peak_memory() / 1e6:.0f} MB"
    )


def run_command(session, line):
    """Carry out a /command; False means leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name in ("/save", "/load") and not arg:
        raise UserError(f"{name} needs a file name: {name} FILE")
    if name == "/help":
        click.echo(HELP)
    elif name == "/reset":
        session.reset()
        click.echo("(new conversation)")
    elif name == "/save":
        try:
            path = session.save(arg)
        except OSError as e:
            raise UserError(f"cannot write {arg} ({e.strerror}): /save into a writable folder with free space") from None
        click.echo(f"saved {session.num_tokens} tokens of conversation to {path} ({path.stat().st_size:,} bytes)")
    elif name == "/load":
        path = session.load(arg)
        click.echo(f"loaded {path}: {session.num_tokens} tokens of conversation")
    elif name == "/stats":
        click.echo(format_stats(session))
    else:
        raise UserError(f"unknown command {name}: /help lists them")
    return True


def read_message():
    line = input(">>> ")
    if line.strip() != '"""':
        return line
    lines = []
    while (line := input("... ")).strip() != '"""':
        lines.append(line)
    return "\n".join(lines)


def respond(session, text, max_tokens, sampling):
    with ctrl_c_stops() as stopped:
        responses = session.reply(text, max_tokens, stop=stopped, progress=prefill_progress(), notify=note, **sampling)
        for response in responses:
            sys.stdout.write(response.text)
            sys.stdout.flush()
        click.echo(" [stopped]" if stopped() else "")


def chat_loop(session, max_tokens, sampling):
    click.echo(f"chatting with {session.name}: /help lists the commands, Ctrl-D leaves")
    while True:
        try:
            text = read_message()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("^C (Ctrl-D or /quit leaves)")
            continue
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not run_command(session, text):
                    return
            else:
                respond(session, text, max_tokens, sampling)
        except UserError as e:
            click.echo(f"Error: {e}")
        except Exception as e:  # noqa: BLE001  (whatever fails, the conversation is kept)
            click.echo(f"Error: {text.split()[0][:40]} failed ({type(e).__name__}: {e}); the conversation is kept")


@click.command()
@model_options
@generation_options
def chat(model, adapter, system, max_tokens, **options):
    """Chat in the terminal; the conversation lives in the model's constant-size state."""
    from .session import ChatSession

    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

    model, tokenizer, name, sampling = setup(model, adapter, **options)
    chat_loop(ChatSession(model, tokenizer, system, name), max_tokens, sampling)


@click.command()
@model_options
@click.option("--prompt", required=True, help="The prompt; - reads it from stdin.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@generation_options
def generate(model, adapter, prompt, raw, system, max_tokens, **options):
    """Generate one reply, streamed to stdout; speed and memory go to stderr."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    from .session import PREFILL_STEP, ChatSession, cached_tokens

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty: pass --prompt TEXT, or pipe text into --prompt -")
    model, tokenizer, name, sampling = setup(model, adapter, **options)
    progress = prefill_progress()
    if raw or not getattr(tokenizer, "chat_template", None):
        cache = make_prompt_cache(model)
        responses = stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens,
            prompt_cache=cache,
            prefill_step_size=PREFILL_STEP,
            prompt_progress_callback=progress,
            **sampling,
        )
    else:
        session = ChatSession(model, tokenizer, system, name)
        cache = session.cache
        responses = session.reply(prompt, max_tokens, progress=progress, **sampling)
    last = None
    try:
        for last in responses:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        raise Interrupted(f"stopped after {last.generation_tokens if last else 0} tokens") from None
    click.echo()
    log(
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"state: {sum(c.nbytes for c in cache):,} bytes after {cached_tokens(cache)} tokens | "
        f"peak memory: {last.peak_memory * 1e3:.0f} MB"
    )
