"""`mlx_linear chat` and `generate`: turns, state files, constant memory, a real terminal."""

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import pexpect
import pytest
from click.testing import CliRunner
from mlx_lm import generate as mlx_lm_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import mlx_linear
from mlx_linear.adapters import apply_lora, lora_config, save_adapter
import mlx_linear.chat.state as chat_state
from mlx_linear.chat.model import NO_ADAPTER_NOTE, bundled_adapter
from mlx_linear.chat.session import PREFILL_STEP, ChatSession, sampling
from mlx_linear.cli import cli
from mlx_linear.convert import convert
from mlx_linear.errors import UserError

from conftest import TINY

WINDOW = 8
# Hand-computed state of the tiny model: per layer a (KV heads, d, d) float32 state and a
# window of keys and values.
KV_HEADS, HEAD_DIM = TINY["num_key_value_heads"], TINY["head_dim"]
STATE_BYTES = TINY["num_hidden_layers"] * (KV_HEADS * HEAD_DIM * HEAD_DIM * 4 + 2 * WINDOW * KV_HEADS * HEAD_DIM * 4)


@pytest.fixture(scope="module")
def tiny(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    source = str(hf_checkpoints["llama"])
    return {
        "liger": convert(root / "liger", hf_source=source, window=WINDOW, log=lambda m: None),
        "none": convert(root / "none", hf_source=source, method="none", log=lambda m: None),
        "other": convert(root / "other", hf_source=source, window=WINDOW + 1, log=lambda m: None),
        **{method: convert(root / method, hf_source=source, window=WINDOW, method=method, log=lambda m: None)
           for method in ("liger-hgrn2", "liger-gsa")},
    }


@pytest.fixture(scope="module")
def loaded(tiny):
    return mlx_linear.load(tiny["liger"])


def ends_after(n, token):
    """A logits processor forcing `token` as the n-th generated token."""

    def force(tokens, logits):
        force.calls += 1
        if force.calls == n:
            return mx.where(mx.arange(logits.shape[-1]) == token, 1e9, -1e9)[None]
        return logits

    force.calls = 0
    return force


def take(responses, n=None):
    """Consume a reply; with `n`, the consumer stops after n responses (like Ctrl-C)."""
    out = []
    for r in responses:
        out.append(r)
        if n is not None and len(out) == n:
            break
    responses.close()
    return out


def next_logits_agree_with_a_full_forward(model, session):
    probe = [7]
    cached = model(mx.array([probe]), cache=session.cache)[0, -1]
    full = model(mx.array([session.tokens + probe]))[0, -1]
    return mx.allclose(cached, full, atol=1e-4).item()


# Turns


@pytest.mark.parametrize("ending", ["eos", "length", "stopped"])
def test_each_turn_feeds_only_its_new_tokens(loaded, ending):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.")
    eos = tokenizer.eos_token_id
    previous_ended_with_eos = None
    for turn, text in enumerate(["hello there", "the thin cat", "in the house"]):
        before = len(session.tokens)
        options = {"max_tokens": 9}
        if ending == "eos":
            options["logits_processors"] = [ends_after(5, eos)]
        responses = session.reply(text, **options)
        replies = take(responses, 4 if ending == "stopped" else None)
        fed = session.tokens[before:]
        prompt = fed[: session.last.prompt_tokens]
        if turn == 0:
            expected = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        else:
            # The template's text between the previous reply and this one, by hand.
            closing = "\n" if previous_ended_with_eos else "<|im_end|>\n"
            expected = f"{closing}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        assert tokenizer.decode(prompt) == expected
        assert fed[len(prompt) :] == [r.token for r in replies]
        assert len(replies) == {"eos": 5, "length": 9, "stopped": 4}[ending]
        previous_ended_with_eos = fed[-1] == eos
        assert previous_ended_with_eos == (ending == "eos")
        assert session.num_tokens == len(session.tokens)
    assert next_logits_agree_with_a_full_forward(model, session)


def test_ctrl_c_during_prefill_keeps_a_consistent_conversation(loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    long_text = "the thin cat sat in the house " * 60
    assert len(session.encode(long_text)) > 2 * PREFILL_STEP
    assert take(session.reply(long_text, stop=lambda: session.num_tokens > 0)) == []
    assert session.num_tokens == PREFILL_STEP  # one whole prefill step went in
    with pytest.raises(UserError, match="send another message"):
        session.save(tmp_path / "cut")
    take(session.reply("and now?", max_tokens=3))
    assert session.decode(session.tokens).startswith(f"<|im_start|>user\n{long_text}<|im_end|>\n<|im_start|>assistant\n<|im_end|>")
    assert next_logits_agree_with_a_full_forward(model, session)


def test_template_mismatch_re_reads_the_whole_conversation(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    take(session.reply("hello", max_tokens=4))
    session.messages[-1]["content"] = "an edited reply"  # now the cache no longer matches
    notices = []
    take(session.reply("next", max_tokens=4, notify=notices.append))
    assert len(notices) == 1 and "re-reading the whole conversation" in notices[0]
    assert session.decode(session.tokens).startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nan edited reply")
    assert next_logits_agree_with_a_full_forward(model, session)


# State files and constant memory


@pytest.mark.parametrize("method,ending", [("liger", "eos"), ("liger", "length"), ("liger-hgrn2", "eos"), ("liger-gsa", "length")])
def test_saved_state_has_a_constant_size_and_continues_exactly(tiny, tmp_path, method, ending):
    model, tokenizer = mlx_linear.load(tiny[method])
    session = ChatSession(model, tokenizer)
    take(session.reply("hello", max_tokens=40))
    short = session.save(tmp_path / "short")
    take(session.reply("tell me more", max_tokens=600))
    processors = [ends_after(5, tokenizer.eos_token_id)] if ending == "eos" else None
    take(session.reply("and more", max_tokens=20, logits_processors=processors))
    assert (session.tokens[-1] == tokenizer.eos_token_id) == (ending == "eos")
    long = session.save(tmp_path / "long.safetensors")
    assert session.num_tokens > 600
    assert short.stat().st_size == long.stat().st_size

    saved_tokens = session.num_tokens
    straight = take(session.reply("go on", max_tokens=12))
    resumed_session = ChatSession(model, tokenizer)
    resumed_session.load(long)
    assert resumed_session.num_tokens == saved_tokens
    resumed = take(resumed_session.reply("go on", max_tokens=12))
    assert mx.array_equal(straight[0].logprobs, resumed[0].logprobs).item()
    assert [r.token for r in straight] == [r.token for r in resumed]
    assert resumed_session.num_tokens == session.num_tokens


def test_state_file_errors(loaded, tiny, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    take(session.reply("hello", max_tokens=20))
    path = session.save(tmp_path / "s")
    with pytest.raises(UserError, match="no state file"):
        session.load(tmp_path / "missing")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the arrays
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        session.load(tmp_path / "flipped")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="corrupt"):
        session.load(tmp_path / "cut")
    other = ChatSession(*mlx_linear.load(tiny["other"]))
    with pytest.raises(UserError, match="another model"):
        other.load(path)
    assert session.num_tokens == 20 + len(session.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"))


def test_only_a_damaged_state_file_is_called_corrupt(tmp_path, monkeypatch):
    (tmp_path / "s.safetensors").write_bytes(b"x")

    def fails_with(error):
        def load_prompt_cache(*args, **kwargs):
            raise error
        return load_prompt_cache

    monkeypatch.setattr(chat_state, "load_prompt_cache", fails_with(PermissionError(13, "Permission denied")))
    with pytest.raises(UserError, match=r"cannot read .*s.safetensors \(Permission denied\)"):
        chat_state.load_state(tmp_path / "s", "model")
    monkeypatch.setattr(chat_state, "load_prompt_cache", fails_with(AttributeError("a bug")))
    with pytest.raises(AttributeError):  # not "corrupt"
        chat_state.load_state(tmp_path / "s", "model")


def memory_during_generation(model, marks):
    """{n: (cache bytes, MLX active memory)} after n generated tokens."""
    cache, seen = make_prompt_cache(model), {}
    steps = generate_step(mx.array([1, 2, 3]), model, max_tokens=max(marks), prompt_cache=cache)
    for n, _ in enumerate(steps, 1):
        if n in marks:
            mx.eval([c.state for c in cache])
            gc.collect()
            seen[n] = (sum(c.nbytes for c in cache), mx.get_active_memory())
    return seen


def test_memory_is_constant_while_the_transformer_grows(tiny):
    liger, _ = mlx_linear.load(tiny["liger"])
    seen = memory_during_generation(liger, (100, 500, 5000))
    assert seen[100][0] == seen[5000][0] == STATE_BYTES
    assert abs(seen[5000][1] - seen[500][1]) < 16 * 1024
    # The oracle: the original transformer's KV cache grows by 2 x layers x KV heads x d x 4 bytes a token.
    original, _ = mlx_linear.load(tiny["none"])
    seen = memory_during_generation(original, (100, 500, 1000))
    per_token = 2 * TINY["num_hidden_layers"] * KV_HEADS * HEAD_DIM * 4
    assert seen[1000][0] - seen[100][0] >= per_token * 700 and seen[1000][1] - seen[500][1] >= per_token * 400


# Command line


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(map(str, args)), input=input)


def test_generate_streams_what_mlx_lm_generates(loaded, tiny):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the thin cat"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = mlx_lm_generate(model, tokenizer, prompt, max_tokens=15)
    result = invoke("generate", "--model", tiny["liger"], "--system", "Be brief.", "--prompt", "the thin cat", "--max-tokens", 15)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert "generation: 15 tokens" in result.stderr and f"state: {STATE_BYTES:,} bytes" in result.stderr
    piped = invoke("generate", "--model", tiny["liger"], "--system", "Be brief.", "--prompt", "-", "--max-tokens", 15, input="the thin cat")
    assert piped.stdout == result.stdout
    raw = invoke("generate", "--model", tiny["liger"], "--raw", "--prompt", "the thin cat", "--max-tokens", 15)
    assert raw.stdout == mlx_lm_generate(model, tokenizer, "the thin cat", max_tokens=15) + "\n"


def test_sampling_flags_reach_mlx_lm(loaded, tiny):
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    mx.random.seed(3)
    expected = mlx_lm_generate(model, tokenizer, prompt, max_tokens=20, **sampling(0.9, 0.95, 20, 0.01, 1.3))
    flags = ["--temp", 0.9, "--top-p", 0.95, "--top-k", 20, "--min-p", 0.01, "--repetition-penalty", 1.3, "--seed", 3]
    result = invoke("generate", "--model", tiny["liger"], "--prompt", "hi", "--max-tokens", 20, *flags)
    assert result.stdout == expected + "\n"
    greedy = invoke("generate", "--model", tiny["liger"], "--prompt", "hi", "--max-tokens", 20)
    assert greedy.stdout != result.stdout


def test_adapter_flag_applies_the_adapter(tiny, tmp_path):
    model, tokenizer = mlx_linear.load(tiny["liger"])
    config = lora_config(model, rank=4)
    apply_lora(model, config)
    mx.random.seed(1)
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            lora = getattr(layer.self_attn, name)
            lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.5
    save_adapter(tmp_path / "adapter", model, config)
    with_adapter, _ = mlx_linear.load(tiny["liger"], adapter_path=tmp_path / "adapter")
    messages = [{"role": "user", "content": "hello"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = mlx_lm_generate(with_adapter, tokenizer, prompt, max_tokens=12)
    assert expected != mlx_lm_generate(mlx_linear.load(tiny["liger"])[0], tokenizer, prompt, max_tokens=12)
    result = invoke("generate", "--model", tiny["liger"], "--adapter", tmp_path / "adapter", "--prompt", "hello", "--max-tokens", 12)
    assert result.stdout == expected + "\n"


def test_generation_merges_the_adapter_into_the_weights(tiny, tmp_path):
    """The chat and generate load with the LoRA layers merged (one matmul, not three): the same
    logits as the adapter applied beside the weights, and no LoRA layer left."""
    from mlx_lm.tuner.lora import LoRALinear

    model, _ = mlx_linear.load(tiny["liger"])
    config = lora_config(model, rank=4)
    apply_lora(model, config)
    for layer in model.layers:
        layer.self_attn.k_proj.lora_b = mx.random.normal(layer.self_attn.k_proj.lora_b.shape, key=mx.random.key(2))
    save_adapter(tmp_path / "adapter", model, config)
    apart, _ = mlx_linear.load(tiny["liger"], adapter_path=tmp_path / "adapter")
    merged, _ = mlx_linear.load(tiny["liger"], adapter_path=tmp_path / "adapter", fuse_adapter=True)
    assert any(isinstance(m, LoRALinear) for _, m in apart.named_modules())
    assert not any(isinstance(m, LoRALinear) for _, m in merged.named_modules())
    tokens = mx.random.randint(0, 300, (1, 30), key=mx.random.key(4))
    assert mx.allclose(apart(tokens), merged(tokens), rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(apart(tokens), mlx_linear.load(tiny["liger"])[0](tokens), atol=1e-2).item()


def test_cli_bad_input(tiny, tmp_path):
    cases = [
        (["generate", "--model", tmp_path / "nope", "--prompt", "hi"], "no config.json"),
        (["chat", "--model", tmp_path / "nope"], "no config.json"),
        (["generate", "--model", tiny["liger"], "--adapter", tmp_path, "--prompt", "hi"], "not an adapter folder"),
        (["generate", "--model", tiny["liger"], "--prompt", "  "], "the prompt is empty"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output


def test_bundled_adapter_is_found_when_packaged(tmp_path, monkeypatch):
    folder = tmp_path / "trained_adapters" / "some-model"
    folder.mkdir(parents=True)
    monkeypatch.setattr("importlib.resources.files", lambda package: tmp_path)
    (folder / "adapter_config.json").write_text("{}")
    assert bundled_adapter("some-model") is None  # weights missing
    (folder / "adapters.safetensors").write_bytes(b"")
    assert bundled_adapter("some-model") is None  # the conversion it was trained on missing
    (folder / "conversion.json").write_text("{}")
    assert bundled_adapter("some-model") == folder


# A real terminal


def spawn_chat(*args, env=None):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_linear", "chat", *map(str, args)],
        env={**os.environ, "TERM": "dumb", **(env or {})},
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        dimensions=(50, 1000),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it (a job in the background ignores ^C)
    )
    child.expect_exact(">>> ")
    return child


def wait_until_reading_input(child, timeout=120):
    """Until the chat's main thread blocks in readline's select() (Linux: its kernel wait channel),
    however slow the machine; elsewhere a second."""
    wchan = Path(f"/proc/{child.pid}/wchan")
    if not wchan.exists():
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while not any(word in wchan.read_text() for word in ("poll", "select")):
        assert time.monotonic() < deadline, f"the chat never waited for input (wchan {wchan.read_text()!r})"
        time.sleep(0.02)


def say(child, line):
    """Type a line; return what the program printed before its next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")
    child.expect_exact(">>> ")
    return child.before.replace("\r\n", "\n")


def stats(child):
    lines = dict(line.split(": ", 1) for line in say(child, "/stats").splitlines() if ": " in line)
    return int(lines["tokens so far"]), lines["state"]


def test_terminal_session(loaded, tiny, tmp_path):
    model, tokenizer = loaded
    child = spawn_chat("--model", tiny["liger"], "--max-tokens", 30)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert say(child, "hello") == mlx_lm_generate(model, tokenizer, prompt, max_tokens=30) + "\n"
    tokens, state = stats(child)
    assert tokens == len(prompt) + 30 and state.startswith(f"{STATE_BYTES:,} bytes")

    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("first line")
    child.expect_exact("... ")
    child.sendline("second line")
    say(child, '"""')
    delta = tokenizer.encode("<|im_end|>\n<|im_start|>user\nfirst line\nsecond line<|im_end|>\n<|im_start|>assistant\n")
    assert stats(child)[0] == tokens + len(delta) + 30

    assert "saved" in say(child, f"/save {tmp_path / 'conversation'}")
    saved = stats(child)[0]
    assert "(new conversation)" in say(child, "/reset") and stats(child)[0] == 0
    assert "loaded" in say(child, f"/load {tmp_path / 'conversation'}") and stats(child)[0] == saved
    (tmp_path / "junk.safetensors").write_text("not a state")
    for line, error in [
        ("/bogus", "Error: unknown command /bogus"),
        (f"/load {tmp_path / 'absent'}", "Error: no state file"),
        (f"/load {tmp_path / 'junk'}", "corrupt"),
        ("/save", "Error: /save needs a file name"),
    ]:
        assert error in say(child, line)
    assert "/reset" in say(child, "/help")
    assert stats(child)[0] == saved  # none of that touched the conversation
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_ctrl_c_stops_the_reply_and_keeps_the_chat(tiny):
    child = spawn_chat("--model", tiny["liger"], "--max-tokens", 10**7)
    for message in ("hello", "again"):
        child.sendline(message)
        child.expect_exact(message + "\r\n")
        child.expect(r"[\s\S]{50}")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>> ")
        tokens, _ = stats(child)
        assert tokens > 50
    # At the prompt: a new prompt, the chat goes on. CPython's readline checks signals only when
    # its select() is interrupted, so an earlier ^C waits for a key: wait until it is blocked there.
    wait_until_reading_input(child)
    child.sendintr()
    child.expect_exact(">>> ")
    assert stats(child)[0] == tokens
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def bundled_state_bytes(conversion):
    """SmolLM2's cache by hand, float32, 30 layers of 9 query and 3 KV heads of dimension 64:
    the window's keys and values (sinks included) and the method's state."""
    window = 2 * (64 + conversion.get("sinks", 0)) * 3 * 64 * 4
    if conversion.get("method") == "lolcats":  # per query head: S (z its last column), the queued phi(k) and v, z
        state = 9 * 64 * 65 * 4 + 9 * 64 * (64 + 65) * 4
    elif conversion.get("method") == "lola":  # S; two blocks' raw k, v (per KV head), phi(k) (per query head); the cache's, positions
        slots = conversion["options"].get("slots", 64)
        state = 9 * 64 * 65 * 4 + 2 * 64 * (2 * 3 * 64 + 9 * 64) * 4 + slots * (2 * 3 * 64 + 9 * 64 + 3) * 4
    else:  # per KV head: S, and the normaliser's sum if any
        state = 3 * 64 * 64 * 4 + (3 * 64 * 4 if conversion.get("options", {}).get("normalize") else 0)
    return 30 * (window + state)


def test_terminal_default_model_is_the_bundled_one_with_its_adapter(smollm_gguf, tmp_path):
    """The real SmolLM2: the default converts the bundled GGUF as the packaged adapter's
    conversion.json says (here into an empty cache) and loads that adapter."""
    packaged = bundled_adapter()
    conversion = json.loads((packaged / "conversion.json").read_text()) if packaged else {}
    child = spawn_chat("--max-tokens", 12, env={"MLX_LINEAR_CACHE": str(tmp_path)})
    if packaged is None:
        assert NO_ADAPTER_NOTE in child.before
    else:
        assert f"chatting with smollm2-135m-instruct-{conversion['method']}-" in child.before
        assert f" + {packaged.name}" in child.before
    assert "Paris" in say(child, "What is the capital of France?")
    assert stats(child)[1].startswith(f"{bundled_state_bytes(conversion):,} bytes")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
