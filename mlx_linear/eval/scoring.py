"""Log-likelihoods of continuations, scored the way lm-evaluation-harness scores them.

A context shared by several continuations (the choices of one question) is run once; its
cache is then branched for the continuations. A linearized layer's cache has a constant
size, so a branch costs a copy of a few MB however long the context; the original
transformer's KV cache branches the same way.
"""

import copy

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache

MODES = ("batched", "branch", "rerun")


def prefix_token(tokenizer):
    """What lm-eval's HF model puts before an empty context: BOS, or EOS without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text):
    """lm-eval's tok_encode: the tokenizer's own special tokens, none if the text already starts with BOS."""
    if text.startswith(tokenizer.decode([prefix_token(tokenizer)])):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context, continuation):
    """(context tokens, continuation tokens) as lm-eval's loglikelihood requests have them.

    Trailing whitespace of the context moves to the continuation; the continuation's tokens
    are what encoding context + continuation adds after the context's own tokens. An empty
    context becomes the prefix token.
    """
    if not context:
        tokens = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token(tokenizer)
        return ([prefix], tokens) if tokens[0] != prefix else (tokens[:1], tokens[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_tokens = encode(tokenizer, context)
    return context_tokens, whole[len(context_tokens) :]


def repeat_cache(cache, n):
    """n independent copies of a batch-1 cache, stacked on the batch axis."""

    def repeat(x):
        return mx.repeat(x, n, axis=0) if isinstance(x, mx.array) else x

    return [type(c).from_state(tree_map(repeat, c.state)) for c in cache]


def pad(sequences, length):
    return mx.array([list(s) + [0] * (length - len(s)) for s in sequences])


def continuation_scores(logits, targets, lengths):
    """(sum of log-probabilities, all greedy) per row; positions at or past a row's length are padding."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    valid = mx.arange(targets.shape[1])[None] < lengths[:, None]
    greedy = (mx.argmax(logits, axis=-1) == targets) | ~valid
    return mx.where(valid, picked, 0).sum(axis=-1), greedy.all(axis=-1)


def score_group(model, context, continuations, mode="batched"):
    """[(log-likelihood, is greedy)] of each continuation (token lists) after the context tokens.

    batched: run the context once, then all continuations as one right-padded batch from copies
    of its cache; branch: the same, one continuation at a time from a deep copy; rerun: the
    whole sequence for every continuation, no cache (what lm-eval does; the oracle).
    """
    if mode == "rerun":
        return [rerun(model, context, c) for c in continuations]
    cache = make_prompt_cache(model)
    last = model(mx.array(context)[None], cache=cache)[:, -1:]
    mx.eval(last, [c.state for c in cache])
    if mode == "branch":
        return [branch(model, copy.deepcopy(cache), last, c) for c in continuations]
    return batched(model, cache, last, continuations)


def rerun(model, context, continuation):
    tokens = context + continuation
    logits = model(mx.array(tokens[:-1])[None])[:, len(context) - 1 :]
    return to_python(continuation_scores(logits, mx.array([continuation]), mx.array([len(continuation)])))[0]


def branch(model, cache, last, continuation):
    # The continuation's last token is only a target: the model never needs to read it.
    logits = last
    if len(continuation) > 1:
        logits = mx.concatenate([last, model(mx.array(continuation[:-1])[None], cache=cache)], axis=1)
    return to_python(continuation_scores(logits, mx.array([continuation]), mx.array([len(continuation)])))[0]


def batched(model, cache, last, continuations):
    n, length = len(continuations), max(len(c) for c in continuations)
    logits = mx.broadcast_to(last, (n, 1, last.shape[-1]))
    if length > 1:
        cache = repeat_cache(cache, n) if n > 1 else cache
        inputs = pad([c[:-1] for c in continuations], length - 1)
        logits = mx.concatenate([logits, model(inputs, cache=cache)], axis=1)
    lengths = mx.array([len(c) for c in continuations])
    return to_python(continuation_scores(logits, pad(continuations, length), lengths))


def to_python(scores):
    lls, greedy = scores
    mx.eval(lls, greedy)
    return [(float(ll), bool(g)) for ll, g in zip(lls.tolist(), greedy.tolist())]


def window_spans(n_tokens, window, stride=None):
    """(begin, end, scored) covering a token stream: input tokens[begin:end] predicts
    tokens[begin + 1 : end + 1], of which the last `scored` count. Every token but the
    first is scored exactly once, with at most `window` tokens of context (stride < window:
    windows overlap and only their last `stride` predictions count)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..{window}, got {stride}")
    spans, done = [], 0
    while done < n_tokens - 1:
        end = min(done + stride, n_tokens - 1)
        spans.append((max(0, end - window), end, end - done))
        done = end
    return spans


def window_nlls(model, tokens, begin, end, scored):
    """Negative log-likelihoods of the last `scored` predictions of tokens[begin:end], in order."""
    logits = model(mx.array(tokens[begin:end])[None])[:, -scored:].astype(mx.float32)
    targets = mx.array(tokens[end - scored + 1 : end + 1])[None]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (-mx.take_along_axis(logprobs, targets[..., None], axis=-1)[0, :, 0]).tolist()


class Scorer:
    """A model and its tokenizer, with the request types tasks need; counts the tokens it runs."""

    def __init__(self, model, tokenizer, mode="batched", window=1024, stride=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.window, self.stride = window, stride
        self.tokens = 0

    def encode(self, text):
        return encode(self.tokenizer, text)

    def loglikelihoods(self, requests):
        """[(log-likelihood, is greedy)] for (context, continuation) strings, in order."""
        return self.score_tokens([encode_pair(self.tokenizer, c, x) for c, x in requests])

    def score_tokens(self, pairs):
        """Like `loglikelihoods` for (context tokens, continuation tokens); one run per distinct context."""
        groups = {}
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"a continuation after {len(context)} context tokens encodes to no tokens")
            groups.setdefault(tuple(context), []).append(i)
        results = [None] * len(pairs)
        for context, indices in groups.items():
            continuations = [list(pairs[i][1]) for i in indices]
            self.tokens += self.tokens_run(len(context), [len(c) for c in continuations])
            for i, result in zip(indices, score_group(self.model, list(context), continuations, self.mode)):
                results[i] = result
        return results

    def tokens_run(self, context, continuations):
        """Tokens the model reads: a continuation's last token is only a target."""
        if self.mode == "rerun":
            return sum(context + n - 1 for n in continuations)
        return context + sum(n - 1 for n in continuations)

    def perplexity_spans(self, tokens):
        return window_spans(len(tokens), self.window, self.stride)

    def window_nlls(self, tokens, span):
        begin, end, scored = span
        self.tokens += end - begin
        return window_nlls(self.model, tokens, begin, end, scored)

