"""Peak memory and wall time of `mlx_linear convert` beside `mlx_lm.convert`, same checkpoint, same run.

The checkpoint is generated: random bf16 weights at the exact shapes of Llama-3.2-1B (or
Mistral-7B-v0.1 with --shape 7b), sharded with an index as the hub ships them.

    python bench/convert_memory.py [--shape 1b|7b] [--shard-gb 1] [--folder DIR] [--keep]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_json

import mlx.core as mx

LLAMA_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
MISTRAL_7B = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 32000, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 32768, "sliding_window": 4096, "torch_dtype": "bfloat16",
}
SHAPES = {"1b": LLAMA_1B, "7b": MISTRAL_7B}


def tensor_shapes(config):
    """HF tensor names and shapes of a llama-style checkpoint."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def write_shard(path, shapes):
    weights = {name: (0.02 * mx.random.normal(shape)).astype(mx.bfloat16) for name, shape in shapes.items()}
    mx.save_safetensors(str(path), weights, {"format": "pt"})


def write_checkpoint(folder, config, shard_bytes=2**30, tokenizer=None):
    """A random bf16 HF checkpoint, one shard in memory at a time; returns its size in bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(config).items():
        current[name] = shape
        size += 2 * math.prod(shape)
        if size >= shard_bytes * (len(shards) + 1):
            shards, current = shards + [current], {}
    shards += [current] if current else []
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (tokenizer or bundled_tokenizer()).save_pretrained(str(folder))
    return size


def bundled_tokenizer():
    """SmolLM2's tokenizer from the bundled GGUF: any tokenizer serves a random model."""
    from mlx_linear.convert import bundled_gguf
    from mlx_linear.convert.tokenizer import tokenizer_from_gguf

    _, metadata = mx.load(str(bundled_gguf()), return_metadata=True)
    return tokenizer_from_gguf(metadata)


def measure(command):
    """(seconds, peak resident bytes) of a command run as a child of its own."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024  # kilobytes on Linux


def commands(source, output, quantize):
    """tool -> command line converting `source` into `output` (the default liger-gla for ours)."""
    ours = [sys.executable, "-m", "mlx_linear", "convert", "--hf", str(source), "-o", str(output)]
    mlx_lm = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(output)]
    return {"mlx_linear convert": ours + ["--quantize"] * quantize, "mlx_lm.convert": mlx_lm + ["-q"] * quantize}


def run(source, source_bytes, root):
    rows, output = [], root / "output"
    for quantize in (True, False):
        for tool, command in commands(source, output, quantize).items():
            seconds, peak = measure(command)
            written = sum(f.stat().st_size for f in output.glob("*.safetensors"))
            shutil.rmtree(output)
            rows.append({"tool": tool, "quantize": quantize, "seconds": seconds, "peak_rss_gib": peak / 2**30,
                         "output_gb": written / 1e9, "source_gb": source_bytes / 1e9})
            print(f"{tool:20s} {'4-bit' if quantize else 'bf16':6s} {seconds:7.1f} s  peak {peak / 2**30:6.2f} GiB  "
                  f"output {written / 1e9:5.2f} GB  (source {source_bytes / 1e9:.2f} GB)", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--folder", type=Path, help="Where the checkpoint goes [a temporary folder].")
    parser.add_argument("--keep", action="store_true", help="Keep the generated checkpoint.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.folder))
    try:
        start = time.perf_counter()
        source_bytes = write_checkpoint(root / "source", SHAPES[args.shape], int(args.shard_gb * 2**30))
        print(f"generated a {args.shape} checkpoint, {source_bytes / 1e9:.2f} GB, in {time.perf_counter() - start:.0f} s")
        rows = run(root / "source", source_bytes, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    path = write_json(f"convert_memory_{args.shape}", {"shape": args.shape, "config": SHAPES[args.shape], "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
