"""GGUF files (llama.cpp) as Hugging Face-style config, weights and tokenizer."""

from pathlib import Path

import mlx.core as mx

from mlx_linear.errors import UserError

from .tokenizer import tokenizer_from_gguf

# general.architecture -> HF model_type (llama.cpp writes Mistral as "llama").
GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1 and Q8_0 blocks


def hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part not in BLOCK:
            raise UserError(f"GGUF tensor {name!r} has no counterpart in the supported architectures")
        return f"model.layers.{index}.{BLOCK[part]}.{suffix}"
    if stem not in TOP_LEVEL:
        raise UserError(f"GGUF tensor {name!r} has no counterpart in the supported architectures")
    return f"{TOP_LEVEL[stem]}.{suffix}"


def unpermute(w, n_heads):
    """Undo the row order llama.cpp gives q/k for its interleaved RoPE."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensors, stem):
    w, scales, biases = (tensors[f"{stem}.{s}"] for s in ("weight", "scales", "biases"))
    bits = w.shape[-1] // scales.shape[-1]
    return mx.dequantize(w, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)


def _value(meta, key, default=None):
    if key not in meta:
        if default is None:
            raise UserError(f"GGUF metadata lacks {key!r}: the file is incomplete or not a language model")
        return default
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def gguf_config(meta, tensors) -> dict:
    arch = str(meta.get("general.architecture", "?"))
    if arch not in GGUF_MODEL_TYPES:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_MODEL_TYPES))}")
    heads = int(_value(meta, f"{arch}.attention.head_count"))
    hidden = int(_value(meta, f"{arch}.embedding_length"))
    config = {
        "model_type": GGUF_MODEL_TYPES[arch],
        "hidden_size": hidden,
        "intermediate_size": int(_value(meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_value(meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(meta, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_value(meta, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(f'{_value(meta, f"{arch}.attention.layer_norm_rms_epsilon"):.6g}'),
        "rope_theta": float(_value(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_value(meta, f"{arch}.context_length", 4096)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    scaling = str(_value(meta, f"{arch}.rope.scaling.type", "none"))
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_value(meta, f"{arch}.rope.scaling.factor"))}
    elif scaling != "none" or "rope_freqs.weight" in tensors:
        raise UserError(f"GGUF RoPE scaling ({scaling}, or rope_freqs) is not supported: convert from the HF folder with --hf")
    return config


def read_gguf(path):
    """(config, weights with HF names, tokenizer) from a GGUF file; quantized tensors dequantized."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found: check the path")
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): download the file again, or use F16/Q8_0/Q4_0/Q4_1 types") from e
    config = gguf_config(meta, tensors)
    tensors.pop("rope_freqs.weight", None)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for name in tensors:
        stem, suffix = name.rsplit(".", 1)
        if suffix in ("scales", "biases"):
            continue
        w = dequantize(tensors, stem) if f"{stem}.scales" in tensors else tensors[name]
        part = stem.rsplit(".", 1)[-1]
        if config["model_type"] == "llama" and part in heads:
            w = unpermute(w, heads[part])
        weights[hf_name(name)] = w
    return config, weights, tokenizer_from_gguf(meta)
