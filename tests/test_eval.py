"""`mlx_linear eval`: log-likelihoods against a full forward, branching, metrics, perplexity, bad input."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlx_linear
from mlx_linear.cli import cli
from mlx_linear.convert import convert
from mlx_linear.errors import UserError
from mlx_linear.eval import evaluate
from mlx_linear.eval.data import data_dir
from mlx_linear.eval.runner import run_task
from mlx_linear.eval.scoring import MODES, Scorer, encode, encode_pair, window_spans
from mlx_linear.eval.tasks import get_task, lower_is_better
from mlx_linear.model import base_architecture

from conftest import TINY_CONFIGS, TINY, tiny_model, tiny_tokenizer


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def full_forward(model, tokens):
    """Logits of one forward over the whole sequence, no cache: the oracle."""
    return np.array(model(mx.array(tokens)[None])[0], dtype=np.float64)


def oracle_score(model, context, continuation):
    logits = full_forward(model, context + continuation)
    rows = range(len(context) - 1, len(context) + len(continuation) - 1)
    logp = log_softmax(logits)
    ll = sum(logp[r, t] for r, t in zip(rows, continuation))
    return ll, all(logits[r].argmax() == t for r, t in zip(rows, continuation))


def greedy_tokens(model, context, n):
    tokens = list(context)
    for _ in range(n):
        tokens.append(int(full_forward(model, tokens)[-1].argmax()))
    return tokens[len(context) :]


def plain_llama():
    config = {"model_type": "llama", **TINY, **TINY_CONFIGS["llama"]}
    arch = base_architecture("llama")
    mx.random.seed(3)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def softmax_everywhere():
    model = tiny_model("llama")
    model.use_softmax_attention(True)
    return model


MODELS = {
    "liger": lambda: tiny_model("llama"),
    "liger-hybrid": lambda: tiny_model("qwen3", full_attention_every=2),
    "softmax-same-weights": softmax_everywhere,
    "mlx-lm-llama": plain_llama,
}


@pytest.mark.parametrize("name", MODELS)
def test_loglikelihoods_equal_log_softmax_of_a_full_forward(name):
    """Every scoring mode against the oracle; window 8, so context and continuations cross it."""
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    context = rng.integers(0, TINY["vocab_size"], 11).tolist()
    continuations = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (1, 3, 12)]
    continuations.append(greedy_tokens(model, context, 4))
    expected = [oracle_score(model, context, c) for c in continuations]
    assert [g for _, g in expected] == [False, False, False, True]
    for mode in MODES:
        got = Scorer(model, None, mode=mode).score_tokens([(context, c) for c in continuations])
        assert np.allclose([ll for ll, _ in got], [ll for ll, _ in expected], atol=2e-3), mode
        assert [g for _, g in got] == [g for _, g in expected], mode


def test_branching_leaves_the_context_cache_intact_and_groups_contexts():
    """Requests of two contexts interleaved: each context runs once, results stay in request order."""
    model = tiny_model("llama")
    a, b = [5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41]
    pairs = [(a, [1, 2]), (b, [3]), (a, [4, 5, 6]), (b, [7, 8]), (a, [9])]
    scorer = Scorer(model, None)
    got = scorer.score_tokens(pairs)
    assert np.allclose([ll for ll, _ in got], [oracle_score(model, c, x)[0] for c, x in pairs], atol=2e-3)
    assert scorer.tokens == len(a) + 3 + len(b) + 1  # each context run once; last tokens are only targets
    rerun = Scorer(model, None, mode="rerun").score_tokens(pairs)
    assert np.allclose([ll for ll, _ in got], [ll for ll, _ in rerun], atol=2e-3)


# Tokenization as lm-eval's loglikelihood requests


def ids(tokenizer, *tokens):
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = tiny_tokenizer()  # byte-level BPE with merges th, the, Ġt, in
    context, continuation = encode_pair(tok, "in the ", "the")
    assert context == ids(tok, "in", "Ġ", "the")
    assert continuation == ids(tok, "Ġ", "the")  # " the", not "the" after a lone space token
    assert encode_pair(tok, "in the", " the") == (context, continuation)
    # Several whitespace characters, a newline included, move together.
    context, continuation = encode_pair(tok, "in:\n ", "x")
    assert context == ids(tok, "in", ":") and tok.decode(continuation) == "\n x"


def test_encode_pair_takes_what_the_whole_adds_after_the_context_tokens():
    """Context "a t" is [a, Ġt]; "a the" is [a, Ġ, the]: lm-eval scores whole[2:] = [the]."""
    tok = tiny_tokenizer()
    context, continuation = encode_pair(tok, "a t", "he")
    assert context == ids(tok, "a", "Ġt") and continuation == ids(tok, "the")


def test_empty_context_is_the_prefix_token():
    tok = tiny_tokenizer()  # lm-eval's HF model: BOS, or EOS when there is no BOS
    assert encode_pair(tok, "", " the") == ([tok.bos_token_id], ids(tok, "Ġ", "the"))
    assert encode_pair(tok, "", "<|im_start|>the") == ([tok.bos_token_id], ids(tok, "the"))


def test_a_tokenizer_that_adds_bos_keeps_it_on_the_context_only():
    from tokenizers import processors

    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    adds_bos = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok._tokenizer.post_processor = adds_bos
    assert tok.encode("the") == [bos, *ids(tok, "the")]
    assert encode(tok, "<|im_start|>the") == [bos, *ids(tok, "the")]  # no second BOS
    assert encode_pair(tok, "in", " the") == ([bos, *ids(tok, "in")], ids(tok, "Ġ", "the"))


# Metrics on hand-made documents


class TableScorer:
    """Returns fixed log-likelihoods per (context, continuation) and records the requests."""

    tokens = 0

    def __init__(self, table):
        self.table, self.requests = table, []

    def loglikelihoods(self, requests):
        self.requests += requests
        return [self.table[r] for r in requests]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_piqa_acc_and_acc_norm_by_hand(tmp_path):
    docs = [("g1", "a", "bbbb", 1), ("g2", "cc", "d", 0), ("g3", "eeeeee", "ff", 0)]
    write_jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": g, "sol1": s1, "sol2": s2} for g, s1, s2, _ in docs])
    (tmp_path / "piqa/valid-labels.lst").write_text("".join(f"{d[3]}\n" for d in docs))
    lls = {"g1": (-2.0, -4.0), "g2": (-1.0, -3.0), "g3": (-3.0, -2.0)}
    table = {
        (f"Question: {g}\nAnswer:", f" {s}"): (ll, False)
        for g, s1, s2, _ in docs
        for s, ll in zip((s1, s2), lls[g])
    }
    scorer = TableScorer(table)
    result = run_task(get_task("piqa"), scorer, tmp_path, progress=False)
    # acc: argmax picks sol1, sol1, sol2 against gold 1, 0, 0. acc_norm (ll / characters):
    # (-2, -1) -> 1, (-0.5, -3) -> 0, (-0.5, -1) -> 0: all three right.
    assert result.metrics == {"acc": pytest.approx(1 / 3), "acc_norm": 1.0}
    assert scorer.requests[:2] == [("Question: g1\nAnswer:", " a"), ("Question: g1\nAnswer:", " bbbb")]
    assert run_task(get_task("piqa"), TableScorer(table), tmp_path, limit=2, progress=False).metrics == {
        "acc": 0.5, "acc_norm": 1.0
    }


def test_lambada_accuracy_and_perplexity_by_hand(tmp_path):
    write_jsonl(tmp_path / "lambada/lambada_test.jsonl", [{"text": "one two three"}, {"text": "four  five"}])
    # lm-eval's split(" "): the double space leaves the context "four " (trailing space).
    table = {("one two", " three"): (-1.0, True), ("four ", " five"): (-3.0, False)}
    result = run_task(get_task("lambada"), TableScorer(table), tmp_path, progress=False)
    assert result.metrics == {"acc": 0.5, "ppl": pytest.approx(math.exp(2.0))}


def test_plugin_prompts():
    hellaswag = get_task("hellaswag")
    doc = {"query": "Foo: a [title] b", "endings": ["x [y] z", " w "], "label": 1}
    assert hellaswag.requests(doc) == [("Foo: a. b", " x z"), ("Foo: a. b", " w")]
    assert hellaswag.primary == "acc_norm"
    wino = get_task("winogrande")
    doc = {"sentence": "Tom lifted Bob because _ was strong.", "option1": "Tom", "option2": "Bob", "answer": "2"}
    rest = " was strong."
    assert wino.requests(doc) == [("Tom lifted Bob because Tom", rest), ("Tom lifted Bob because Bob", rest)]
    assert wino.score(doc, [-2.0, -1.0]) == {"acc": 1.0}
    mmlu = get_task("mmlu_cloze")
    doc = {"question": " 2+2? ", "subject": "high_school_math", "choices": ["3", "4", "5", "6"], "answer": 1}
    assert mmlu.requests(doc)[1] == (
        "The following are questions (with answers) about high school math.\n\nQuestion: 2+2?\nAnswer:", " 4"
    )


# Perplexity


def test_window_spans_cover_every_token_once():
    assert window_spans(10, 4) == [(0, 4, 4), (4, 8, 4), (5, 9, 1)]
    assert window_spans(10, 4, stride=2) == [(0, 2, 2), (0, 4, 2), (2, 6, 2), (4, 8, 2), (5, 9, 1)]
    for n, window, stride in [(50, 7, 3), (33, 16, 16), (5, 64, None)]:
        scored = [p for b, e, s in window_spans(n, window, stride) for p in range(e - s + 1, e + 1)]
        assert scored == list(range(1, n))
        assert all(e - b <= window for b, e, _ in window_spans(n, window, stride))


def test_perplexity_equals_exp_mean_nll(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    text = "the thin cat sat in the house then the rain came in " * 3
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2/wiki.test.raw.lf.txt").write_text(text)
    tokens = tok.encode(text)
    # One window holding everything: the full forward's mean NLL over tokens 1..n-1.
    logp = log_softmax(full_forward(model, tokens))
    nll = -np.mean([logp[i - 1, tokens[i]] for i in range(1, len(tokens))])
    got = evaluate(model, tok, ["wikitext2"], data_dir=tmp_path, window=len(tokens), progress=False)
    assert got["wikitext2"]["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # Windows of 16 (window 8 attention inside): inputs [16k, 16k + 16) score tokens 16k+1 .. 16k+16;
    # the last, partial chunk still reads a full 16 tokens of input.
    nlls, n = [], len(tokens)
    for start in range(0, n - 1, 16):
        end = min(start + 16, n - 1)
        begin = max(0, end - 16)
        logp = log_softmax(full_forward(model, tokens[begin:end]))
        nlls += [-logp[i - 1 - begin, tokens[i]] for i in range(start + 1, end + 1)]
    assert (n - 1) % 16 and n > 32  # a partial last window, and more than one window
    got = evaluate(model, tok, ["wikitext2"], data_dir=tmp_path, window=16, progress=False)
    assert len(nlls) == len(tokens) - 1
    assert got["wikitext2"]["ppl"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-4)


# Bad input


def test_unknown_task_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'piqa2'.*piqa"):
        get_task("piqa2")
    with pytest.raises(UserError, match="does not exist.*--data-dir"):
        data_dir(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"tinyshakespeare/input.txt is missing \(the task has no hub copy\)"):
        get_task("tinyshakespeare").check(tmp_path)
    monkeypatch.delenv("MLX_LINEAR_DATA", raising=False)
    assert data_dir() is None  # the hub
    monkeypatch.setenv("MLX_LINEAR_DATA", str(tmp_path))
    (tmp_path / "other").mkdir()
    assert data_dir() == tmp_path and data_dir(tmp_path / "other") == tmp_path / "other"  # --data-dir wins


def test_malformed_records_name_their_line(tmp_path):
    path = tmp_path / "arc/arc_easy_test.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer_idx": 0}
    path.parent.mkdir()
    path.write_text(json.dumps(good) + "\n" + '{"question": "q", "choices": [\n')
    with pytest.raises(UserError, match=r"arc_easy_test.jsonl:2: not valid JSON"):
        run_task(get_task("arc_easy"), None, tmp_path, progress=False)
    write_jsonl(path, [good, {"question": "q", "answer_idx": 0}])
    with pytest.raises(UserError, match=r"record 2 lacks field 'choices'"):
        run_task(get_task("arc_easy"), None, tmp_path, progress=False)
    write_jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "piqa/valid-labels.lst").write_text("0\nx\n")
    with pytest.raises(UserError, match=r"valid-labels.lst:2: expected an integer"):
        run_task(get_task("piqa"), TableScorer({}), tmp_path, progress=False)
    write_jsonl(path, [good, {"question": "q", "choices": ["a"], "answer_idx": 0}, {**good, "choices": 3}])
    with pytest.raises(UserError, match=r"arc_easy document 3: TypeError"):
        run_task(get_task("arc_easy"), TableScorer({("Question: q\nAnswer:", " a"): (-1.0, False),
                                                    ("Question: q\nAnswer:", " b"): (-2.0, False)}),
                 tmp_path, progress=False)


def test_a_bug_in_scoring_is_not_blamed_on_the_record(tmp_path):
    write_jsonl(tmp_path / "arc/arc_easy_test.jsonl", [{"question": "q", "choices": ["a", "b"], "answer_idx": 0}])
    with pytest.raises(KeyError):  # the scorer's table lacks the requests: its fault, not the record's
        run_task(get_task("arc_easy"), TableScorer({}), tmp_path, progress=False)


# The command


@pytest.fixture(scope="module")
def folders(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    quiet = dict(hf_source=str(hf_checkpoints["llama"]), log=lambda m: None)
    return convert(root / "liger", window=8, **quiet), convert(root / "none", method="none", **quiet)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "piqa/valid.jsonl", [{"goal": f"the {i}", "sol1": "in the", "sol2": "then"} for i in range(3)])
    (root / "piqa/valid-labels.lst").write_text("0\n1\n0\n")
    write_jsonl(root / "lambada/lambada_test.jsonl", [{"text": "the cat sat in the house"}, {"text": "then it rained"}])
    (root / "wikitext2").mkdir()
    (root / "wikitext2/wiki.test.raw.lf.txt").write_text(" = T = \n the thin cat sat in the house . \n" * 4)
    return root


def run_cli(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_cli_side_by_side(folders, tiny_data, tmp_path):
    liger, none = folders
    out = tmp_path / "r.json"
    args = ["--tasks", "piqa,lambada,wikitext2", "--data-dir", tiny_data, "--window", 16, "--limit", 2]
    result = run_cli("--model", liger, "--baseline", none, *args, "--limit", "lambada=1", "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["model"]) == {"piqa", "lambada", "wikitext2"} and set(data["model"]["piqa"]) == {"acc", "acc_norm"}
    assert data["config"]["documents"] == {"piqa": 2, "lambada": 1, "wikitext2": 2}
    m, b, r = data["model"], data["baseline"], data["recovery"]
    for task, metrics in m.items():  # model / baseline, perplexity inverted; none for a zero baseline
        for metric, value in metrics.items():
            kept, of = (b[task][metric], value) if lower_is_better(metric) else (value, b[task][metric])
            assert r[task][metric] == (pytest.approx(kept / of) if of else None), (task, metric)
    assert b["lambada"]["acc"] == 0 and r["lambada"]["acc"] is None  # a random model: the zero case runs
    # The library entry point on the loaded model gives the same numbers.
    model, tok = mlx_linear.load(liger)
    direct = evaluate(model, tok, ["piqa", "wikitext2"], limit=2, data_dir=tiny_data, window=16, progress=False)
    assert direct["piqa"] == m["piqa"] and direct["wikitext2"]["ppl"] == pytest.approx(m["wikitext2"]["ppl"])
    assert "| wikitext2 | ppl |" in result.stdout and "recovery = model / baseline" in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "piqa,nope"], ["unknown task 'nope'"]),
        (["--limit", "x"], ["--limit x"]),
        (["--limit", "lambada=3"], ["lambada is not in --tasks"]),
        (["--data-dir", "/nonexistent/data"], ["does not exist"]),
    ],
)
def test_cli_bad_input_is_one_line(folders, tiny_data, args, words):
    base = ["--model", folders[0], "--tasks", "piqa", "--data-dir", tiny_data]
    result = run_cli(*base, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error:") and all(w in error for w in words), error


# lm-evaluation-harness (optional): its own task pipeline over our model gives our numbers.


def test_lm_eval_harness_agrees(folders, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mlx_linear.eval.harness  # noqa: F401  (registers the model)

    piqa = [json.loads(l) for l in (tiny_data / "piqa/valid.jsonl").read_text().splitlines()]
    labels = (tiny_data / "piqa/valid-labels.lst").read_text().split()
    write_jsonl(tmp_path / "piqa.jsonl", [{**d, "label": int(l)} for d, l in zip(piqa, labels)])
    write_jsonl(tmp_path / "lambada.jsonl", [{"text": "the cat sat in the house"}, {"text": "then it  rained"}])
    common = "output_type: {}\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/tiny_piqa.yaml").write_text(
        "task: tiny_piqa\n" + common.format("multiple_choice", tmp_path / "piqa.jsonl")
        + 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tmp_path / "tasks/tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n" + common.format("loglikelihood", tmp_path / "lambada.jsonl")
        + "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n  - metric: acc\n"
    )
    out = lm_eval.simple_evaluate(
        model="mlx_linear", model_args=f"pretrained={folders[0]}", tasks=["tiny_piqa", "tiny_lambada"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
    )
    (tmp_path / "lambada/").mkdir()
    (tmp_path / "lambada/lambada_test.jsonl").write_text((tmp_path / "lambada.jsonl").read_text())
    model, tok = mlx_linear.load(folders[0])
    ours = evaluate(model, tok, ["piqa"], data_dir=tiny_data, progress=False)
    ours.update(evaluate(model, tok, ["lambada"], data_dir=tmp_path, progress=False))
    theirs = out["results"]
    assert theirs["tiny_piqa"]["acc,none"] == ours["piqa"]["acc"]
    assert theirs["tiny_piqa"]["acc_norm,none"] == ours["piqa"]["acc_norm"]
    assert theirs["tiny_lambada"]["acc,none"] == ours["lambada"]["acc"]
    assert theirs["tiny_lambada"]["perplexity,none"] == pytest.approx(ours["lambada"]["ppl"], rel=1e-5)
    # Per request: lm-eval's prompts and tokenization give our log-likelihoods.
    scorer = Scorer(model, tok)
    for sample in out["samples"]["tiny_piqa"]:
        requests = [tuple(a) for a in sample["arguments"]]
        context = get_task("piqa").context({"goal": sample["doc"]["goal"]})
        assert [r[0] for r in requests] == [context, context]
        lls = [ll for ll, _ in scorer.loglikelihoods(requests)]
        assert np.allclose([float(r[0][0]) for r in sample["resps"]], lls)


def test_original_smollm2_is_above_chance_on_piqa(smollm_none):
    model, tok = mlx_linear.load(smollm_none)
    fixtures = Path(__file__).parent / "data"  # the first 20 PIQA validation questions
    result = evaluate(model, tok, ["piqa"], limit=20, data_dir=fixtures, progress=False)
    assert result["piqa"]["acc"] >= 0.65  # chance 0.5; measured 0.70 on these 20, 0.635 on the first 200
