"""RULER's synthetic tasks (niah_multikey, niah_multivalue, variable_tracking): prompts of the
asked length, the haystack intact with the needles at its sentence ends, answers checked by
parsing the documents, metrics by length, and `mlx_linear eval` running them."""

import json
import random
import re

import pytest
from click.testing import CliRunner

from mlx_linear.cli import cli
from mlx_linear.convert import convert
from mlx_linear.errors import UserError
from mlx_linear.eval.cli import parse_lengths
from mlx_linear.eval.runner import run_task
from mlx_linear.eval.scoring import Scorer
from mlx_linear.eval.tasks import FILLER, get_task

from conftest import tiny_tokenizer

TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking")
LENGTHS = (1024, 2048)
MAGIC = re.compile(r" One of the special magic numbers for (\w+) is: (\d{7})\.")
ASSIGNMENT = re.compile(r" VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.")
WORDS = "the cat sat in the house then it rained on the thin roof and the dog ran".split()


@pytest.fixture(scope="module")
def scorer():
    return Scorer(None, tiny_tokenizer())  # documents need only the tokenizer


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A WikiText-2-like file: title lines, paragraphs of sentences ending in " .", and titles
    ("Mr. Smith") whose period ends no sentence."""
    root = tmp_path_factory.mktemp("ruler")
    rng, lines = random.Random(1), []
    for i in range(40):
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))).capitalize() + " ." for _ in range(6)]
        lines += [f" = Part {i} = ", " " + " Mr. Smith said so . ".join(sentences) + " "]
    (root / "wikitext2").mkdir()
    (root / "wikitext2/wiki.test.raw.lf.txt").write_text("\n".join(lines) + "\n")
    return root


def ruler_task(name, lengths=LENGTHS):
    task = get_task(name)
    task.lengths = lengths
    return task


def source_text(task, root):
    """What the haystack is cut from: the filler repeated, or the text file (read here, not by the task)."""
    if task.text_task is None:
        return FILLER * 2000
    return (root / "wikitext2/wiki.test.raw.lf.txt").read_text()


def parts(task, context):
    """(haystack with its needles, question): the intro, then the haystack, then the question's line."""
    assert context.startswith(task.intro)
    haystack, _, question = context[len(task.intro) :].rpartition("\n")
    return haystack, "\n" + question


def needle_pattern(task):
    return ASSIGNMENT if task.name.startswith("variable_tracking") else MAGIC


def resolve(context):
    """{variable: value} in the order assigned, each assignment read only after its source's."""
    values = {}
    for name, source in ASSIGNMENT.findall(context):
        assert name not in values, f"{name} assigned twice"
        values[name] = values[source[4:]] if source.startswith("VAR ") else source  # KeyError: source not yet set
    return values


def answer_from(context, distractor=False):
    """The answer read off the document, or a distractor's (another key's number, another chain)."""
    question = context.rpartition("\n")[2]
    if "VAR " in context:
        values = resolve(context)
        asked = re.search(r"assigned the value (\d{5}) in", question).group(1)
        other = next(v for v in values.values() if v != asked)
        return " " + " ".join(n for n, v in values.items() if v == (other if distractor else asked))
    key = re.search(r"special magic numbers? for (\w+) mentioned", question).group(1)
    numbers = [n for k, n in MAGIC.findall(context) if (k != key) == distractor]
    return " " + (numbers[0] if distractor else ", ".join(numbers))


@pytest.mark.parametrize("haystack", ["", ":wikitext2"])
@pytest.mark.parametrize("name", TASKS)
def test_prompts_have_the_length_and_the_haystack_is_intact(scorer, text_dir, name, haystack):
    task = ruler_task(name + haystack)
    docs = list(task.documents(text_dir, scorer))
    assert [d["length"] for d in docs] == [n for n in LENGTHS for _ in range(task.per_length)]
    source = source_text(task, text_dir)
    # A haystack is cut at a sentence's end: the prompt falls short by at most one sentence.
    sentences = re.split(r"(?<=\.)(?<!Mr\.)|(?<=\n)", source[:5000])
    longest = max(len(scorer.encode(s)) for s in sentences)
    for doc in docs:
        assert doc["length"] - longest - 2 <= len(scorer.encode(doc["context"])) <= doc["length"]
        haystack, question = parts(task, doc["context"])
        bare = needle_pattern(task).sub("", haystack)
        assert bare == source[: len(bare)] and bare.endswith((".", "\n"))  # the text's start, untouched
        for needle in needle_pattern(task).finditer(haystack):
            before = needle_pattern(task).sub("", haystack[: needle.start()])
            assert before == "" or before.endswith((".", "\n")) and not before.endswith("Mr.")
            # In the first 90% (give or take a sentence): the question's window never sees it.
            assert len(before) <= 0.9 * len(bare) + max(map(len, sentences))


def test_multikey_asks_for_one_of_four_keys(scorer):
    task = ruler_task("niah_multikey")
    for doc in task.documents(None, scorer):
        found = MAGIC.findall(doc["context"])
        keys = [k for k, _ in found]
        assert len(found) == 4 and len(set(keys)) == 4 and len({n for _, n in found}) == 4
        key = re.search(r"magic number for (\w+) mentioned", parts(task, doc["context"])[1]).group(1)
        assert doc["answer"] == " " + dict(found)[key]


def test_multivalue_asks_for_all_four_numbers_in_order(scorer):
    task = ruler_task("niah_multivalue")
    for doc in task.documents(None, scorer):
        found = MAGIC.findall(doc["context"])
        key = re.search(r"magic numbers for (\w+) mentioned", parts(task, doc["context"])[1]).group(1)
        mine = [n for k, n in found if k == key]
        others = [k for k, _ in found if k != key]
        assert len(mine) == 4 and len(others) == len(set(others)) == 2
        assert doc["answer"] == " " + ", ".join(mine)


def test_variable_tracking_chains_resolve_to_the_answer(scorer):
    task = ruler_task("variable_tracking")
    for doc in task.documents(None, scorer):
        values = resolve(doc["context"])
        question = parts(task, doc["context"])[1]
        count, asked = re.search(r"(\d+) variables are assigned the value (\d{5}),", question).groups()
        chain = [n for n, v in values.items() if v == asked]
        assert doc["answer"] == " " + " ".join(chain) and len(chain) == int(count) == 5
        chains = {}
        for v in values.values():
            chains[v] = chains.get(v, 0) + 1
        assert sorted(chains.values()) == [5, 5, 5]  # two distractor chains of other values


def test_documents_are_deterministic_and_differ(scorer):
    task = ruler_task("niah_multikey")
    first, again = list(task.documents(None, scorer)), list(task.documents(None, scorer))
    assert first == again
    assert len({d["answer"] for d in first}) == len(first) and len({d["context"] for d in first}) == len(first)


class ParsingScorer(Scorer):
    """Greedy exactly when the continuation is the answer read off the context (or a distractor's)."""

    def __init__(self, tokenizer, distractor=False):
        super().__init__(None, tokenizer)
        self.distractor = distractor

    def loglikelihoods(self, requests):
        return [(0.0, continuation == answer_from(context, self.distractor)) for context, continuation in requests]


@pytest.mark.parametrize("name", [*TASKS, "niah_multivalue:wikitext2"])
def test_acc_is_one_for_an_oracle_and_zero_for_a_distractor(text_dir, name):
    tokenizer = tiny_tokenizer()
    right = run_task(ruler_task(name), ParsingScorer(tokenizer), text_dir, progress=False)
    assert right.metrics == {"acc": 1.0, "acc@1k": 1.0, "acc@2k": 1.0} and right.documents == 8
    wrong = run_task(ruler_task(name), ParsingScorer(tokenizer, distractor=True), text_dir, progress=False)
    assert wrong.metrics == {"acc": 0.0, "acc@1k": 0.0, "acc@2k": 0.0}


def test_acc_by_length_by_hand():
    scores = [{"acc": 1.0, "length": 1024}, {"acc": 0.0, "length": 1024}, {"acc": 1.0, "length": 2048},
              {"acc": 0.0, "length": 512}, {"acc": 1.0, "length": 512}]
    expected = {"acc": 0.6, "acc@512": 0.5, "acc@1k": 0.5, "acc@2k": 1.0}
    for name in (*TASKS, "passkey"):  # one aggregation for all of them
        metrics = get_task(name).aggregate(scores)
        assert metrics == pytest.approx(expected) and list(metrics) == list(expected)


def test_options_and_their_errors(text_dir, scorer):
    assert parse_lengths("1k, 4k,8192,1024") == (1024, 4096, 8192)
    assert get_task("niah_multikey:wikitext2").name == "niah_multikey:wikitext2"
    with pytest.raises(UserError, match=r"niah_multikey:piqa: the haystack is .* gentext, tinyshakespeare, wikitext2"):
        get_task("niah_multikey:piqa")
    with pytest.raises(UserError, match="passkey takes no option"):
        get_task("passkey:wikitext2")
    with pytest.raises(UserError, match=r"tinyshakespeare/input.txt is missing \(the task has no hub copy\)"):
        get_task("niah_multikey:tinyshakespeare").check(text_dir)
    with pytest.raises(UserError, match=r"a 300-token prompt cannot hold the needles and the question"):
        list(ruler_task("variable_tracking", (300,)).documents(None, scorer))
    with pytest.raises(UserError, match=r"wiki.test.raw.lf.txt holds \d+ tokens, fewer than the \d+ this haystack needs"):
        list(ruler_task("niah_multikey:wikitext2", (1 << 20,)).documents(text_dir, scorer))


# The command, on a tiny converted model: it scores 0, but the run completes and reports acc by length.


@pytest.fixture(scope="module")
def folders(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ruler-models")
    quiet = dict(hf_source=str(hf_checkpoints["llama"]), log=lambda m: None)
    return convert(root / "liger", window=8, **quiet), convert(root / "none", method="none", **quiet)


def run_cli(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_cli_runs_the_tasks_with_baseline_and_state_off(folders, text_dir, tmp_path):
    liger, none = folders
    out = tmp_path / "r.json"
    result = run_cli("--model", liger, "--baseline", none, "--no-state", "--tasks",
                     "niah_multikey,variable_tracking:wikitext2", "--lengths", "2k,1000", "--limit", 5,
                     "--data-dir", text_dir, "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for run in ("model", "state_off", "baseline"):
        for name in ("niah_multikey", "variable_tracking:wikitext2"):
            assert set(data[run][name]) == {"acc", "acc@1000", "acc@2k"}, (run, name)
    assert data["config"]["lengths"] == [1000, 2048]
    assert data["config"]["documents"] == {"niah_multikey": 5, "variable_tracking:wikitext2": 5}
    assert "| niah_multikey | acc@2k |" in result.stdout and "| variable_tracking:wikitext2 | acc@1000 |" in result.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "niah_multikey", "--lengths", "1k,x"], ["--lengths 1k,x", "1k,4k"]),
        (["--tasks", "piqa", "--lengths", "1k"], ["--lengths", "passkey", "variable_tracking"]),
        (["--tasks", "niah_multikey:piqa"], ["niah_multikey:piqa", "wikitext2"]),
        (["--tasks", "niah_multivalue", "--lengths", "200"], ["200-token prompt", "longer --lengths"]),
    ],
)
def test_cli_bad_input_is_one_line(folders, text_dir, args, words):
    result = run_cli("--model", folders[0], "--data-dir", text_dir, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error:") and all(w in error for w in words), error
