"""The linearized model through mlx-lm's generation: single and batched (batch.py).

A batch's rows are at their own positions, so each must be exactly its own sequence: the oracle
is the same prompt generated alone (greedy tokens equal, log-probabilities to float error)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step, stream_generate
from mlx_lm.models.cache import KVCache

import mlx_linear
from mlx_linear.batch import BatchLinearCache, LinearCache
from mlx_linear.convert import convert

# Every kind of layer a batch meets: the chat's recipe (LoLA with sinks: per-row block
# boundaries and a cache past its horizon), the window's mass (LoLCATs), full-attention layers.
RECIPES = {
    "liger-gla": dict(method="liger-gla"),
    "liger-hgrn2": dict(method="liger-hgrn2"),
    "liger-gsa": dict(method="liger-gsa"),
    "lola-sinks": dict(method="lola", sinks=4, options={"slots": 4, "horizon": 24}),
    "lolcats-sinks": dict(method="lolcats", sinks=2),
    "lola-sink-horizon": dict(method="lola", sinks=4, sink_horizon=30, options={"slots": 4, "horizon": 24, "sinks_in_state": False}),
    "liger-gla-full-every-2": dict(method="liger-gla", full_attention_every=2),
}


@pytest.fixture(scope="module", params=list(RECIPES))
def converted(hf_checkpoints, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("gen") / "m"
    return mlx_linear.load(convert(out, hf_source=str(hf_checkpoints["qwen2"]), window=8, log=lambda m: None,
                                   **RECIPES[request.param]))


def single(model, prompt, n):
    """Tokens and their log-probabilities, the prompt alone."""
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    tokens, logprobs = zip(*((int(t), lp[int(t)].item()) for t, lp in steps))
    return list(tokens), list(logprobs)


def assert_alone(model, prompt, tokens, logprobs):
    expected_tokens, expected_logprobs = single(model, prompt, len(tokens))
    assert tokens == expected_tokens
    assert mx.allclose(mx.array(logprobs), mx.array(expected_logprobs), atol=1e-4).item()


def test_batched_generation_equals_one_at_a_time(converted):
    """Prompts shorter and longer than the window (8) and its sinks, past LoLA's horizon."""
    model, tokenizer = converted
    prompts = [list(range(3, 9)), list(range(40, 63)), [7, 8], [5] * 3 + list(range(60, 90))]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=40, return_token_ids=True, return_logprobs=True,
                           prefill_step_size=16)
    for prompt, tokens, logprobs in zip(prompts, batch.token_ids, batch.logprobs):
        assert_alone(model, prompt, tokens, logprobs)


def test_requests_coming_and_going(converted):
    """The server's batches: rows end at their own lengths (filter) and join mid-way (extend),
    while others decode; one prompt is a single token (its row starts empty)."""
    model, _ = converted
    mx.random.seed(3)
    prompts = [mx.random.randint(0, 300, (n,)).tolist() for n in (5, 17, 33, 1)]
    lengths = [50, 12, 30, 40]
    generator = BatchGenerator(model, prefill_step_size=16)
    uids = generator.insert(prompts[:3], max_tokens=lengths[:3])
    generated, step = {}, 0
    while (responses := generator.next_generated()) or step < 10:
        step += 1
        if step == 10:
            uids += generator.insert(prompts[3:], max_tokens=lengths[3:])
        for r in responses:
            tokens, logprobs = generated.setdefault(r.uid, ([], []))
            tokens.append(r.token)
            logprobs.append(r.logprobs[r.token].item())
    for uid, prompt, n in zip(uids, prompts, lengths):
        assert len(generated[uid][0]) == n
        assert_alone(model, prompt, *generated[uid])


def test_a_row_taken_out_goes_on_alone(converted):
    """extract() gives a sequence's own cache back (what the server keeps between turns): it
    goes on as the sequence generated alone does; and merging it again changes nothing."""
    model, _ = converted
    prompts = [list(range(10, 40)), list(range(3, 12))]
    generator = BatchGenerator(model, prefill_step_size=16)
    uids = generator.insert(prompts, max_tokens=[30, 30])
    for _ in range(20):
        generator.next_generated()
    cache, tokens = generator.extract_cache(uids[:1])[uids[0]]
    assert {type(c) for c in cache} <= {LinearCache, KVCache} and LinearCache in {type(c) for c in cache}
    alone = model.make_cache()
    model(mx.array(tokens)[None], cache=alone)
    follow = mx.array([[7]])
    again = [c.merge([c]) for c in cache]
    assert any(isinstance(c, BatchLinearCache) for c in again)
    for other in (cache, again):
        assert mx.allclose(model(follow, cache=other), model(follow, cache=alone), atol=1e-4).item()
        alone = model.make_cache()
        model(mx.array(tokens)[None], cache=alone)


def test_stream_generate_still_matches(converted):
    model, tokenizer = converted
    prompt = list(range(3, 20))
    text = [r.token for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=8)]
    assert text == single(model, prompt, 8)[0]
