"""Zero-shot evaluation and perplexity, scored like lm-evaluation-harness."""

from .runner import DEFAULT_TASKS, evaluate, run_tasks  # noqa: F401
from .tasks import TASKS, LastWord, MultipleChoice, Perplexity, Retrieval, Task, register_task  # noqa: F401
from . import ruler  # noqa: F401,E402  (registers RULER's tasks)
