"""A conversation held in the model's cache: each turn prefills only the tokens it adds.

The whole conversation is rendered with the chat template every turn; the text of the tokens
already in the cache must be a prefix of it, and only the rest is fed. Comparing text, not
tokens, keeps replies whose tokens are not the canonical tokenization of their text (sampling
produces those) from forcing a re-read.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import CacheList, KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_linear.errors import UserError
from mlx_linear.fastmath import on_cpu

from .model import fingerprint
from .state import load_state, save_state, state_path

# Prompt tokens per prefill step: on the CPU the linear model's cost does not depend on it, and its
# peak memory then stays the same for any prompt longer (mlx-lm's 2048 needs ~200 MB more). A GPU
# pays a step's kernels per call (14.6 a token at 512 for Liger-GLA, 3.65 at 2,048): mlx-lm's 2,048.
PREFILL_STEP = 512 if on_cpu() else 2048
# Stands in for the turns of a loaded state, which this session never saw (see `load`).
UNSEEN = "…"


def sampling(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None):
    """stream_generate's keyword arguments for these settings (temp 0: greedy)."""
    return {
        "sampler": make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k),
        "logits_processors": make_logits_processors(repetition_penalty=repetition_penalty),
    }


def cached_tokens(cache) -> int:
    """How many tokens the cache has seen (the offset of any positional sub-cache)."""
    layer = cache[0]
    parts = layer.caches if isinstance(layer, CacheList) else [layer]
    return max(getattr(p, "offset", 0) for p in parts)


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0


class Stopped(Exception):
    pass


class ChatSession:
    def __init__(self, model, tokenizer, system=None, name=""):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{name or 'the model'} has no chat template: chat needs an instruct model (or use `generate --raw`)")
        self.model, self.tokenizer, self.system, self.name = model, tokenizer, system, name
        self.model_id = fingerprint(model)
        self.eos = set(tokenizer.eos_token_ids)
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.seen = ""  # the text the cache held before `tokens` (a stand-in after a load)
        self.tokens = []  # every token fed since
        self.last_token = None
        self.cut = False  # Ctrl-C stopped the last prefill part-way
        self.stale = False  # the cache holds a token this session cannot name
        self.last = TurnStats()

    @property
    def num_tokens(self) -> int:
        return cached_tokens(self.cache)

    @property
    def grows(self) -> bool:
        """Whether some layer keeps a full KV cache (a transformer, or Liger-H's softmax layers)."""
        return any(isinstance(c, KVCache) for c in self.cache)

    @property
    def state_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def render(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def prompt(self, user_text):
        """(tokens to feed, notice or None): the rendered conversation past what the cache holds."""
        user = {"role": "user", "content": user_text}
        text = self.render(self.messages + [user])
        held = self.seen + self.decode(self.tokens)
        if text.startswith(held) and not self.stale:
            self.messages.append(user)
            return self.encode(text[len(held) :]), None
        reason = "the last reply broke off mid-step" if self.stale else "the chat template renders earlier turns differently"
        if self.seen:
            notice = f"{reason}, so the loaded conversation cannot go on: starting over from this message"
        else:
            notice = f"{reason}: re-reading the whole conversation ({len(self.messages) + 1} messages)"
        messages = self.messages if not self.seen else self.messages[: 1 if self.system else 0]
        self.reset()
        self.messages = messages + [user]
        return self.encode(self.render(self.messages)), notice

    def reply(self, user_text, max_tokens=256, stop=lambda: False, progress=None, notify=None, **sampling_kwargs):
        """Stream this turn's mlx-lm GenerationResponses. `stop()` true ends it early (Ctrl-C);
        `progress(done, total)` follows the prefill; `notify(text)` hears when the cache is rebuilt."""
        prompt, notice = self.prompt(user_text)
        if notice and notify:
            notify(notice)
        start, generated = self.num_tokens, []

        def on_prefill(done, total):
            if progress:
                progress(done, total)
            if done < total and stop():
                raise Stopped  # between chunks: the cache holds whole chunks

        responses = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(prompt),
            max_tokens,
            prompt_cache=self.cache,
            prefill_step_size=PREFILL_STEP,
            prompt_progress_callback=on_prefill,
            **sampling_kwargs,
        )
        try:
            for response in responses:
                generated.append(response.token)
                self.last = TurnStats(len(prompt), response.prompt_tps, response.generation_tokens, response.generation_tps)
                yield response
                if stop():
                    break
        except Stopped:
            self.last = TurnStats(len(prompt))
        finally:
            responses.close()
            self.record(prompt, generated, start)

    def record(self, prompt, generated, start):
        # mlx-lm feeds every token it yields (a final EOS included) before yielding it,
        # so the cache's own count says what went in; an error inside a step can leave in
        # one more, never yielded: the next turn then re-reads the conversation.
        sent, count = prompt + generated, self.num_tokens - start
        fed = sent[:count]
        self.stale = count > len(sent)
        self.tokens += fed
        self.last_token = fed[-1] if fed else self.last_token
        self.cut = len(fed) < len(prompt)
        reply = [t for t in fed[len(prompt) :] if t not in self.eos]
        self.messages.append({"role": "assistant", "content": self.decode(reply)})

    def save(self, path):
        if self.cut:
            raise UserError("Ctrl-C cut the last message short during its prefill: send another message, then /save")
        last = -1 if self.last_token is None else self.last_token
        return save_state(path, self.cache, self.model_id, name=self.name, last_token=f"{last:012d}")

    def load(self, path):
        """Continue a saved conversation. Its turns are not in the file (that keeps the file's
        size constant): a placeholder exchange renders the template's boundary after a reply."""
        cache, metadata = load_state(path, self.model_id)
        self.reset()
        self.cache = cache
        if self.num_tokens > 0:
            self.last_token = int(metadata["last_token"])
            unseen = [{"role": "user", "content": UNSEEN}]
            closing = self.decode([self.last_token]) if self.last_token in self.eos else ""
            self.seen = self.render(self.messages + unseen) + UNSEEN + closing
            self.messages += unseen + [{"role": "assistant", "content": UNSEEN}]
        return state_path(path)
