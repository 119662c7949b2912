"""Conversion of HF and GGUF checkpoints, checked against mlx-lm's own models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model

import mlx_linear
from mlx_linear.convert import convert
from mlx_linear.convert.gguf import unpermute
from mlx_linear.errors import UserError

from conftest import TINY_CONFIGS, TINY, tiny_tokenizer, write_hf_checkpoint

TOKENS = mx.array([[3, 17, 250, 9, 101, 44, 7, 300, 12, 5, 61, 2]])


def quiet(*args, **kwargs):
    return convert(*args, log=lambda m: None, **kwargs)


@pytest.mark.parametrize("model_type", TINY_CONFIGS)
def test_method_none_matches_mlx_lm(hf_checkpoints, tmp_path, model_type):
    out = quiet(tmp_path / "none", hf_source=str(hf_checkpoints[model_type]), method="none")
    model, tokenizer = mlx_linear.load(out)
    reference, _ = load_model(hf_checkpoints[model_type])
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-5).item()
    assert tokenizer.encode("the thin") == tiny_tokenizer().encode("the thin")


@pytest.mark.parametrize("method", ["liger-gla", "lolcats", "lola", "liger-hgrn2", "liger-gsa"])
@pytest.mark.parametrize("model_type", TINY_CONFIGS)
def test_liger_converts_and_runs(hf_checkpoints, tmp_path, model_type, method):
    out = quiet(tmp_path / "liger", hf_source=str(hf_checkpoints[model_type]), full_attention_every=2, method=method)
    config = json.loads((out / "config.json").read_text())
    assert config["linearization"] == {"method": method, "window": 64, "sinks": 0, "sink_horizon": 0, "full_attention_every": 2,
                                       "options": {}}
    model, _ = mlx_linear.load(out)
    logits = model(TOKENS)
    assert logits.shape == (1, TOKENS.shape[1], TINY["vocab_size"]) and mx.isfinite(logits).all().item()
    # Same weights as the original, different attention (LoLCATs, LoLA: the same inside the window).
    reference, _ = load_model(hf_checkpoints[model_type])
    assert mx.allclose(logits, reference(TOKENS), atol=1e-3).item() == (method in ("lolcats", "lola") and TOKENS.shape[1] <= 64)
    model.use_softmax_attention(True)
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-5).item()


def test_stock_mlx_lm_loads_the_folder(hf_checkpoints, tmp_path):
    out = quiet(tmp_path / "liger", hf_source=str(hf_checkpoints["llama"]))
    model, _ = mlx_linear.load(out)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(out)  # the folder's model_file is what builds it
    stock, _ = load_model(out, trust_remote_code=True)
    assert mx.allclose(stock(TOKENS), model(TOKENS), atol=1e-5).item()


def test_quantized_conversion(hf_checkpoints, tmp_path):
    out = quiet(tmp_path / "q", hf_source=str(hf_checkpoints["llama"]), quantize=True, q_bits=8, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    model, _ = mlx_linear.load(out, dequantize=False)  # on the CPU, load dequantizes by default
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    full, _ = mlx_linear.load(quiet(tmp_path / "f", hf_source=str(hf_checkpoints["llama"])))
    assert mx.allclose(model(TOKENS), full(TOKENS), atol=0.05).item()


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp():
    w = mx.arange(8 * 4 * 3).reshape(8 * 4, 3)
    assert mx.array_equal(unpermute(llama_cpp_permute(w, 4), 4), w).item()
    assert not mx.array_equal(llama_cpp_permute(w, 4), w).item()


def write_gguf(hf_folder, path):
    """The tiny llama checkpoint as llama.cpp would write it (F32, permuted q/k, BPE metadata)."""
    from mlx_linear.convert.gguf import BLOCK, TOP_LEVEL

    to_gguf = {v: k for k, v in TOP_LEVEL.items()} | {v: k for k, v in BLOCK.items()}
    config = json.loads((hf_folder / "config.json").read_text())
    tensors = {}
    for name, w in mx.load(str(hf_folder / "model.safetensors")).items():
        stem, suffix = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, index, part = stem.split(".", 3)
            gguf = f"blk.{index}.{to_gguf[part]}.{suffix}"
        else:
            gguf = f"{to_gguf[stem]}.{suffix}"
        if "attn_q." in gguf:
            w = llama_cpp_permute(w, config["num_attention_heads"])
        if "attn_k." in gguf:
            w = llama_cpp_permute(w, config["num_key_value_heads"])
        tensors[gguf] = w
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + ["<|im_start|>", "<|im_end|>"]
    tokens += [f"[PAD{i}]" for i in range(config["vocab_size"] - len(tokens))]
    u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"]),
        "llama.rope.freq_base": mx.array(config["rope_theta"]),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.token_type": mx.array([1] * (len(vocab)) + [3, 3] + [1] * (len(tokens) - len(vocab) - 2), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(len(vocab)),
        "tokenizer.ggml.eos_token_id": u32(len(vocab) + 1),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    mx.save_gguf(str(path), tensors, meta)
    return path


def test_gguf_matches_the_hf_original(hf_checkpoints, tmp_path):
    gguf = write_gguf(hf_checkpoints["llama"], tmp_path / "tiny.gguf")
    out = quiet(tmp_path / "none", gguf=str(gguf), method="none", dtype=mx.float32)
    model, tokenizer = mlx_linear.load(out)
    reference, _ = load_model(hf_checkpoints["llama"])
    assert mx.allclose(model(TOKENS), reference(TOKENS), atol=1e-5).item()
    assert tokenizer.encode("the thin") == tiny_tokenizer().encode("the thin")
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_token_id]


# Bad input: one line naming the problem, non-zero exit, no partial output.


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_linear", "convert", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()  # progress lines, then the error
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("Error:") and sum(l.startswith("Error:") for l in lines) == 1, result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def test_missing_path(tmp_path):
    assert_one_line_error(cli("--hf", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "no such folder")
    assert_one_line_error(cli("--gguf", str(tmp_path / "x.gguf"), "-o", str(tmp_path / "o")), "not found")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "gemma", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    result = cli("--hf", str(folder), "-o", str(tmp_path / "o"))
    assert_one_line_error(result, "gemma2", "llama", "qwen3")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", "llama")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("--hf", str(folder), "-o", str(tmp_path / "o")), "model.safetensors")
    assert not (tmp_path / "o").exists() and list(tmp_path.glob(".o*")) == []


def test_corrupt_gguf(tmp_path, hf_checkpoints):
    gguf = write_gguf(hf_checkpoints["llama"], tmp_path / "t.gguf")
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(cli("--gguf", str(gguf), "-o", str(tmp_path / "o")), "t.gguf")
    (tmp_path / "g.gguf").write_bytes(b"not a gguf" * 50)
    assert_one_line_error(cli("--gguf", str(tmp_path / "g.gguf"), "-o", str(tmp_path / "o")), "g.gguf")
    assert not (tmp_path / "o").exists()


def test_offline_hub_id(tmp_path):
    assert_one_line_error(cli("--hf", "mistralai/Mistral-7B-v0.1", "-o", str(tmp_path / "o")), "offline")
    here = subprocess.run([sys.executable, "-m", "mlx_linear", "convert", "--hf", "mistralai/Mistral-7B-v0.1", "-o", ".",
                           "--force"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_one_line_error(here, "cannot download")  # a hub id is no local source that -o could replace


def test_existing_output_needs_force(hf_checkpoints, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert_one_line_error(cli("--hf", str(hf_checkpoints["llama"]), "-o", str(out)), "--force")
    result = cli("--hf", str(hf_checkpoints["llama"]), "-o", str(out), "--force")  # an empty folder
    assert result.returncode == 0, result.stderr
    result = cli("--hf", str(hf_checkpoints["llama"]), "--method", "none", "-o", str(out), "--force")  # an earlier output
    assert result.returncode == 0, result.stderr
    assert "linearization" not in json.loads((out / "config.json").read_text())


def test_force_never_replaces_other_files(hf_checkpoints, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("mine")
    (precious / "config.json").write_text('{"model_type": "llama"}')  # not this tool's
    assert_one_line_error(cli("--hf", str(hf_checkpoints["llama"]), "-o", str(precious), "--force"), "not a converted model")
    assert (precious / "thesis.txt").read_text() == "mine"
    source = hf_checkpoints["llama"]
    assert_one_line_error(cli("--hf", str(source), "-o", str(source.parent), "--force"), "source")
    assert (source / "model.safetensors").is_file()
    assert list(tmp_path.glob(".*")) == []


def test_output_dot_and_stale_partials(hf_checkpoints, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / ".work.killed.partial").mkdir()  # left by a SIGKILLed run
    result = subprocess.run([sys.executable, "-m", "mlx_linear", "convert", "--hf", str(hf_checkpoints["llama"]),
                             "-o", ".", "--force"], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (work / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["work"]


SLOW_WRITE = """
import importlib, sys, time
utils = importlib.import_module("mlx_linear.utils")
def save_model(folder, model, **kwargs):
    (folder / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(120)
utils.save_model = save_model
from mlx_linear.cli import main
sys.argv = ["mlx_linear", "convert", *sys.argv[1:]]
main()
"""


def test_sigterm_while_writing_leaves_nothing(hf_checkpoints, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITE)
    child = subprocess.Popen([sys.executable, str(script), "--hf", str(hf_checkpoints["llama"]), "-o", str(tmp_path / "o")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    assert list(tmp_path.glob(".o.*.partial"))
    child.terminate()
    assert child.wait(timeout=60) != 0
    assert "Traceback" not in child.stderr.read()
    assert not (tmp_path / "o").exists() and list(tmp_path.glob(".o*")) == []


def test_converting_a_converted_folder_starts_from_the_original(hf_checkpoints, tmp_path):
    source = str(hf_checkpoints["llama"])
    liger = quiet(tmp_path / "liger", hf_source=source, window=8, options={"learned_mix": True})
    again = quiet(tmp_path / "again", hf_source=str(liger), window=16)
    assert json.loads((again / "config.json").read_text())["linearization"]["window"] == 16
    none = quiet(tmp_path / "none", hf_source=str(liger), method="none")
    assert "linearization" not in json.loads((none / "config.json").read_text())
    reference, _ = load_model(hf_checkpoints["llama"])
    assert mx.allclose(mlx_linear.load(none)[0](TOKENS), reference(TOKENS), atol=1e-5).item()
    quantized = quiet(tmp_path / "q", hf_source=source, quantize=True, q_group_size=32)
    assert_one_line_error(cli("--hf", str(quantized), "-o", str(tmp_path / "o")), "quantized", "original")


def test_group_size_that_does_not_divide_a_layer(hf_checkpoints, tmp_path):
    result = cli("--hf", str(hf_checkpoints["llama"]), "--quantize", "--q-group-size", "128", "-o", str(tmp_path / "o"))
    assert_one_line_error(result, "--q-group-size 128", "64")
    assert not (tmp_path / "o").exists()


def test_full_disk(hf_checkpoints, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import mlx_linear.utils

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="GB free"):
        quiet(tmp_path / "o", hf_source=str(hf_checkpoints["llama"]))
    monkeypatch.undo()

    def fill_up(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlx_linear.utils, "save_model", fill_up)
    with pytest.raises(UserError, match="disk filled up"):
        quiet(tmp_path / "o", hf_source=str(hf_checkpoints["llama"]))
    assert list(tmp_path.iterdir()) == []


def test_mismatched_weights_are_a_user_error(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="do not fit"):
        quiet(tmp_path / "o", hf_source=str(folder))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,option,words", [
    ("supra", "mx=0.5", ["no option 'mx'", "mix"]),
    ("supra", "mix=abc", ["mix='abc'", "a number"]),
    ("supra", "mix=2", ["mix=2", "(0, 1]"]),
    ("liger-gla", "normalize=yes", ["normalize='yes'", "true or false"]),
    ("liger-gla", "gate_normalizer=0", ["gate_normalizer=0", "positive"]),
    ("lolcats", "window_factor=1", ["window_factor=1", "between 0 and 1"]),
    ("lolcats", "mix=0.5", ["no option 'mix'", "window_factor"]),
    ("lolcats", "feature_dim=100", ["feature_dim=100", "whole number to"]),
    ("lola", "slots=0", ["slots=0", "whole number"]),
    ("lola", "half_life=-1", ["half_life=-1", "number of tokens"]),
    ("lola", "mix=0.5", ["no option 'mix'",
                         "slots, horizon, long_slots, cache_half_life, cache_span, cache_unique, sinks_in_state, window_factor"]),
    ("lola", "sinks_in_state=1", ["sinks_in_state=1", "true or false"]),
    ("lola", "cache_half_life=-1", ["cache_half_life=-1", "number of tokens"]),
    ("lola", "cache_span=-1", ["cache_span=-1", "whole number of positions"]),
    ("lola", "cache_unique=1", ["cache_unique=1", "a cosine"]),
    ("lola", "long_slots=65", ["long_slots=65", "0 to slots (64)"]),
    ("lola", "horizon=-5", ["horizon=-5", "whole number of tokens"]),
    ("liger-hgrn2", "slots=4", ["no option 'slots'", "its options: mix, learned_mix"]),
    ("liger-hgrn2", "mix=1", ["mix=1", "strictly between 0 and 1"]),
    ("liger-gsa", "slots=-4", ["slots=-4", "whole number"]),
    ("liger-gsa", "slots=2.5", ["slots=2.5", "whole number"]),
    ("liger-gsa", "pool_size=8", ["no option 'pool_size'", "slots, mix, learned_mix"]),
    ("liger-gsa", "mix=0", ["mix=0", "strictly between 0 and 1"]),
])
def test_bad_method_options(hf_checkpoints, tmp_path, method, option, words):
    result = cli("--hf", str(hf_checkpoints["llama"]), "--method", method, "--method-option", option, "-o", str(tmp_path / "o"))
    assert_one_line_error(result, *words)
    assert not (tmp_path / "o").exists()


PEAK_MEMORY = """
import json, sys
import mlx_linear
import mlx_lm.utils, transformers  # noqa: F401  (imported before measuring)
from mlx_linear.convert import convert

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
start = status("VmRSS")
convert(sys.argv[2], hf_source=sys.argv[1], quantize=True, log=lambda m: None)
print(json.dumps({"growth": status("VmHWM") - start}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures resident memory through Linux's /proc")
def test_conversion_peak_memory_is_well_under_the_source_size(tmp_path):
    """A bf16 sharded checkpoint of 285 MB converts to 4 bits (80 MB) without holding the source."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from convert_memory import LLAMA_1B, write_checkpoint

    shape = {**LLAMA_1B, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8, "vocab_size": 16384,
             "num_attention_heads": 16}
    source_bytes = write_checkpoint(tmp_path / "source", shape, shard_bytes=2**27, tokenizer=tiny_tokenizer())
    assert len(list((tmp_path / "source").glob("model-*.safetensors"))) == 3
    script = tmp_path / "peak.py"
    script.write_text(PEAK_MEMORY)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "source"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.splitlines()[-1])["growth"]
    assert growth < 0.7 * source_bytes, (growth, source_bytes)
