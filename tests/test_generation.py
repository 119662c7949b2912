"""The linearized model through mlx-lm's generation: single and batched."""

import mlx.core as mx
import pytest
from mlx_lm.generate import batch_generate, stream_generate

import mlx_linear
from mlx_linear.convert import convert


@pytest.fixture(scope="module", params=["liger-gla", "liger-hgrn2", "liger-gsa"])
def liger(hf_checkpoints, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("gen") / "m"
    return mlx_linear.load(convert(out, hf_source=str(hf_checkpoints["qwen2"]), window=8, method=request.param,
                                   log=lambda m: None))


def single(model, tokenizer, prompt, n):
    """Tokens and their log-probabilities, one sequence at a time."""
    responses = list(stream_generate(model, tokenizer, mx.array(prompt), max_tokens=n))
    return [r.token for r in responses], [r.logprobs[r.token].item() for r in responses]


def test_batched_generation_equals_one_at_a_time(liger):
    """Left padding must neither write into the recurrent state nor enter the window."""
    model, tokenizer = liger
    prompts = [list(range(3, 9)), list(range(40, 63)), [7, 8]]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=12, return_token_ids=True, return_logprobs=True)
    for prompt, tokens, logprobs in zip(prompts, batch.token_ids, batch.logprobs):
        expected_tokens, expected_logprobs = single(model, tokenizer, prompt, 12)
        assert tokens == expected_tokens
        assert mx.allclose(mx.array(logprobs), mx.array(expected_logprobs), atol=1e-4).item()
