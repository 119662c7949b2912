"""Evaluation tasks: small plugins registered by name.

A task lists its data files, reads its documents, scores one document with a Scorer
(log-likelihoods of (context, continuation) requests, or perplexity windows) and reduces
the per-document scores to metrics. Prompts and metrics follow lm-evaluation-harness's
zero-shot task configs. Data comes from a local folder when it holds the task's `files`, else
from the Hugging Face hub file lm-evaluation-harness reads (`hub`), cached after the first run.
To add one, subclass MultipleChoice, LastWord, Perplexity or Retrieval and decorate it with
@register_task (docs/evaluation.md); RULER's synthetic tasks are in ruler.py.
"""

import math
import random
import re

from ..errors import UserError
from ..hub import HubFile
from ..registry import Registry

from .data import HINT, data_file, read_jsonl, read_labels, read_table

TASKS = Registry("task")
register_task = TASKS.register
LOWER_IS_BETTER = {"ppl"}
# Perplexity is also reported by position in the window: predictions made from 0-63 tokens of
# context lie inside the 64-token softmax window, the rest only the recurrent state can serve.
POSITION_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536)


def lower_is_better(metric):
    """ppl and its per-bucket forms (ppl@64-256, ...)."""
    return metric.partition("@")[0] in LOWER_IS_BETTER


def tokens_label(n):
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def bucket_label(low, high):
    return f"{tokens_label(low)}-{tokens_label(high)}"


def get_task(name):
    """A task by name; `name:option` hands the task an option (`niah_multikey:wikitext2`: its haystack)."""
    base, colon, option = name.partition(":")
    task = TASKS.lookup(base)()
    return task.with_option(option) if colon else task


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, like numpy


def mean(values):
    values = list(values)
    return sum(values) / len(values)


class Task:
    name = ""
    files = ()  # relative to a local data folder
    hub = None  # HubFile read when the folder (or none) lacks `files`
    metrics = ()  # reported, in this order
    primary = None  # the metric a benchmark average takes; None: not averaged

    def with_option(self, option):
        """The task given `name:option`; most tasks take none."""
        raise UserError(f"{self.name}:{option}: {self.name} takes no option after ':'")

    def is_local(self, root):
        """The folder holds the task's files (a task that reads none, e.g. synthetic, needs no folder)."""
        return not self.files or (root is not None and all((root / f).is_file() for f in self.files))

    def check(self, root):
        """Fails before any model runs: the local files, else the hub file (fetched now if not cached)."""
        if not self.is_local(root):
            self.hub_file(root)

    def hub_file(self, root):
        if self.hub is None:
            where = f"{root / self.files[0]} is missing" if root is not None else f"needs {self.files[0]}"
            raise UserError(f"{self.name}: {where} (the task has no hub copy): {HINT}")
        return self.hub.download(self.name, f"connect once (it is cached after), or pass --data-dir DIR holding {self.files[0]}")

    def read(self, root):
        """The task's data: from the folder when it holds the task's files, else from the hub."""
        return self.read_local(root) if self.is_local(root) else self.read_hub(self.hub_file(root))

    def read_local(self, root):
        raise NotImplementedError

    def read_hub(self, path):
        raise NotImplementedError

    def source(self, root) -> str:
        """Where the documents come from, for messages."""
        if not self.files:
            return self.name
        return str(root / self.files[0]) if self.is_local(root) else str(self.hub)

    def documents(self, root, scorer):
        """Iterable of documents (the first `limit` are evaluated)."""
        return self.read(root)

    def validate(self, doc):
        """Raise KeyError, IndexError, TypeError or ValueError for a malformed record, before any scoring."""

    def process(self, scorer, doc) -> dict:
        raise NotImplementedError

    def aggregate(self, scores) -> dict:
        return {m: mean(s[m] for s in scores) for m in self.metrics}


class JsonlTask(Task):
    fields = ()  # required in every record
    hub_fields = ()  # required in every row of the hub file

    def read_local(self, root):
        return read_jsonl(data_file(root, self.files[0]), self.fields)

    def read_hub(self, path):
        return [self.from_hub(row) for row in read_table(path, self.hub_fields or self.fields)]

    def from_hub(self, row) -> dict:
        """A hub row as a record of the local format."""
        return row


class MultipleChoice(JsonlTask):
    """lm-eval's multiple_choice: one request (context, " " + choice) per choice.

    acc takes the choice of highest log-likelihood; acc_norm divides each by the choice's
    length in characters (without the delimiter) first.
    """

    metrics = ("acc", "acc_norm")
    primary = "acc"
    delimiter = " "  # lm-eval's target_delimiter

    def context(self, doc) -> str:
        raise NotImplementedError

    def choices(self, doc) -> list:
        raise NotImplementedError

    def gold(self, doc) -> int:
        raise NotImplementedError

    def requests(self, doc):
        return [(self.context(doc), self.delimiter + c) for c in self.choices(doc)]

    def validate(self, doc):
        self.score(doc, [0.0] * len(self.requests(doc)))  # reads every field scoring will read

    def process(self, scorer, doc):
        lls = [ll for ll, _ in scorer.loglikelihoods(self.requests(doc))]
        return self.score(doc, lls)

    def score(self, doc, lls):
        gold = self.gold(doc)
        lengths = [len(c) for c in self.choices(doc)]
        return {
            "acc": float(argmax(lls) == gold),
            "acc_norm": float(argmax([ll / n for ll, n in zip(lls, lengths)]) == gold),
        }


class LastWord(JsonlTask):
    """lm-eval's lambada_openai: greedy accuracy and perplexity of the last word given the rest."""

    fields = ("text",)
    metrics = ("acc", "ppl")
    primary = "acc"

    def validate(self, doc):
        doc["text"].rpartition(" ")

    def process(self, scorer, doc):
        context, _, word = doc["text"].rpartition(" ")  # = split(" ")[:-1] joined, and the last piece
        [(ll, greedy)] = scorer.loglikelihoods([(context, " " + word)])
        return {"acc": float(greedy), "ll": ll}

    def aggregate(self, scores):
        return {"acc": mean(s["acc"] for s in scores), "ppl": math.exp(-mean(s["ll"] for s in scores))}


class Perplexity(Task):
    """Token-level perplexity of a whole text in the scorer's windows (a document = a window),
    overall and by the prediction's position in its window (`ppl@64-256`: from 64-255 tokens of context)."""

    metrics = ("ppl",)

    def documents(self, root, scorer):
        tokens = scorer.encode(self.read(root))
        return ((tokens, span) for span in scorer.perplexity_spans(tokens))

    def read_local(self, root):
        return data_file(root, self.files[0]).read_text(encoding="utf-8")

    def read_hub(self, path):
        """The raw text from the rows of a line-per-row table (HF wikitext): blank lines are empty
        rows, left out as in the local file."""
        return "".join(row["text"] for row in read_table(path, ("text",)))

    def process(self, scorer, doc):
        tokens, span = doc
        nlls = scorer.window_nlls(tokens, span)
        first = span[1] - span[0] - span[2]  # window position of the first scored prediction
        score = {"nll": sum(nlls), "count": len(nlls)}
        for low, high in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:]):
            part = nlls[max(low - first, 0) : max(high - first, 0)]
            if part:
                label = bucket_label(low, high)
                score[f"nll@{label}"], score[f"count@{label}"] = sum(part), len(part)
        return score

    def aggregate(self, scores):
        metrics = {"ppl": math.exp(sum(s["nll"] for s in scores) / sum(s["count"] for s in scores))}
        for low, high in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:]):
            label = bucket_label(low, high)
            count = sum(s.get(f"count@{label}", 0) for s in scores)
            if count:
                metrics[f"ppl@{label}"] = math.exp(sum(s.get(f"nll@{label}", 0) for s in scores) / count)
        return metrics


@register_task
class PIQA(MultipleChoice):
    name = "piqa"
    files = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    hub = HubFile("baber/piqa", "piqa_validation.parquet")
    fields = ("goal", "sol1", "sol2")
    hub_fields = (*fields, "label")

    def read_local(self, root):
        labels = read_labels(data_file(root, self.files[1]))
        for number, doc in enumerate(super().read_local(root), 1):
            label = next(labels, None)
            if label is None:
                raise UserError(f"{root / self.files[1]} has fewer labels than {self.files[0]} has lines ({number}+)")
            yield {**doc, "label": label}

    def context(self, doc):
        return f"Question: {doc['goal']}\nAnswer:"

    def choices(self, doc):
        return [doc["sol1"], doc["sol2"]]

    def gold(self, doc):
        return doc["label"]


@register_task
class ARCEasy(MultipleChoice):
    name = "arc_easy"
    files = ("arc/arc_easy_test.jsonl",)
    hub = HubFile("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet")
    fields = ("question", "choices", "answer_idx")
    hub_fields = ("question", "choices", "answerKey")

    def from_hub(self, row):
        """{choices: {text, label}, answerKey}: the answer is the index of its label (letters or digits)."""
        labels = row["choices"]["label"]
        return {"question": row["question"], "choices": row["choices"]["text"],
                "answer_idx": labels.index(row["answerKey"])}

    def context(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["answer_idx"]


@register_task
class ARCChallenge(ARCEasy):
    """Same format as ARC-Easy."""

    name = "arc_challenge"
    files = ("arc/arc_challenge_test.jsonl",)
    hub = HubFile("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet")
    primary = "acc_norm"


def clean_hellaswag(text):
    """lm-eval's HellaSwag preprocessing (WikiHow artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


@register_task
class HellaSwag(MultipleChoice):
    name = "hellaswag"
    files = ("hellaswag/hellaswag_val.preprocessed.jsonl",)
    # The hub repo's main holds a loading script; the hub's own parquet export holds the data.
    hub = HubFile("Rowan/hellaswag", "default/validation/0000.parquet", revision="refs/convert/parquet")
    fields = ("query", "endings", "label")
    hub_fields = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    primary = "acc_norm"

    def from_hub(self, row):
        """lm-eval's query: activity label, then ctx_a and ctx_b with its first letter capitalized."""
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {"query": f"{row['activity_label']}: {context}", "endings": row["endings"], "label": row["label"]}

    def context(self, doc):
        return clean_hellaswag(doc["query"])

    def choices(self, doc):
        return [clean_hellaswag(e) for e in doc["endings"]]

    def gold(self, doc):
        return int(doc["label"])


@register_task
class Winogrande(MultipleChoice):
    """lm-eval's partial scoring: each option completes the sentence up to the blank (one
    context per option), and the rest of the sentence is the scored continuation.
    Records as in allenai/winogrande: {sentence, option1, option2, answer: "1" | "2"}."""

    name = "winogrande"
    files = ("winogrande/winogrande_dev.jsonl",)
    hub = HubFile("allenai/winogrande", "winogrande_xl/validation-00000-of-00001.parquet")
    fields = ("sentence", "option1", "option2", "answer")
    metrics = ("acc",)

    def requests(self, doc):
        blank = doc["sentence"].index("_")
        rest = self.delimiter + doc["sentence"][blank + 1 :].strip()
        return [(doc["sentence"][:blank] + option, rest) for option in (doc["option1"], doc["option2"])]

    def score(self, doc, lls):
        return {"acc": float(argmax(lls) == int(doc["answer"]) - 1)}


@register_task
class MMLUCloze(MultipleChoice):
    """MMLU scored on the answer texts (lm-eval's mmlu_continuation), not on the letters:
    letter-format MMLU is at chance for small models. Records as in cais/mmlu:
    {question, subject, choices[4], answer}."""

    name = "mmlu_cloze"
    files = ("mmlu/mmlu_test.jsonl",)
    hub = HubFile("cais/mmlu", "all/test-00000-of-00001.parquet")
    fields = ("question", "subject", "choices", "answer")

    def context(self, doc):
        description = f"The following are questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
        return f"{description}Question: {doc['question'].strip()}\nAnswer:"

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["answer"]


@register_task
class Lambada(LastWord):
    name = "lambada"
    files = ("lambada/lambada_test.jsonl",)
    hub = HubFile("EleutherAI/lambada_openai", "data/lambada_test.jsonl")


@register_task
class WikiText2(Perplexity):
    name = "wikitext2"
    files = ("wikitext2/wiki.test.raw.lf.txt",)
    hub = HubFile("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet")


@register_task
class TinyShakespeare(Perplexity):
    name = "tinyshakespeare"
    files = ("tinyshakespeare/input.txt",)


@register_task
class HeldOutText(Perplexity):
    """General English held out of training: the records lora-train holds out of gentext/
    (seed 0), so the model never trained on them. Local only: it is this project's split."""

    name = "gentext"
    files = ("gentext",)

    def is_local(self, root):
        return root is not None and any((root / self.files[0]).glob("*.jsonl"))

    def read_local(self, root):
        from ..train.data import load_source

        return "\n\n".join(r["text"] for r in load_source(root / self.files[0]).valid)


# RULER's noise haystack; Passkey's filler, and the default haystack of the tasks in ruler.py.
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Retrieval(Task):
    """Synthetic retrieval at several prompt lengths (tokens): a document is {context, answer,
    length}; acc = greedy decoding after the context gives exactly the answer, overall and per
    length (`acc@1k`, ...). `lengths` is a class attribute that `--lengths` overrides."""

    lengths = ()
    metrics = ("acc",)

    def process(self, scorer, doc):
        [(_, greedy)] = scorer.loglikelihoods([(doc["context"], doc["answer"])])
        return {"acc": float(greedy), "length": doc["length"]}

    def aggregate(self, scores):
        metrics = {"acc": mean(s["acc"] for s in scores)}
        for length in sorted({s["length"] for s in scores}):
            metrics[f"acc@{tokens_label(length)}"] = mean(s["acc"] for s in scores if s["length"] == length)
        return metrics


@register_task
class Passkey(Retrieval):
    """Retrieval beyond the window: a 5-digit pass key hidden in filler at several depths of a
    prompt of 512-4k tokens, asked for at the end; acc = greedy decoding gives exactly the key.
    The needle always lies further back than the 64-token window. Synthetic: needs no data."""

    name = "passkey"
    lengths = (512, 1024, 2048, 4096)
    depths = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
    intro = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    filler = FILLER
    needle = " The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is"

    def documents(self, root, scorer):
        rng = random.Random(0)
        fixed = len(scorer.encode(self.intro + self.needle.format(key=12345) + self.question))
        repeats = {n: (n - fixed) // len(scorer.encode(self.filler)) for n in self.lengths}
        for length in self.lengths:
            for depth in self.depths:
                key, before = str(rng.randrange(10000, 100000)), round(depth * repeats[length])
                context = (self.intro + self.filler * before + self.needle.format(key=key)
                           + self.filler * (repeats[length] - before) + self.question)
                yield {"context": context, "key": key, "answer": " " + key, "length": length}
