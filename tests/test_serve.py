"""The OpenAI-compatible server over real HTTP on 127.0.0.1: mlx-lm's own (mlx_lm.server, stock)
and `mlx_linear serve`, on a converted model with the chat's recipe (LoLA with sinks). The oracle
is the same greedy prompt generated alone by mlx-lm, the model loaded the same way."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

import mlx_linear
from mlx_linear.convert import convert

TOKENS = 24
CHAT_RECIPE = dict(method="lola", sinks=4, window=8, options={"slots": 4, "horizon": 24})


@pytest.fixture(scope="module")
def lola_folder(hf_checkpoints, tmp_path_factory):
    return convert(tmp_path_factory.mktemp("serve") / "lola", hf_source=str(hf_checkpoints["qwen2"]), log=lambda m: None,
                   **CHAT_RECIPE)


@pytest.fixture(scope="module")
def alone(lola_folder):
    """reply(messages) -> the greedy reply: text, token ids (the end-of-turn token too), their
    log-probabilities and each step's, the prompt generated alone."""
    return greedy_replies(*mlx_linear.load(lola_folder))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1; `post` sends a request, `alive` checks it still answers."""

    def __init__(self, command, log_path, env=None):
        self.port = free_port()
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([*command, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while not self.alive():
            assert self.process.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
            time.sleep(0.2)

    def alive(self):
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def post(self, body, path="/v1/chat/completions"):
        defaults = {"temperature": 0.0, "max_tokens": TOKENS, "logprobs": True}
        data = body if isinstance(body, bytes) else json.dumps({**defaults, **body}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def answer(response):
    """The reply's text, token ids and log-probabilities."""
    status, body = response
    assert status == 200, body
    choice = body["choices"][0]
    steps = choice["logprobs"]["content"]
    return choice["message"]["content"], [s["id"] for s in steps], [s["logprob"] for s in steps]


def assert_same(reply, expected, tolerance=1e-3):
    """The same tokens with log-probabilities within `tolerance`, up to where the alone run's
    top two tokens lie within it (a tie that rounding may break either way)."""
    text, tokens, logprobs = reply
    _, expected_tokens, expected_logprobs, steps = expected
    for i, (token, expected_token) in enumerate(zip(tokens, expected_tokens)):
        if token != expected_token:
            assert steps[i][expected_token] - steps[i][token] < tolerance, (text, i)
            return
        assert abs(logprobs[i] - expected_logprobs[i]) < tolerance, (text, i)
    assert len(tokens) == len(expected_tokens), text


def concurrently(server, bodies):
    """Responses to requests sent together (the server batches them)."""
    results = [None] * len(bodies)

    def send(i):
        results[i] = server.post(bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def check_conversations(server, alone):
    """One request; a second turn on the first's state; two requests at once, batched."""
    first = [{"role": "user", "content": "the theme in the thin thing"}]
    reply = answer(server.post({"messages": first}))
    assert_same(reply, alone(first))
    second = first + [{"role": "assistant", "content": reply[0]}, {"role": "user", "content": "then the next one"}]
    status, body = server.post({"messages": second})
    assert_same(answer((status, body)), alone(second))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the first turn's state, reused
    others = [[{"role": "user", "content": text}] for text in ("in the tin", "another theme, longer than the window is")]
    for response, messages in zip(concurrently(server, [{"messages": m} for m in others]), others):
        assert_same(answer(response), alone(messages))


@pytest.fixture(scope="module")
def mlx_lm_server(lola_folder, tmp_path_factory):
    server = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(lola_folder), "--trust-remote-code"],
                    tmp_path_factory.mktemp("logs") / "mlx_lm_server.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def linear_server(lola_folder, tmp_path_factory):
    server = Server([sys.executable, "-m", "mlx_linear", "serve", "--model", str(lola_folder)],
                    tmp_path_factory.mktemp("logs") / "serve.log")
    yield server
    server.close()


def test_mlx_lm_server_on_the_chat_recipe(mlx_lm_server, alone):
    check_conversations(mlx_lm_server, alone)


def test_mlx_linear_serve(linear_server, alone):
    check_conversations(linear_server, alone)


def test_bad_requests_get_errors_and_the_server_keeps_serving(linear_server, alone):
    status, _ = linear_server.post(b'{"messages": [{"role": "user", "content": "unterminated')
    assert status == 400
    # Nothing to prompt with: stock mlx-lm's generation thread dies of it (and every later request).
    assert linear_server.post({"prompt": ""}, path="/v1/completions")[0] == 400
    assert linear_server.post({"messages": []})[0] == 400
    # A client that leaves mid-stream: the connection closes after the first chunk.
    body = json.dumps({"messages": [{"role": "user", "content": "stream it"}], "stream": True, "max_tokens": 200}).encode()
    with socket.create_connection(("127.0.0.1", linear_server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        s.settimeout(60)
        received = b""
        while b"data:" not in received:  # past the headers and keep-alive comments: the reply has started
            received += s.recv(4096)
    # A request naming a model this server does not hold is served by the one it does.
    question = [{"role": "user", "content": "after all that"}]
    assert_same(answer(linear_server.post({"messages": question, "model": "gpt-4o"})), alone(question))
    assert linear_server.process.poll() is None


@pytest.fixture(scope="module")
def bundled(smollm_gguf, tmp_path_factory):
    """The chat's default model (the bundled SmolLM2 converted as its packaged adapter says, into
    a fresh cache folder) and the adapter; `alone` replies loaded as `loader` loads them."""
    from mlx_linear.chat.model import bundled_adapter, load_chat_model

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_LINEAR_CACHE", str(cache))
        model, tokenizer, name = load_chat_model(log=lambda m: None)
    folder = next(p for p in cache.iterdir() if (p / "config.json").is_file())
    return folder, bundled_adapter(), cache, (model, tokenizer)


def greedy_replies(model, tokenizer):
    def reply(messages):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        tokens, logprobs, steps = [], [], []
        for token, lp in generate_step(mx.array(prompt), model, max_tokens=TOKENS):
            tokens.append(int(token))
            logprobs.append(lp[int(token)].item())
            steps.append(lp.astype(mx.float32).tolist())
            if tokens[-1] in tokenizer.eos_token_ids:
                break
        return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids]), tokens, logprobs, steps

    return reply


def check_real_conversations(server, alone, tolerance=1e-3):
    """The README's question, a second turn on its state, and two questions at once."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    reply = answer(server.post({"messages": first}))
    assert "Paris" in reply[0]
    assert_same(reply, alone(first), tolerance)
    second = first + [{"role": "assistant", "content": reply[0]}, {"role": "user", "content": "And the capital of Italy?"}]
    status, body = server.post({"messages": second})
    assert "Rome" in answer((status, body))[0]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert_same(answer((status, body)), alone(second), tolerance)
    others = [[{"role": "user", "content": q}] for q in ("What is the capital of Spain?", "Name a primary colour.")]
    for response, messages in zip(concurrently(server, [{"messages": m} for m in others]), others):
        assert_same(answer(response), alone(messages), tolerance)


@pytest.mark.slow
def test_mlx_linear_serve_on_the_chat_default_model(bundled, tmp_path):
    folder, adapter, cache, (model, tokenizer) = bundled
    server = Server([sys.executable, "-m", "mlx_linear", "serve"], tmp_path / "serve.log", env={"MLX_LINEAR_CACHE": str(cache)})
    try:
        check_real_conversations(server, greedy_replies(model, tokenizer))
    finally:
        server.close()


@pytest.mark.slow
def test_mlx_lm_server_on_the_chat_default_model(bundled, tmp_path):
    """Stock mlx-lm loads the model its own way (the adapter unmerged, quantized weights as
    they are, bfloat16): the oracle loads it so too; log-probabilities agree to bfloat16's steps."""
    from mlx_lm import load

    folder, adapter, _, _ = bundled
    server = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--adapter-path", str(adapter),
                     "--trust-remote-code"], tmp_path / "server.log")
    try:
        replies = greedy_replies(*load(str(folder), adapter_path=str(adapter), trust_remote_code=True))
        check_real_conversations(server, replies, tolerance=0.05)
    finally:
        server.close()


def test_serve_refuses_a_taken_port_and_unknown_options(lola_folder):
    """Both fail at once with one line naming the problem, and exit (a server that failed to bind
    after its generation thread started would never exit)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "mlx_linear", "serve", "--model", str(lola_folder), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    run = subprocess.run([sys.executable, "-m", "mlx_linear", "serve", "--model", str(lola_folder), "--no-such-option"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unrecognized arguments: --no-such-option" in run.stderr
