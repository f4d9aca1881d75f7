"""The one interface every LLM expert implements, whatever runs it.

An expert answers two kinds of request:

- ``score_choices``: a multiple-choice question, answered as a log-probability per option letter
  (from the next-token logits of a local model, or the logprobs an HTTP endpoint returns);
- ``generate``: free text for a chat.

Both have an async twin used by the gateway's concurrent fan-out. Local backends (one model in
this process) run their blocking calls on a private single-thread executor, so calls to one model
are serialised and never block the event loop; HTTP backends override the async methods natively.
"""

from __future__ import annotations

import abc
import asyncio
import math
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

LETTERS = string.ascii_uppercase
MAX_OPTIONS = 10


class BackendError(RuntimeError):
    """An expert could not answer (unreachable, crashed, malformed reply)."""


@dataclass(frozen=True)
class ChoiceScores:
    """Answer to a multiple-choice question.

    ``logprobs`` holds one normalised log-probability per option (log-softmax over the option
    letters). ``source`` says where they came from: ``logits`` (local model), ``logprobs`` (HTTP
    endpoint's top logprobs) or ``text`` (endpoint without logprobs; a smoothed one-hot of the
    letter it wrote).
    """

    logprobs: tuple[float, ...]
    source: str
    latency_s: float
    prompt_tokens: int

    @property
    def probs(self) -> np.ndarray:
        return np.exp(np.asarray(self.logprobs, dtype=np.float64))

    @property
    def answer(self) -> int:
        return int(np.argmax(self.logprobs))


@dataclass(frozen=True)
class Generation:
    """Free-text answer with the token counts the profiler and energy model need."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def option_letters(n_options: int) -> str:
    """``A``, ``B``, ... for ``n_options`` (2..10) options."""
    if not 2 <= n_options <= MAX_OPTIONS:
        raise ValueError(f"choices: need 2..{MAX_OPTIONS} options, got {n_options}")
    return LETTERS[:n_options]


def mc_prompt(question: str, choices: Sequence[str], subject: str | None = None) -> str:
    """The MMLU zero-shot prompt: question, lettered options, then ``Answer:``.

    The next token after ``Answer:`` is read as the model's choice.
    """
    letters = option_letters(len(choices))
    topic = f" about {subject.replace('_', ' ')}" if subject else ""
    head = f"The following is a multiple choice question{topic}. Reply with the letter of the answer.\n\n"
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choices))
    return f"{head}{question.strip()}\n{options}\nAnswer:"


def log_softmax(x: Sequence[float]) -> tuple[float, ...]:
    a = np.asarray(x, dtype=np.float64)
    a = a - a.max()
    return tuple(float(v) for v in a - math.log(float(np.exp(a).sum())))


def letter_from_text(text: str, letters: str) -> int | None:
    """Index of the first option letter standing alone at the start of ``text`` (``"B."``, ``" (C)"``)."""
    stripped = text.strip().lstrip("(*[ ").upper()
    if stripped and stripped[0] in letters and (len(stripped) == 1 or not stripped[1].isalpha()):
        return letters.index(stripped[0])
    return None


def smoothed_one_hot(index: int | None, n: int, eps: float = 0.05) -> tuple[float, ...]:
    """Distribution for an answer known only as text: 1 - eps on the letter, eps spread on the rest.

    With no recognisable letter the distribution is uniform.
    """
    if index is None:
        return tuple([-math.log(n)] * n)
    p = np.full(n, eps / (n - 1))
    p[index] = 1.0 - eps
    return tuple(float(v) for v in np.log(p))


@dataclass
class ExpertBackend(abc.ABC):
    """Base class: blocking ``score_choices``/``generate`` plus their async twins."""

    name: str
    _executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @abc.abstractmethod
    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        """Log-probabilities of the first ``n_options`` letters as the next token after ``prompt``."""

    @abc.abstractmethod
    def generate(self, messages: Sequence[Message], max_tokens: int, temperature: float = 0.0) -> Generation:
        """Chat completion."""

    @abc.abstractmethod
    def complete(self, prompt: str, max_tokens: int) -> Generation:
        """Greedy raw-text continuation of ``prompt`` (no chat template): what decode rates are timed on."""

    def load(self) -> float:
        """Load weights / open connections; returns the seconds it took (0 if nothing to load)."""
        return 0.0

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _run(self, fn, *args):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-{self.name}")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def ascore_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        return await self._run(self.score_choices, prompt, n_options)

    async def agenerate(
        self, messages: Sequence[Message], max_tokens: int, temperature: float = 0.0
    ) -> Generation:
        return await self._run(self.generate, messages, max_tokens, temperature)

    async def aclose(self) -> None:
        self.close()


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
