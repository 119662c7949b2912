"""RULER's synthetic retrieval tasks (Hsieh et al. 2024, "RULER: What's the real context size of
your long-context language models?"): needles hidden at random depths of a haystack that makes
the prompt `length` tokens, a question at the end; acc = greedy decoding gives exactly the
answer (Retrieval). The haystack is RULER's noise, the filler sentence repeated, or with
`name:TEXT` (`niah_multikey:wikitext2`) the start of a perplexity task's text. Needs no data
files unless that text is asked for.
"""

import bisect
import random
import re
import string

from ..errors import UserError

from .tasks import FILLER, TASKS, Perplexity, Retrieval, register_task

# The keys of the magic numbers: simple English words, none of them in the filler.
WORDS = (
    "apple", "anchor", "basket", "bottle", "button", "candle", "carpet", "castle", "cookie", "copper",
    "desert", "dragon", "engine", "feather", "flower", "forest", "garden", "ginger", "guitar", "hammer",
    "helmet", "honey", "island", "jacket", "jungle", "kettle", "kitten", "ladder", "lantern", "lemon",
    "marble", "meadow", "mirror", "napkin", "noodle", "ocean", "orange", "parrot", "pebble", "pencil",
    "pepper", "pillow", "pirate", "planet", "pocket", "puzzle", "rabbit", "rainbow", "river", "rocket",
    "saddle", "shadow", "silver", "spider", "spoon", "summer", "thunder", "ticket", "tiger", "tomato",
    "tunnel", "turtle", "velvet", "violin", "wallet", "walnut", "window", "winter", "wizard", "zebra",
)
# Where a needle may go, and where a haystack may end: after a line break or a sentence's end
# (not after an initial or a title: "J. Smith", "Mr. Darcy").
BOUNDARY = re.compile(r"\n|[!?](?=\s|$)|(?<!\b[A-Z])(?<!\b[A-Z][a-z])(?<!\bMrs)\.(?=\s|$)")


class Haystack:
    """A text to hide needles in, cut to a number of tokens at a sentence's end."""

    def __init__(self, text, tokenizer, source):
        self.text, self.tokenizer, self.source = text, tokenizer, source
        self.tokens = tokenizer.encode(text, add_special_tokens=False)  # BOS is counted with the question
        self.ends = [0] + [m.end() for m in BOUNDARY.finditer(text)]

    def cut(self, budget):
        """(text, points): the longest start of the text that ends at a boundary and holds at most
        `budget` tokens, and the boundaries in it (where needles may go)."""
        if budget > len(self.tokens):
            raise UserError(f"{self.source} holds {len(self.tokens)} tokens, fewer than the {budget} this "
                            "haystack needs: choose shorter --lengths or a longer text")
        chars = len(self.tokenizer.decode(self.tokens[:budget], clean_up_tokenization_spaces=False))
        count = bisect.bisect_right(self.ends, chars)
        return self.text[: self.ends[count - 1]], self.ends[:count]


def nearest(points, x):
    """The point closest to x (the lower of two as close): never decreases as x grows."""
    i = bisect.bisect_left(points, x)
    return min(points[max(i - 1, 0) : i + 1], key=lambda p: abs(p - x))


def hide(text, points, needles):
    """The text with each (depth, sentence) at the point nearest `depth` of its length, in depth
    order (equal depths in the order given)."""
    pieces, start = [], 0
    for depth, sentence in sorted(needles, key=lambda n: n[0]):
        at = nearest(points, depth * len(text))
        pieces += [text[start:at], sentence]
        start = at
    return "".join(pieces) + text[start:]


class Needles(Retrieval):
    """Needles (sentences) at random depths of a haystack cut so that the prompt is `length`
    tokens, `per_length` documents a length; a subclass draws the needles, the question and the
    answer (`sample`)."""

    lengths = (1024, 2048, 4096, 8192, 16384, 32768)
    per_length = 4  # documents a length, each with needles of its own
    # Needles lie in the first 90% of the haystack: from 1k tokens on, the 64-token window
    # at the question never sees them.
    max_depth = 0.9
    intro = ""
    text_task = None  # a perplexity task whose text is the haystack; None: the filler

    def with_option(self, option):
        """`name:wikitext2`: that task's text is the haystack."""
        texts = sorted(name for name, cls in TASKS.items() if issubclass(cls, Perplexity))
        if option not in texts:
            raise UserError(f"{self.name}:{option}: the haystack is the filler (no option) "
                            f"or the text of one of {', '.join(texts)}")
        self.text_task, self.name = TASKS[option](), f"{self.name}:{option}"
        return self

    def check(self, root):
        if self.text_task:
            self.text_task.check(root)

    def source(self, root):
        return self.text_task.source(root) if self.text_task else self.name

    def haystack(self, root, scorer):
        if self.text_task:
            return Haystack(self.text_task.read(root), scorer.tokenizer, self.text_task.source(root))
        words = len(FILLER.split())  # a lower bound of its tokens: enough repeats for the longest prompt
        return Haystack(FILLER * (max(self.lengths) // words + 1), scorer.tokenizer, "the filler")

    def documents(self, root, scorer):
        haystack, rng = self.haystack(root, scorer), random.Random(0)
        for length in self.lengths:
            for _ in range(self.per_length):
                needles, question, answer = self.sample(rng)
                fixed = len(scorer.encode(self.intro + "".join(s for _, s in needles) + question))
                if fixed >= length:
                    raise UserError(f"{self.name}: a {length}-token prompt cannot hold the needles and the question "
                                    f"({fixed} tokens): choose longer --lengths")
                text, points = haystack.cut(length - fixed)
                yield {"context": self.intro + hide(text, points, needles) + question, "answer": answer,
                       "length": length}

    def sample(self, rng):
        """([(depth, needle sentence)], question, answer continuation)."""
        raise NotImplementedError


@register_task
class MultiKey(Needles):
    """RULER's niah_multikey: magic numbers of several keys; the question asks for one key's."""

    name = "niah_multikey"
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.\n")
    needle = " One of the special magic numbers for {key} is: {value}."
    question = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                "The special magic number for {key} mentioned in the provided text is:")
    values = 1  # of the key asked for
    distractors = 3  # other keys, one value each

    def sample(self, rng):
        key, *others = rng.sample(WORDS, 1 + self.distractors)
        owners = [key] * self.values + others
        numbers = rng.sample(range(10**6, 10**7), len(owners))  # 7 digits, all different
        placed = sorted((rng.random() * self.max_depth, owner, n) for owner, n in zip(owners, numbers))
        needles = [(depth, self.needle.format(key=owner, value=n)) for depth, owner, n in placed]
        answer = ", ".join(str(n) for _, owner, n in placed if owner == key)  # in the order they appear
        return needles, self.question.format(key=key), " " + answer


@register_task
class MultiValue(MultiKey):
    """RULER's niah_multivalue: one key has several numbers, other keys are distractors; the
    answer is all of the key's numbers, in the order they appear."""

    name = "niah_multivalue"
    question = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                "The special magic numbers for {key} mentioned in the provided text are:")
    values = 4
    distractors = 2


def distinct_names(rng, count):
    """`count` different names of 5 capital letters, in the order drawn."""
    names = {}  # a dict keeps the order (a set's would change with the hash seed)
    while len(names) < count:
        names["".join(rng.choices(string.ascii_uppercase, k=5))] = None
    return list(names)


@register_task
class VariableTracking(Needles):
    """RULER's variable_tracking: chains of assignments (VAR ABCDE = 12345. then VAR FGHIJ = VAR
    ABCDE. ...), one asked for and distractor chains of other values; the answer is the asked
    chain's variables in the order they are assigned."""

    name = "variable_tracking"
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                "Answer: According to the chain(s) of variable assignment in the text above, "
                "{count} variables are assigned the value {value}, they are:")
    hops = 4  # assignments of one variable to another: a chain has hops + 1 variables
    distractors = 2  # other chains, other values

    def sample(self, rng):
        size = self.hops + 1
        names = distinct_names(rng, size * (1 + self.distractors))
        values = rng.sample(range(10**4, 10**5), 1 + self.distractors)  # 5 digits, one a chain
        needles = []
        for i, value in enumerate(values):
            chain = names[i * size : (i + 1) * size]
            sources = [str(value)] + [f"VAR {name}" for name in chain[:-1]]
            depths = sorted(rng.random() * self.max_depth for _ in chain)  # each after the one it copies
            needles += [(depth, f" VAR {name} = {source}.") for depth, name, source in zip(depths, chain, sources)]
        return needles, self.question.format(value=values[0], count=size), " " + " ".join(names[:size])
