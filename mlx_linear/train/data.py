"""Training data: mlx-lm's formats, packed into fixed-length sequences and mixed by weight.

A source is a JSONL (or JSON list) file, or a folder with train.jsonl (and valid.jsonl), or a
folder of *.jsonl files. Records are `text`, `messages` (chat) or `prompt`/`completion`,
tokenized by mlx-lm's dataset classes; chat and completions train on the response only.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from mlx_lm.tuner.datasets import create_dataset

from ..errors import UserError
from ..files import read_records

FORMATS = {"text": ("text",), "chat": ("messages",), "completions": ("prompt", "completion")}


def record_format(path, records) -> str:
    for name, keys in FORMATS.items():
        if all(k in records[0] for k in keys):
            for number, record in enumerate(records, 1):
                if not all(k in record for k in keys):
                    raise UserError(f"{path}: record {number} lacks {'/'.join(keys)} (the first record has them)")
                problem = record_problem(name, record)
                if problem:
                    raise UserError(f"{path}: record {number}: {problem}: fix or remove that record")
            return name
    raise UserError(f"{path}: records need 'text', 'messages' or 'prompt'+'completion' keys, as mlx-lm's formats")


def record_problem(kind, record):
    """What makes a record untrainable (mlx-lm would crash on it or learn nothing), or None."""
    if kind == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            return "'messages' must be a list of {\"role\": ..., \"content\": ...} objects with text content"
        if not any(m["role"] == "assistant" for m in messages):
            return "has no assistant message (chat data trains on the replies)"
        return None
    for key in FORMATS[kind]:
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, not {type(record[key]).__name__}"
    if not record[FORMATS[kind][-1]].strip():
        return f"{FORMATS[kind][-1]!r} is empty"
    return None


@dataclass
class Source:
    path: str
    kind: str
    train: list
    valid: list
    weight: float = 1.0


def load_source(path, weight=1.0, valid_fraction=0.01, max_valid=64, seed=0) -> Source:
    """Read a source; without a valid split, hold out a small deterministic part of it."""
    path = Path(path).expanduser()
    valid = []
    if path.is_dir() and (path / "train.jsonl").is_file():
        train = read_records(path / "train.jsonl")
        if (path / "valid.jsonl").is_file():
            valid = read_records(path / "valid.jsonl")
    elif path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"{path}: no train.jsonl and no *.jsonl files in the folder")
        train = [r for f in files for r in read_records(f)]
    elif path.is_file():
        train = read_records(path)
    else:
        raise UserError(f"{path}: no such file or folder: check --data")
    if not train:
        raise UserError(f"{path}: the data set is empty: give a file with at least one record")
    kind = record_format(path, train)
    if valid:
        record_format(path / "valid.jsonl", valid)
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_valid = min(max_valid, max(1, int(len(train) * valid_fraction))) if len(train) > 1 else 0
        held_out = set(order[:n_valid].tolist())
        valid = [train[i] for i in sorted(held_out)]
        train = [r for i, r in enumerate(train) if i not in held_out] if n_valid else train
    if not valid:
        raise UserError(f"{path}: one record cannot be split into train and valid: add records or a valid.jsonl")
    return Source(str(path), kind, train, valid, weight)


class Encoder:
    """Record -> (tokens, loss mask) through mlx-lm's dataset classes."""

    SAMPLES = {"text": {"text": ""}, "chat": {"messages": []}, "completions": {"prompt": "", "completion": ""}}

    def __init__(self, tokenizer, kind):
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("chat (messages) data needs a model with a chat template, and this one has none: "
                            "train it on text or prompt/completion records")
        config = SimpleNamespace(mask_prompt=kind != "text")
        self.dataset = create_dataset([self.SAMPLES[kind]], tokenizer, config)

    def __call__(self, record):
        tokens, offset = self.dataset.process(record)
        return tokens, [False] * offset + [True] * (len(tokens) - offset)


@dataclass
class Packer:
    """Cuts a stream of documents into sequences of seq_len + 1 tokens (one token overlaps)."""

    seq_len: int
    truncated: int = 0
    seen: set = field(default_factory=set)

    def pack(self, documents, truncate, pad_id=None):
        """With `pad_id`, a last partial sequence is padded (masked out) rather than dropped."""
        tokens, mask = [], []
        for doc_id, (t, m) in documents:
            if truncate and len(t) > self.seq_len + 1:
                t, m = t[: self.seq_len + 1], m[: self.seq_len + 1]
                if doc_id not in self.seen:  # count each document once, not once an epoch
                    self.seen.add(doc_id)
                    self.truncated += 1
            tokens += t
            mask += m
            while len(tokens) >= self.seq_len + 1:
                yield tokens[: self.seq_len + 1], mask[: self.seq_len + 1]
                tokens, mask = tokens[self.seq_len :], mask[self.seq_len :]
        if pad_id is not None and any(mask[1:]):
            pad = self.seq_len + 1 - len(tokens)
            yield tokens + [pad_id] * pad, mask + [False] * pad


def documents(records, encode, seed, epochs=None):
    """(index, encoded record) in a fresh seeded order each epoch; forever unless `epochs`."""
    epoch = 0
    while epochs is None or epoch < epochs:
        for i in np.random.default_rng(seed + epoch).permutation(len(records)):
            yield int(i), encode(records[i])
        epoch += 1


def sequences(sources, tokenizer, seq_len, seed=0, split="train", packer=None):
    """Packed (tokens, mask) sequences; training mixes the sources by weight, forever."""
    packer = packer or Packer(seq_len)
    streams = []
    for i, source in enumerate(sources):
        encode = Encoder(tokenizer, source.kind)
        records = source.train if split == "train" else source.valid
        docs = documents(records, encode, seed + 1000 * i, epochs=None if split == "train" else 1)
        pad_id = None if split == "train" else tokenizer.eos_token_id
        streams.append(packer.pack(docs, truncate=source.kind != "text", pad_id=pad_id))
    if split != "train":
        return streams
    return _mix(streams, [s.weight for s in sources], seed)


def _mix(streams, weights, seed):
    rng = random.Random(seed)
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights)[0]])
