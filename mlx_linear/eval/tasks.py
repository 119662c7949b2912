"""Evaluation tasks: small plugins registered by name.

A task lists its data files, reads its documents, scores one document with a Scorer
(log-likelihoods of (context, continuation) requests, or perplexity windows) and reduces
the per-document scores to metrics. Prompts and metrics follow lm-evaluation-harness's
zero-shot task configs. To add one, subclass MultipleChoice, LastWord or Perplexity and
decorate it with @register_task (README, "Evaluation").
"""

import math
import random
import re

from mlx_linear.errors import UserError

from ..registry import Registry
from .data import data_file, read_jsonl, read_labels

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
    return TASKS.lookup(name)()


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, like numpy


def mean(values):
    values = list(values)
    return sum(values) / len(values)


class Task:
    name = ""
    files = ()  # relative to the data folder
    metrics = ()  # reported, in this order
    primary = None  # the metric a benchmark average takes; None: not averaged

    def check(self, root):
        for f in self.files:
            data_file(root, f)

    def documents(self, root, scorer):
        """Iterable of documents (the first `limit` are evaluated)."""
        raise NotImplementedError

    def process(self, scorer, doc) -> dict:
        raise NotImplementedError

    def aggregate(self, scores) -> dict:
        return {m: mean(s[m] for s in scores) for m in self.metrics}


class JsonlTask(Task):
    fields = ()  # required in every record

    def documents(self, root, scorer):
        return read_jsonl(data_file(root, self.files[0]), self.fields)


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

    def text(self, root):
        return data_file(root, self.files[0]).read_text(encoding="utf-8")

    def documents(self, root, scorer):
        tokens = scorer.encode(self.text(root))
        return ((tokens, span) for span in scorer.perplexity_spans(tokens))

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
    fields = ("goal", "sol1", "sol2")

    def documents(self, root, scorer):
        labels = read_labels(data_file(root, self.files[1]))
        for number, doc in enumerate(super().documents(root, scorer), 1):
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
    fields = ("question", "choices", "answer_idx")

    def context(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["answer_idx"]


@register_task
class ARCChallenge(ARCEasy):
    """Same format as ARC-Easy; no copy of its data is in ../shared/data yet."""

    name = "arc_challenge"
    files = ("arc/arc_challenge_test.jsonl",)
    primary = "acc_norm"


def clean_hellaswag(text):
    """lm-eval's HellaSwag preprocessing (WikiHow artifacts); the shared file is mostly clean already."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


@register_task
class HellaSwag(MultipleChoice):
    name = "hellaswag"
    files = ("hellaswag/hellaswag_val.preprocessed.jsonl",)
    fields = ("query", "endings", "label")
    primary = "acc_norm"

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


@register_task
class WikiText2(Perplexity):
    name = "wikitext2"
    files = ("wikitext2/wiki.test.raw.lf.txt",)


@register_task
class TinyShakespeare(Perplexity):
    name = "tinyshakespeare"
    files = ("tinyshakespeare/input.txt",)


@register_task
class HeldOutText(Perplexity):
    """General English held out of training: the records lora-train holds out of gentext/
    (seed 0), so the model never trained on them."""

    name = "gentext"
    files = ("gentext",)

    def check(self, root):
        if not any((root / self.files[0]).glob("*.jsonl")):
            raise UserError(f"{root / self.files[0]} has no *.jsonl files: put the training text there")

    def text(self, root):
        from ..train.data import load_source

        return "\n\n".join(r["text"] for r in load_source(root / self.files[0]).valid)


@register_task
class Passkey(Task):
    """Retrieval beyond the window: a 5-digit pass key hidden in filler at several depths of a
    prompt of 512-4k tokens, asked for at the end; acc = greedy decoding gives exactly the key.
    The needle always lies further back than the 64-token window. Synthetic: needs no data."""

    name = "passkey"
    lengths = (512, 1024, 2048, 4096)
    depths = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
    metrics = ("acc",)
    intro = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
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
                yield {"context": context, "key": key, "length": length}

    def process(self, scorer, doc):
        [(_, greedy)] = scorer.loglikelihoods([(doc["context"], " " + doc["key"])])
        return {"acc": float(greedy), "length": doc["length"]}

    def aggregate(self, scores):
        metrics = {"acc": mean(s["acc"] for s in scores)}
        for length in self.lengths:
            hits = [s["acc"] for s in scores if s["length"] == length]
            if hits:
                metrics[f"acc@{tokens_label(length)}"] = mean(hits)
        return metrics
