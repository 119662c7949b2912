"""Where does LoLA's passkey retrieval fail: does the needle leave the sparse cache, or is it in
the cache and not read? For each cache rule (LoLA options over the chat's conversion, the same
adapter), each passkey document (the eval task's own, at --lengths) is prefilled, the key decoded
greedily, and the share of the needle's key tokens in each layer's cache (over KV heads) read
when the question has been read. The original (mlx-lm, full attention) answers the same prompts.

    python bench/needle_cache.py --lengths 4096
    python bench/needle_cache.py --lengths 2048 --rules "shipped;from one distance:cache_span=0"
    python bench/needle_cache.py --lengths 8k,32k --rules "shipped;before:long_slots=0,cache_unique=0"
    python bench/needle_cache.py --task niah_multikey --lengths 1k,2k --original-up-to 0
    python bench/needle_cache.py --task niah_multikey --lengths 1k,2k,4k --documents 12 --rules shipped
    python bench/needle_cache.py --task niah_multikey --lengths 1k,2k --documents 8 --sink-horizon 8191 \
        --adapter /tmp/no-lora --rules "every key:horizon=0,slots=2048,cache_span=2048,cache_unique=0"

A rule is `name:option=value,...` (LoLA's slots, horizon, long_slots, cache_unique, cache_half_life, cache_span,
sinks_in_state) over the adapter's
conversion.json; a name alone is that conversion as it is. `--adapter`: another LoLCATs/LoLA
adapter folder with its conversion.json (a training run's folder, once one is written there).
`--task`: another retrieval task of `eval` (RULER's `niah_multikey`, ...): its needle is the
answer's tokens; a haystack of text (`niah_multikey:wikitext2`) is read from --data-dir.
`--sink-horizon N`: every rule converted with `convert --sink-horizon N` (8191: the sinks read where
they lie, as the original reads them, to SmolLM2's context). Writes bench/results/needle_cache.json.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, write_json  # noqa: E402  (loads the BLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import mlx_linear  # noqa: E402
from mlx_linear.chat.model import CONVERSION_FILE, bundled_adapter  # noqa: E402
from mlx_linear.convert import bundled_model  # noqa: E402
from mlx_linear.convert.cli import parse_options  # noqa: E402
from mlx_linear.eval.cli import parse_lengths  # noqa: E402
from mlx_linear.eval.scoring import Scorer, encode_pair  # noqa: E402
from mlx_linear.errors import UserError  # noqa: E402
from mlx_linear.eval.tasks import Retrieval, get_task  # noqa: E402
from mlx_linear.progress import Progress  # noqa: E402

RULES = "shipped;no horizon:horizon=0;every key kept:horizon=0,slots=4096,cache_span=4096"


def parse_rules(text):
    """[(name, {option: value})] from 'name:opt=v,opt=v;name2...', values as `convert` reads them."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, options = part.partition(":")
        rules.append((name, parse_options([o for o in options.split(",") if o])))
    return rules


def greedy(model, tokens, steps):
    """The greedy continuation of `tokens` (ids) and the cache after the prompt's last token."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(tokens)[None], cache=cache)
    mx.eval(logits, [c.state for c in cache])
    after_prompt = [[np.array(x) for x in c.caches[0].cache] if hasattr(c, "caches") else None for c in cache]
    out = [logits[0, -1].argmax().item()]
    while len(out) < steps:
        out.append(model(mx.array([[out[-1]]]), cache=cache)[0, -1].argmax().item())
    return out, after_prompt


def needle_share(states, spots):
    """Per layer, the share of (needle token, KV head) pairs whose key is in LoLA's cache."""
    shares = []
    for state in states:
        positions = state[-1][0]  # (Hkv, slots); -1: an empty slot
        shares.append(float(np.mean([np.isin(spots, head) for head in positions])))
    return shares


def run(model, tokenizer, documents, label):
    rows, progress = [], Progress(len(documents), "doc", label)
    for doc in documents:
        tokens, key = encode_pair(tokenizer, doc["context"], doc["answer"])  # as the eval scores it
        spots = [i + j for i in range(len(tokens) - len(key)) if tokens[i : i + len(key)] == key for j in range(len(key))]
        answer, states = greedy(model, tokens, len(key))
        row = {"length": doc["length"], "needle_at": spots[0] if spots else None, "found": answer == key,
               "said": tokenizer.decode(answer), "answer": tokenizer.decode(key)}
        if states[0] is not None:
            row["in_cache"] = needle_share(states, spots)
        rows.append(row)
        progress.update(1)
    progress.close()
    return rows


def summary(rows):
    if not rows:
        return "not run"
    found = sum(r["found"] for r in rows)
    text = f"{found}/{len(rows)}"
    if "in_cache" in rows[0]:
        text += f" (needle in cache {np.mean([np.mean(r['in_cache']) for r in rows]):.0%})"
    return text


def converted_rules(args):
    """(adapter, its conversion, {rule: (options, converted folder)}), every rule converted up
    front, so a bad option or adapter fails at once, in one line."""
    adapter = Path(args.adapter or bundled_adapter())
    conversion_file = adapter / CONVERSION_FILE
    if not conversion_file.is_file():
        raise UserError(f"--adapter {adapter}: no {CONVERSION_FILE} there; give an adapter folder that has one (the chat's does)")
    conversion = json.loads(conversion_file.read_text())
    if args.sink_horizon is not None:
        conversion["sink_horizon"] = args.sink_horizon
    rules = {name: (options, bundled_model(**{**conversion, "options": {**conversion.get("options", {}), **options}}))
             for name, options in parse_rules(args.rules)}
    return adapter, conversion, rules


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096", help="prompt lengths in tokens, e.g. 2k,4096")
    parser.add_argument("--rules", default=RULES)
    parser.add_argument("--adapter", help="adapter folder with its conversion.json [the chat's]")
    parser.add_argument("--original-up-to", type=int, default=8192,
                        help="the original answers prompts up to this length (its trained context; it is quadratic)")
    parser.add_argument("--task", default="passkey", help="a retrieval task of eval: passkey, niah_multikey, ...")
    parser.add_argument("--documents", type=int, help="documents a length [the task's own, 4]: more for a finer share")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="where a text haystack is read [../shared/data]")
    parser.add_argument("--sink-horizon", type=int, help="convert every rule with this --sink-horizon [the adapter's]")
    parser.add_argument("--name", default="needle_cache")
    args = parser.parse_args()
    try:
        task = get_task(args.task)
        if not isinstance(task, Retrieval):
            raise UserError(f"--task {args.task}: not a retrieval task; give passkey, niah_multikey or another with one answer")
        task.check(args.data_dir)
        task.lengths = parse_lengths(args.lengths)
        if args.documents is not None:
            if args.documents < 1 or not hasattr(task, "per_length"):
                raise UserError(f"--documents {args.documents}: give at least 1, for a RULER task "
                                "(passkey has one document a depth)")
            task.per_length = args.documents  # the first 4 at the first length are the task's own
        adapter, conversion, rules = converted_rules(args)
    except UserError as error:
        parser.error(str(error))
    result = {"task": task.name, "adapter": str(adapter), "conversion": conversion, "lengths": task.lengths, "rules": {}}
    original, tokenizer = mlx_linear.load(bundled_model("none"))
    documents = list(task.documents(args.data_dir, Scorer(original, tokenizer)))
    result["original"] = run(original, tokenizer, [d for d in documents if d["length"] <= args.original_up_to], "original")
    for name, (options, folder) in rules.items():
        model, tokenizer = mlx_linear.load(folder, adapter_path=adapter, fuse_adapter=True)
        result["rules"][name] = {"options": options, "documents": run(model, tokenizer, documents, name)}
    print("| rule | " + " | ".join(f"{n} tokens" for n in task.lengths) + " |\n|---|" + "---|" * len(task.lengths))
    by_length = lambda rows, n: [r for r in rows if r["length"] == n]  # noqa: E731
    for name, rows in [("original (mlx-lm)", result["original"])] + [(k, v["documents"]) for k, v in result["rules"].items()]:
        print(f"| {name} | " + " | ".join(summary(by_length(rows, n)) for n in task.lengths) + " |")
    print(f"wrote {write_json(args.name, result)}")


if __name__ == "__main__":
    main()
