"""The model `mlx_linear` for lm-evaluation-harness (optional: `pip install lm_eval`, no torch needed).

Importing this module registers the model. lm_eval's own command does not import
third-party packages, so run it through this module, with lm_eval's usual arguments:

    python -m mlx_linear.eval.harness --model mlx_linear --model_args pretrained=smol-liger --tasks piqa

or, from Python, `import mlx_linear.eval.harness` before `lm_eval.simple_evaluate(model="mlx_linear", ...)`.
Log-likelihoods go through the same Scorer as `mlx_linear eval` (one run per distinct
context, branched caches for its continuations).
"""

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    from ..errors import UserError

    message = f"lm-evaluation-harness is not installed ({e}): pip install lm_eval"
    if __name__ == "__main__":
        raise SystemExit(f"Error: {message}")
    raise UserError(message) from None

import mlx_linear

from .scoring import Scorer, encode, prefix_token


@register_model("mlx_linear")
class MLXLinearLM(TemplateLM):
    def __init__(self, pretrained, adapter=None, scoring="batched", max_length=2048, max_gen_toks=256, **kwargs):
        super().__init__()
        self.path = str(pretrained)
        self.model, self.tokenizer = mlx_linear.load(pretrained, adapter_path=adapter)
        self.scorer = Scorer(self.model, self.tokenizer, mode=scoring)
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        return prefix_token(self.tokenizer)

    @property
    def tokenizer_name(self):
        return self.path.replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        if add_special_tokens is None:
            return encode(self.tokenizer, string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        return self.scorer.score_tokens([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each string in windows of max_length, every token scored once after the prefix token."""
        results = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            pairs = [make_disjoint_window(w) for w in windows]
            results.append(sum(ll for ll, _ in self.scorer.score_tokens(pairs)))
        return results

    def generate_until(self, requests, disable_tqdm=False):
        from mlx_lm.generate import stream_generate

        outputs = []
        for context, options in (r.args for r in requests):
            until = options.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            text = ""
            prompt = self.tok_encode(context)
            for response in stream_generate(
                self.model, self.tokenizer, prompt, max_tokens=options.get("max_gen_toks", self.max_gen_toks)
            ):
                text += response.text
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            outputs.append(text)
        return outputs

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )


def main():
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
