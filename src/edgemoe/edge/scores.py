"""Gate-score streams: a synthetic class-dependent skewed gate, and replay of recorded scores.

Recorded format (written by the training loop, read by the simulator), one ``.npz`` file:

- ``scores``  float32 ``[sum_t N_t, E]``: the gate's softmax rows of every slot, concatenated;
- ``offsets`` int64 ``[slots + 1]``: slot t's rows are ``scores[offsets[t]:offsets[t + 1]]``;
- ``labels``  int64 ``[sum_t N_t]`` (optional): each token's class.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.config import require
from edgemoe.edge.arrivals import make_arrivals, restore_rng, rng_state
from edgemoe.edge.spec import NetworkSpec, ScoreSpec
from edgemoe.errors import ConfigError, DataError, InputError
from edgemoe.files import atomic_write_bytes


def _check(cond: bool, what: str, message: str) -> None:
    """Score traces are run-time data: a bad one is an :class:`InputError`, not a configuration error."""
    if not cond:
        raise InputError(what, message)


@dataclass
class ScoreTrace:
    """Gate scores of consecutive slots in the recorded format (see module docstring)."""

    scores: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        _check(self.scores.ndim == 2, "scores", f"must be 2-D [tokens, E], got shape {self.scores.shape}")
        _check(
            self.offsets.ndim == 1 and len(self.offsets) >= 1 and self.offsets[0] == 0,
            "offsets",
            "must be a 1-D array starting at 0 (row boundaries per slot)",
        )
        _check(
            bool((np.diff(self.offsets) >= 0).all()) and self.offsets[-1] == len(self.scores),
            "offsets",
            f"must be non-decreasing and end at the number of score rows ({len(self.scores)})",
        )
        _check(bool(np.isfinite(self.scores).all()), "scores", "must be finite (found NaN or inf)")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            _check(
                self.labels.shape == (len(self.scores),),
                "labels",
                f"must have one entry per score row ({len(self.scores)}), got shape {self.labels.shape}",
            )

    @property
    def num_slots(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """Tokens per slot."""
        return np.diff(self.offsets)

    def slot(self, t: int) -> np.ndarray:
        """Scores of slot t, ``[N_t, E]``."""
        return self.scores[self.offsets[t] : self.offsets[t + 1]]

    def slot_labels(self, t: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[self.offsets[t] : self.offsets[t + 1]]

    @classmethod
    def from_slots(
        cls, slots: Sequence[np.ndarray], labels: Sequence[np.ndarray | None] | None = None
    ) -> ScoreTrace:
        """Concatenate per-slot score matrices (and optional label vectors)."""
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in slots])])
        E = slots[0].shape[1] if slots else 0
        scores = np.concatenate(slots) if slots else np.zeros((0, E), np.float32)
        kept = [lab for lab in labels or () if lab is not None]
        return cls(scores, offsets, np.concatenate(kept) if kept else None)


def save_score_trace(
    path: str | Path, scores: np.ndarray, offsets: np.ndarray, labels: np.ndarray | None = None
) -> None:
    """Write gate scores in the recorded ``.npz`` format (validated first, written atomically)."""
    trace = ScoreTrace(scores, offsets, labels)
    arrays = {"scores": trace.scores, "offsets": trace.offsets}
    if trace.labels is not None:
        arrays["labels"] = trace.labels
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **arrays
    atomic_write_bytes(path, buffer.getvalue())


def load_score_trace(path: str | Path) -> ScoreTrace:
    """Read a recorded ``.npz`` score trace (a bare ``.npy`` of one slot's ``[N, E]`` scores also works)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            str(path), "score trace (scores.trace) does not exist; `edgemoe train` records one as scores.npz"
        )
    if path.suffix == ".npy":
        scores = np.load(path)
        return ScoreTrace(scores, np.array([0, len(scores)]))
    with np.load(path) as data:
        for key in ("scores", "offsets"):
            if key not in data:
                raise DataError(str(path), f"score trace lacks the {key!r} array")
        labels = data["labels"] if "labels" in data else None
        return ScoreTrace(data["scores"], data["offsets"], labels)


def softmax(logits_NE: np.ndarray) -> np.ndarray:
    z = logits_NE - logits_NE.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class SkewedScoreGenerator:
    """Synthetic gate: latent token classes with class-dependent, popularity-skewed expert preferences
    (see :class:`~edgemoe.edge.spec.ScoreSpec`). The class structure is fixed by ``structure_seed``."""

    def __init__(self, spec: ScoreSpec, f_max_E: np.ndarray):
        self.spec = spec
        E = len(f_max_E)
        key = f_max_E if spec.popular == "slow" else -f_max_E
        rank_E = np.empty(E)
        rank_E[np.argsort(key, kind="stable")] = np.arange(E)
        self.log_popularity_E = -spec.skew * rank_E / max(E - 1, 1)
        rng = np.random.default_rng(spec.structure_seed)
        offsets_CE = spec.class_spread * rng.standard_normal((spec.num_classes, E))
        self.class_logits_CE = self.log_popularity_E + offsets_CE

    def sample(
        self, n: int, rng: np.random.Generator, noise_rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` tokens: (scores float32 [n, E], class labels int64 [n]). Labels come from ``rng`` and
        noise from ``noise_rng`` (default: the same generator); with two generators the stream does
        not depend on how tokens are split into calls."""
        labels_N = rng.integers(self.spec.num_classes, size=n)
        E = self.class_logits_CE.shape[1]
        noise_NE = (noise_rng or rng).standard_normal((n, E), dtype=np.float32)
        noise_NE *= self.spec.token_noise
        noise_NE += self.class_logits_CE.astype(np.float32)[labels_N]
        noise_NE *= 1.0 / self.spec.temperature
        return softmax(noise_NE), labels_N


class Workload:
    """Arrivals and gate scores for one simulation run (one seed), produced chunk by chunk so every
    policy sees identical streams (common random numbers) without holding the whole run in memory.
    Arrivals, token classes and gate noise use separate streams, so the workload does not depend on
    the chunk size."""

    def __init__(self, spec: NetworkSpec, seed: int = 0):
        self.spec = spec
        arrival_seed, label_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
        self.position = 0
        if spec.scores.kind == "replay":
            if spec.scores.trace is None:  # ScoreSpec validation guarantees a path for kind 'replay'
                raise ConfigError("scores.trace", "kind 'replay' needs an .npz path")
            self.trace = load_score_trace(spec.scores.trace)
            require(
                self.trace.scores.shape[1] == spec.num_servers,
                "scores.trace",
                f"recorded scores have {self.trace.scores.shape[1]} experts but the network has "
                f"{spec.num_servers} servers",
            )
            require(self.trace.num_slots > 0, "scores.trace", "recording has no slots")
        else:
            self.arrivals = make_arrivals(spec.arrivals, arrival_seed)
            self.generator = SkewedScoreGenerator(spec.scores, spec.f_max_E)
            self.rng = np.random.default_rng(label_seed)
            self.noise_rng = np.random.default_rng(noise_seed)

    def next_chunk(self, slots: int) -> ScoreTrace:
        """The next ``slots`` slots' scores (replays cycle through the recording)."""
        if self.spec.scores.kind == "replay":
            ts = (self.position + np.arange(slots)) % self.trace.num_slots
            self.position += slots
            parts = [self.trace.slot(int(t)) for t in ts]
            slot_labels = None if self.trace.labels is None else [self.trace.slot_labels(int(t)) for t in ts]
            return ScoreTrace.from_slots(parts, slot_labels)
        counts = self.arrivals.sample(slots)
        scores, labels = self.generator.sample(int(counts.sum()), self.rng, self.noise_rng)
        self.position += slots
        return ScoreTrace(scores, np.concatenate([[0], np.cumsum(counts)]), labels)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"position": self.position}
        if self.spec.scores.kind != "replay":
            state["arrivals"] = self.arrivals.state_dict()
            state["rng"] = rng_state(self.rng)
            state["noise_rng"] = rng_state(self.noise_rng)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        if self.spec.scores.kind != "replay":
            self.arrivals.load_state_dict(state["arrivals"])
            restore_rng(self.rng, state["rng"])
            restore_rng(self.noise_rng, state["noise_rng"])
