"""A tiny character-level language model built in code, and the in-process backend that runs it.

It stands in for a real edge LLM wherever downloads are not allowed: tests, the gateway benchmark
and the quick start (``kind: tiny``). The same model behind an OpenAI-compatible HTTP server, with
fault injection, is :class:`edgemoe.testing.TinyOpenAIServer`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from edgemoe.collab.backends.base import ChoiceScores, Generation, LLMBackend, Message, Stopwatch, log_softmax
from edgemoe.collab.prompts import option_letters

VOCAB = string.printable
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]


class TinyCharLM(nn.Module):
    """Next-character model: recency-weighted mean of character embeddings -> MLP -> logits.

    Weights come from ``seed``, so two seeds are two different "experts". ``letter_bias`` adds a
    fixed logit to chosen characters, which lets tests build experts with known preferences.
    """

    bias_V: torch.Tensor

    def __init__(self, dim: int = 32, seed: int = 0, letter_bias: Mapping[str, float] | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        vocab = len(VOCAB)
        self.embed_VD = nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.hidden_DD = nn.Parameter(torch.randn(dim, dim, generator=gen) / dim**0.5)
        self.out_DV = nn.Parameter(torch.randn(dim, vocab, generator=gen) / dim**0.5)
        bias_V = torch.zeros(vocab)
        for ch, value in (letter_bias or {}).items():
            bias_V[_INDEX[ch]] = float(value)
        self.bias_V: torch.Tensor
        self.register_buffer("bias_V", bias_V)
        self.requires_grad_(False)

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text] or [_UNKNOWN], dtype=torch.long)

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the character after ``ids_T``."""
        T = ids_T.shape[0]
        weight_T = torch.exp(-torch.arange(T - 1, -1, -1, dtype=torch.float32) / 8.0)
        pooled_D = (weight_T[:, None] * self.embed_VD[ids_T]).sum(0) / weight_T.sum()
        return torch.tanh(pooled_D @ self.hidden_DD) @ self.out_DV + self.bias_V

    @torch.no_grad()
    def letter_logprobs(self, prompt: str, n_options: int) -> tuple[float, ...]:
        letters = option_letters(n_options)
        logits_V = self(self.encode(prompt))
        return log_softmax(logits_V[[_INDEX[ch] for ch in letters]].tolist())

    @torch.no_grad()
    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """Greedy (``temperature == 0``) or sampled decoding, one character per token."""
        gen = torch.Generator().manual_seed(seed)
        ids_T = self.encode(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            logits_V = self(ids_T)
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits_V / temperature, -1), 1, generator=gen))
            else:
                nxt = int(logits_V.argmax())
            out.append(nxt)
            ids_T = torch.cat([ids_T, torch.tensor([nxt])])
        return out

    @torch.no_grad()
    def top_logprobs(self, prompt: str, k: int) -> dict[str, float]:
        """The ``k`` most likely next characters with their log-probabilities."""
        logp_V = torch.log_softmax(self(self.encode(prompt)), -1)
        values, idx = logp_V.topk(min(k, logp_V.shape[0]))
        return {VOCAB[i]: float(v) for v, i in zip(values.tolist(), idx.tolist())}


def chat_prompt(messages: Sequence[Message]) -> str:
    """Plain-text chat transcript ending with the assistant's turn."""
    turns = "".join(f"{m.role}: {m.content}\n" for m in messages)
    return f"{turns}assistant:"


def apply_stop(text: str, stop: str | Sequence[str] | None) -> tuple[str, bool]:
    """``text`` cut before the first stop sequence, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class TinyBackend(LLMBackend):
    """The tiny model run in this process (no network), for local smoke runs and tests."""

    seed: int = 0
    letter_bias: dict[str, float] = field(default_factory=dict)
    supported_params: ClassVar[frozenset[str]] = frozenset({"seed", "stop", "user"})

    def __post_init__(self) -> None:
        self.model = TinyCharLM(seed=self.seed, letter_bias=self.letter_bias)

    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        with Stopwatch() as sw:
            logprobs = self.model.letter_logprobs(prompt, n_options)
        return ChoiceScores(logprobs, "logits", sw.seconds, len(prompt))

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        params = params or {}
        seed = int(params.get("seed", self.seed))
        return self._continue(chat_prompt(messages), max_tokens, temperature, seed, params.get("stop"))

    def complete(self, prompt: str, max_tokens: int) -> Generation:
        return self._continue(prompt, max_tokens, 0.0, self.seed, None)

    def _continue(self, prompt: str, max_tokens: int, temperature: float, seed: int, stop: Any) -> Generation:
        with Stopwatch() as sw:
            ids = self.model.generate(prompt, max_tokens, temperature, seed)
        text, stopped = apply_stop("".join(VOCAB[i] for i in ids), stop)
        finish = "stop" if stopped else "length"
        return Generation(text, len(prompt), len(text) if stopped else len(ids), sw.seconds, finish)
