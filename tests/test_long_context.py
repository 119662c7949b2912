"""The long-context view of `mlx_linear eval`: perplexity by position, the state switched off,
the state's share of the gap, and passkey retrieval beyond the window."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_linear.cli import cli
from mlx_linear.convert import convert
from mlx_linear.eval.report import state_share, state_table
from mlx_linear.eval.scoring import Scorer, encode_pair
from mlx_linear.eval.tasks import get_task

from conftest import tiny_model, tiny_tokenizer

WORDS = "the cat sat in the house then it rained on the thin roof and the dog ran".split()


def word_text(n, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def test_perplexity_by_position_matches_a_hand_count():
    """Overlapping windows (stride 100 of 300): every scored prediction's bucket is its position in its window."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    scorer = Scorer(model, tokenizer, window=300, stride=100)
    task = get_task("wikitext2")
    tokens = scorer.encode(word_text(250))
    spans = scorer.perplexity_spans(tokens)
    metrics = task.aggregate([task.process(scorer, (tokens, span)) for span in spans])
    buckets = {"0-64": [], "64-256": [], "256-1k": []}
    for begin, end, scored in spans:
        logits = np.array(model(mx.array(tokens[begin:end])[None])[0], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for i in range(end - begin - scored, end - begin):
            name = "0-64" if i < 64 else "64-256" if i < 256 else "256-1k"
            buckets[name].append(-logp[i, tokens[begin + i + 1]])
    for name, nlls in buckets.items():
        assert metrics[f"ppl@{name}"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-4)
    assert metrics["ppl"] == pytest.approx(math.exp(np.mean(sum(buckets.values(), []))), rel=1e-4)
    assert "ppl@1k-4k" not in metrics  # no prediction that far into a window


def test_passkey_documents_and_greedy_scoring():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    scorer, task = Scorer(model, tokenizer), get_task("passkey")
    docs = list(task.documents(None, scorer))
    assert len(docs) == len(task.lengths) * len(task.depths)
    filler = len(scorer.encode(task.filler))
    for doc in docs:
        tokens = scorer.encode(doc["context"])
        assert abs(len(tokens) - doc["length"]) <= filler
        after_needle = doc["context"].split(f"{doc['key']} is the pass key.")[1]
        assert len(scorer.encode(after_needle)) > 64  # beyond the window
    doc = docs[0]
    context, answer = encode_pair(tokenizer, doc["context"], " " + doc["key"])
    logits = np.array(model(mx.array(context + answer[:-1])[None])[0])
    greedy = all(logits[len(context) - 1 + i].argmax() == t for i, t in enumerate(answer))
    assert task.process(scorer, doc) == {"acc": float(greedy), "length": doc["length"]}
    scores = [{"acc": 1.0, "length": 512}, {"acc": 0.0, "length": 512}, {"acc": 1.0, "length": 4096}]
    assert task.aggregate(scores) == {"acc": 2 / 3, "acc@512": 0.5, "acc@4k": 1.0}


def test_state_share_by_hand():
    model = {"w": {"ppl": 30.0, "ppl@64-256": 20.0}, "p": {"acc": 0.5}}
    off = {"w": {"ppl": 40.0, "ppl@64-256": 30.0}, "p": {"acc": 0.25}}
    base = {"w": {"ppl": 20.0, "ppl@64-256": 30.0}, "p": {"acc": 1.0}}
    assert state_share(model, off, base) == {"w": {"ppl": 0.5, "ppl@64-256": None}, "p": {"acc": 1 / 3}}
    table = state_table(model, off, base)
    assert "| w | ppl | 30.00 | 40.00 | 20.00 | 50.0% |" in table and "| p | acc | 0.5000 | 0.2500 | 1.0000 | 33.3% |" in table


@pytest.fixture(scope="module")
def converted(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    quiet = dict(hf_source=str(hf_checkpoints["llama"]), log=lambda m: None)
    data = root / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "wiki.test.raw.lf.txt").write_text(word_text(400, seed=1))
    linearized = {method: convert(root / method, window=8, method=method, **quiet)
                  for method in ("liger-gla", "liger-hgrn2", "liger-gsa")}
    return linearized, convert(root / "none", method="none", **quiet), root / "data"


@pytest.mark.parametrize("method", ["liger-gla", "liger-hgrn2", "liger-gsa"])
def test_cli_reports_the_state_switched_off(converted, tmp_path, method):
    linearized, none, data = converted
    liger = linearized[method]
    out = tmp_path / "r.json"
    args = ["eval", "--model", liger, "--baseline", none, "--no-state", "--tasks", "wikitext2", "--data-dir", data,
            "--window", 100, "-o", out]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    on, off, base = (report[k]["wikitext2"] for k in ("model", "state_off", "baseline"))
    assert off["ppl@0-64"] != on["ppl@0-64"] and set(on) == {"ppl", "ppl@0-64", "ppl@64-256"}
    share = report["state_share"]["wikitext2"]["ppl@64-256"]
    assert share == pytest.approx((on["ppl@64-256"] - off["ppl@64-256"]) / (base["ppl@64-256"] - off["ppl@64-256"]))
    assert "| wikitext2 | ppl@64-256 |" in result.stdout and "state share" in result.stdout


def test_no_state_on_an_original_is_one_line(converted):
    _, none, data = converted
    result = CliRunner().invoke(cli, ["eval", "--model", str(none), "--no-state", "--tasks", "wikitext2",
                                      "--data-dir", str(data)])
    assert result.exit_code != 0 and "has no linearized layers" in result.output
