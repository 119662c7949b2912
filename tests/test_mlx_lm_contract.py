"""What this package takes from mlx-lm's caches (pinned to 0.32.x in pyproject.toml): these fail
when an mlx-lm release changes them under us."""

import inspect

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache

from mlx_linear.attention import keep_last
from mlx_linear.eval.scoring import repeat_cache

from conftest import tiny_model


def positions(first, n):
    """Keys and values that say which token they are: (1, 1, n, 1) holding first .. first + n - 1."""
    x = mx.arange(first, first + n, dtype=mx.float32).reshape(1, 1, n, 1)
    return x, x


def held(keys):
    return sorted(int(t) for t in keys.reshape(-1).tolist())


def test_from_state_takes_the_whole_state_and_rotating_state_holds_its_position():
    # scoring.repeat_cache rebuilds caches with from_state(state) alone ...
    assert list(inspect.signature(_BaseCache.from_state).parameters) == ["state"]
    # ... which keeps a RotatingKVCache whole only while its state carries offset, keep, size and _idx.
    cache = RotatingKVCache(max_size=8, keep=2)
    cache.update_and_fetch(*positions(0, 12))
    keys, values, offset, keep, max_size, idx = cache.state
    assert (offset, keep, max_size, idx) == (12, 2, 8, cache._idx) and keys.shape[2] == 12


def test_a_trimmed_prefill_decodes_as_token_by_token_does():
    """attention.keep_last trims a prefill to sinks + window and sets mlx-lm's private write
    position _idx: each decoded token must then replace the token mlx-lm's own rotation would."""
    trimmed, stepped = RotatingKVCache(max_size=8, keep=2), RotatingKVCache(max_size=8, keep=2)
    trimmed.update_and_fetch(*positions(0, 12))
    keep_last(trimmed)
    for t in range(12):
        stepped.update_and_fetch(*positions(t, 1))
    assert held(trimmed.keys) == held(stepped.keys) == [0, 1, 6, 7, 8, 9, 10, 11]
    for t in range(12, 20):
        got, expected = trimmed.update_and_fetch(*positions(t, 1)), stepped.update_and_fetch(*positions(t, 1))
        assert held(got[0]) == held(expected[0]) == [0, 1, *range(t - 5, t + 1)], t


def test_repeated_caches_are_copies_of_the_whole_cache():
    model = tiny_model("llama")
    cache = model.make_cache()
    model(mx.array([list(range(1, 13))]), cache=cache)  # past the window of 8
    copies = repeat_cache(cache, 3)
    step = mx.array([[5]])
    one = model(step, cache=cache)
    three = model(mx.repeat(step, 3, axis=0), cache=copies)
    assert mx.allclose(three, mx.repeat(one, 3, axis=0), atol=1e-5).item()
    assert type(copies[0]) is type(cache[0]) and not isinstance(cache[0], KVCache)
