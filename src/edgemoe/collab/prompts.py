"""The one home of MoE²'s prompt layouts and option letters.

Three consumers share them: gate training embeds :func:`gate_prompt` of every question, the gateway
embeds the same text for a question it serves, and every expert is asked :func:`mc_prompt` and
answers with one of :func:`option_letters`.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from edgemoe.errors import ConfigError

LETTERS = string.ascii_uppercase
MAX_OPTIONS = len(LETTERS)


def option_letters(n_options: int) -> str:
    """``A``, ``B``, ... for ``n_options`` (2..26) options."""
    if not 2 <= n_options <= MAX_OPTIONS:
        raise ConfigError("choices", f"need 2..{MAX_OPTIONS} options, got {n_options}")
    return LETTERS[:n_options]


def lettered(choices: Sequence[str]) -> str:
    """``A. first`` / ``B. second`` ... one option per line."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip(option_letters(len(choices)), choices))


def gate_prompt(question: str, choices: Sequence[str]) -> str:
    """A question as the gate embeds it: question, lettered options, ``Answer:``."""
    return f"{question}\n{lettered(choices)}\nAnswer:"


def mc_prompt(question: str, choices: Sequence[str], subject: str | None = None) -> str:
    """The zero-shot prompt an expert answers: a one-line instruction, then :func:`gate_prompt`.

    The next token after ``Answer:`` is read as the model's choice.
    """
    topic = f" about {subject.replace('_', ' ')}" if subject else ""
    head = f"The following is a multiple choice question{topic}. Reply with the letter of the answer.\n\n"
    return head + gate_prompt(question.strip(), choices)
