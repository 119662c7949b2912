"""Hugging Face checkpoints: a hub id (downloaded when online) or a local folder."""

import glob
import json
import re
from pathlib import Path

import mlx.core as mx

from mlx_linear.errors import UserError
from mlx_linear.hub import download_error
from mlx_linear.files import read_safetensors

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def resolve(source: str) -> Path:
    """A local folder as is; a hub id through huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder: it needs config.json and model*.safetensors")
        return path
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: no such folder, and not a hub id like org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=DOWNLOAD_PATTERNS))
    except (OSError, EntryNotFoundError) as e:  # network and hub errors; a bug in our code stays a traceback
        fix = "download it on a connected machine and pass the folder to --hf"
        raise download_error(f"cannot download {source} from the Hugging Face hub", e, fix) from e


def read_weights(folder: Path) -> dict:
    files = sorted(glob.glob(str(folder / "model*.safetensors")))
    if not files:
        hint = " (.bin checkpoints: re-save them as safetensors)" if list(folder.glob("*.bin")) else ""
        raise UserError(f"no model*.safetensors in {folder}{hint}")
    weights = {}
    for f in files:
        weights.update(read_safetensors(f, "download it again"))
    return weights


def read_hf(folder: Path):
    """(config, weights, tokenizer, dtype) from a local HF folder."""
    from transformers import AutoTokenizer

    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({e})") from e
    config = config.get("text_config", config) if "model_type" not in config else config
    dtype = DTYPES.get(config.get("torch_dtype") or config.get("dtype"), mx.float16)
    weights = read_weights(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: {e}): add tokenizer.json") from e
    return config, weights, tokenizer, dtype
