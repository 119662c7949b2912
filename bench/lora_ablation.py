"""A copy of an adapter with its LoRA scaled or off, per target: what the LoRA does to a measure
(pass the copy to bench/needle_cache.py or bench/lola.py as --adapter). The method's parameters
(feature maps, mix) are kept as they are.

    python bench/lora_ablation.py --adapter mlx_linear/trained_adapters/smollm2-135m-instruct-lola --scale k=0 -o /tmp/no-k
    python bench/lora_ablation.py --adapter mlx_linear/trained_adapters/smollm2-135m-instruct-lola --scale all=0.5 -o /tmp/half
"""

import argparse
import shutil
from pathlib import Path

import mlx_linear  # noqa: F401  (first: the BLAS it loads)
import mlx.core as mx

from mlx_linear.adapters import ADAPTER_FILE, TARGETS, read_adapter_config, read_adapter_weights
from mlx_linear.errors import UserError
from mlx_linear.files import atomic_output


def parse_scales(text):
    """'q=0,k=0.5' or 'all=0' -> {module suffix: factor}."""
    scales = {}
    for item in text.split(","):
        target, _, factor = item.partition("=")
        names = sum(TARGETS.values(), []) if target == "all" else TARGETS.get(target)
        try:
            scales.update({name: float(factor) for name in names})
        except (TypeError, ValueError):
            raise UserError(f"--scale {item}: give target=factor, a target of all, {', '.join(TARGETS)}") from None
    return scales


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="an adapter folder")
    parser.add_argument("--scale", required=True, help="target=factor, comma-separated: q=0,k=0 or all=0.5")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the new adapter folder")
    parser.add_argument("--force", action="store_true", help="replace --output where it exists")
    args = parser.parse_args()
    try:
        scales = parse_scales(args.scale)
        read_adapter_config(args.adapter)  # a one-line error where it is no adapter folder
        weights = read_adapter_weights(args.adapter)
        scaled = {name: w * next((f for t, f in scales.items() if name.endswith(f"{t}.lora_b")), 1.0)
                  for name, w in weights.items()}  # the delta is x A B: scaling B scales it
        with atomic_output(args.output, args.force) as tmp:
            for extra in args.adapter.glob("*.json"):
                shutil.copy(extra, tmp)
            mx.save_safetensors(str(tmp / ADAPTER_FILE), scaled)
    except UserError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.output}: LoRA scaled {args.scale}")


if __name__ == "__main__":
    main()
