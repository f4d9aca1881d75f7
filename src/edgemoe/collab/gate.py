"""The MoE² gate: prompt embedding (+ category) → MLP → one logit per expert.

Trained once on the full expert set with the ensemble cross-entropy
``-log Σ_n softmax(logits)_n · p_n(correct option)``. Restricted to an enabled set S the gate is the
softmax over S (:func:`restricted_weights`); the fine level keeps the top-k of S that fit the
request's latency budget and renormalises (:func:`route_weights`).

Each category also carries a temperature τ_c for the combine weights (softmax of τ_c·logits; the
ranking for top-k keeps the raw logits). τ_c = 0 is equal weights. It is chosen after training on a
validation split (``edgemoe.collab.offline.runs.calibrate``), so that where the learned weights do
not beat equal weights on held-out questions the run falls back to equal weights for that category.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgemoe.config import check_positive, check_range


@dataclass
class GateConfig:
    hidden: int = 64
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    use_category: bool = True
    subset_dropout: float = 0.5

    def __post_init__(self) -> None:
        check_range(self.subset_dropout, "gate.subset_dropout", 0.0, 0.95)
        check_positive(self.hidden, "gate.hidden")
        check_positive(self.steps, "gate.steps")
        check_positive(self.lr, "gate.lr")
        check_positive(self.weight_decay, "gate.weight_decay", allow_zero=True)


class Gate(nn.Module):
    """MLP gate over ``[embedding, one-hot category]``; knows its experts' and categories' names."""

    def __init__(self, embed_dim: int, experts: list[str], categories: list[str], cfg: GateConfig):
        super().__init__()
        self.experts = list(experts)
        self.categories = list(categories)
        self.cfg = cfg
        self.embed_dim = embed_dim
        in_dim = embed_dim + (len(categories) if cfg.use_category else 0)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, len(experts))
        )
        self.register_buffer("temperature_C", torch.ones(len(categories), dtype=torch.float64))

    def set_temperatures(self, temperature_C: np.ndarray) -> None:
        """Per-category combine-weight temperatures (0 = equal weights)."""
        t = torch.as_tensor(np.asarray(temperature_C, dtype=np.float64))
        if t.shape != self.temperature_C.shape or bool((t < 0).any()):
            raise ValueError(f"need {len(self.categories)} temperatures >= 0, got {t.tolist()}")
        self.temperature_C.copy_(t)

    def weight_logits(self, logits_QN: np.ndarray, category_Q: np.ndarray) -> np.ndarray:
        """Logits for the combine weights: τ_c · logits (ranking uses the raw logits)."""
        tau_Q = self.temperature_C.numpy()[np.asarray(category_Q, dtype=np.int64)]
        return np.asarray(logits_QN, dtype=np.float64) * tau_Q[:, None]

    def features(self, emb_QD: torch.Tensor, category_Q: torch.Tensor) -> torch.Tensor:
        if not self.cfg.use_category:
            return emb_QD
        onehot_QC = nn.functional.one_hot(category_Q.long(), len(self.categories)).to(emb_QD.dtype)
        return torch.cat([emb_QD, onehot_QC], dim=1)

    def forward(self, emb_QD: torch.Tensor, category_Q: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(emb_QD, category_Q))

    @torch.no_grad()
    def logits(self, emb_QD: np.ndarray, category_Q: np.ndarray) -> np.ndarray:
        """Numpy in, numpy out (float64 logits, shape (Q, N))."""
        x = torch.as_tensor(np.asarray(emb_QD, dtype=np.float32))
        c = torch.as_tensor(np.asarray(category_Q, dtype=np.int64))
        return self(x, c).double().numpy()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "embed_dim": self.embed_dim,
            "experts": self.experts,
            "categories": self.categories,
            "cfg": asdict(self.cfg),
        }
        torch.save({"meta": json.dumps(meta), "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> Gate:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        gate = cls(meta["embed_dim"], meta["experts"], meta["categories"], GateConfig(**meta["cfg"]))
        state = dict(blob["state"])
        state.setdefault("temperature_C", gate.temperature_C)
        gate.load_state_dict(state)
        return gate.eval()


def ensemble_nll(
    logits_QN: torch.Tensor, correct_QN: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean ``-log Σ_n w_n p_n(y)`` with ``w`` the softmax of the logits over the enabled experts.

    ``mask`` is (N,) or (Q, N); every row must enable at least one expert.
    """
    if mask is not None:
        logits_QN = logits_QN.masked_fill(~mask.expand_as(logits_QN), float("-inf"))
    logw_QN = torch.log_softmax(logits_QN, dim=1)
    return -torch.logsumexp(logw_QN + torch.log(correct_QN.clamp_min(1e-12)), dim=1).mean()


def train_gate(
    emb_QD: np.ndarray,
    category_Q: np.ndarray,
    correct_QN: np.ndarray,
    experts: list[str],
    categories: list[str],
    cfg: GateConfig,
    mask_N: np.ndarray | None = None,
) -> Gate:
    """Fit the gate by full-batch AdamW on the ensemble cross-entropy.

    ``correct_QN`` is each expert's probability of the correct option. ``mask_N`` restricts training
    to a subset (used only to measure the optimality-preserving gap; MoE² trains on the full set).
    With ``cfg.subset_dropout`` > 0, each step also trains on random restrictions of the full set
    (each expert dropped with that probability, per question), so that the gate restricted to any
    subset stays well ranked; it is still one gate trained once.
    """
    with _one_torch_thread():
        return _fit(emb_QD, category_Q, correct_QN, experts, categories, cfg, mask_N)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """A small MLP: extra threads only add contention (40x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(emb_QD, category_Q, correct_QN, experts, categories, cfg: GateConfig, mask_N) -> Gate:
    torch.manual_seed(cfg.seed)
    gate = Gate(emb_QD.shape[1], experts, categories, cfg)
    x = torch.as_tensor(np.asarray(emb_QD, dtype=np.float32))
    c = torch.as_tensor(np.asarray(category_Q, dtype=np.int64))
    p = torch.as_tensor(np.asarray(correct_QN, dtype=np.float32))
    m = None if mask_N is None else torch.as_tensor(np.asarray(mask_N, dtype=bool))
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        logits_QN = gate(x, c)
        loss = ensemble_nll(logits_QN, p, m)
        if cfg.subset_dropout > 0 and m is None:
            keep_QN = torch.rand(p.shape, generator=gen) >= cfg.subset_dropout
            keep_QN[torch.arange(p.shape[0]), torch.randint(0, p.shape[1], (p.shape[0],), generator=gen)] = (
                True
            )
            loss = 0.5 * (loss + ensemble_nll(logits_QN, p, keep_QN))
        loss.backward()
        opt.step()
    return gate.eval()


def restricted_weights(logits_QN: np.ndarray, mask_QN: np.ndarray) -> np.ndarray:
    """Softmax of the logits over the enabled experts only; rows with none enabled are all zero."""
    mask_QN = np.broadcast_to(np.asarray(mask_QN, dtype=bool), logits_QN.shape)
    z = np.where(mask_QN, logits_QN, -np.inf)
    zmax = z.max(axis=1, keepdims=True)
    zmax = np.where(np.isfinite(zmax), zmax, 0.0)
    e = np.where(mask_QN, np.exp(z - zmax), 0.0)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def top_k_mask(logits_QN: np.ndarray, enabled_QN: np.ndarray, k: int | None) -> np.ndarray:
    """The k enabled experts with the largest logits per row (all enabled ones when k is None)."""
    enabled_QN = np.broadcast_to(np.asarray(enabled_QN, dtype=bool), logits_QN.shape)
    if k is None or k >= logits_QN.shape[1]:
        return enabled_QN.copy()
    z = np.where(enabled_QN, logits_QN, -np.inf)
    order_QN = np.argsort(-z, axis=1, kind="stable")
    keep_QN = np.zeros_like(enabled_QN)
    rows = np.arange(z.shape[0])[:, None]
    keep_QN[rows, order_QN[:, :k]] = True
    return keep_QN & enabled_QN


def route_weights(logits_QN: np.ndarray, enabled_QN: np.ndarray, k: int | None) -> np.ndarray:
    """Fine level: weights over the top-k enabled experts (softmax restricted to them)."""
    return restricted_weights(logits_QN, top_k_mask(logits_QN, enabled_QN, k))
