"""A Hugging Face tokenizer rebuilt from a GGUF file's metadata.

Byte-level BPE vocabularies are rebuilt with `tokenizers`, splitting text the way the file's
pre-tokenizer (`tokenizer.ggml.pre`) says; sentencepiece vocabularies go through transformers'
GGUF converter.
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mlx_linear.errors import UserError

CONTROL, USER_DEFINED = 3, 4

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex=True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split(pattern):
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _byte_level(use_regex=False)]
    )


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with.
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    # SmolLM (like StarCoder) splits digits one by one before the GPT-2 split.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: _split(LLAMA3_SPLIT),
    "llama3": lambda: _split(LLAMA3_SPLIT),
    "qwen2": lambda: _split(QWEN2_SPLIT),
}


def _token(meta, key):
    index = meta.get(f"tokenizer.ggml.{key}")
    return None if index is None else meta["tokenizer.ggml.tokens"][int(index.item())]


def _byte_level_bpe(meta):
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta["tokenizer.ggml.token_type"].tolist()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False) for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    )
    return tokenizer


def _sentencepiece(meta):
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        raise UserError("sentencepiece GGUF tokenizers need transformers>=5: pip install -U transformers") from None
    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": meta["tokenizer.ggml.tokens"],
        "scores": meta["tokenizer.ggml.scores"].tolist(),
        "token_type": meta["tokenizer.ggml.token_type"].tolist(),
    }
    if "tokenizer.ggml.merges" in meta:
        tokenizer_dict["merges"] = meta["tokenizer.ggml.merges"]
    tokenizer, _ = convert_gguf_tokenizer(str(meta["general.architecture"]), tokenizer_dict)
    return tokenizer


BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece}


def _flag(meta, key, default):
    value = meta.get(f"tokenizer.ggml.{key}")
    return default if value is None else bool(value.item())


def tokenizer_from_gguf(meta) -> PreTrainedTokenizerFast:
    kind = str(meta.get("tokenizer.ggml.model", "?"))
    if kind not in BUILDERS:
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(BUILDERS)}")
    tokenizer = BUILDERS[kind](meta)
    bos = _token(meta, "bos_token_id")
    if bos is not None and _flag(meta, "add_bos_token", kind == "llama"):
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=_token(meta, "eos_token_id"),
        unk_token=_token(meta, "unknown_token_id"),
        pad_token=_token(meta, "padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
