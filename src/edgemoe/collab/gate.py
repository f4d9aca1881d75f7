"""The MoE² gate: prompt embedding (+ category) → MLP → one logit per expert.

Trained once on the full expert set with the ensemble cross-entropy
``-log Σ_n softmax(logits)_n · p_n(correct option)``. Restricted to an enabled set S the gate is the
softmax over S (:func:`restricted_weights`); the fine level keeps the top-k of S that fit the
request's latency budget and renormalises (:func:`route_weights`).

The logits a gate hands out (:meth:`Gate.logits`) are calibrated per category c:
``τ_c · mlp_logits + β_c · prior_N``, where ``prior_N`` is the log of each expert's mean probability
of being right on the training questions. (τ, β) = (1, 0) is the trained gate, (0, 0) equal weights,
(0, β > 0) "prefer the expert that is best on average". They are chosen after training on a
validation split (``edgemoe.collab.offline.runs.calibrate``), so where the learned gate does not beat
equal weights (or the prior) on held-out questions, that category falls back to it.
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

    calibration_C2: torch.Tensor
    prior_N: torch.Tensor

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
        calibration = torch.zeros(len(categories), 2, dtype=torch.float64)
        calibration[:, 0] = 1.0
        self.register_buffer("calibration_C2", calibration)
        self.register_buffer("prior_N", torch.zeros(len(experts), dtype=torch.float64))

    def set_calibration(self, calibration_C2: np.ndarray, prior_N: np.ndarray | None = None) -> None:
        """Per-category (τ, β) (module doc) and, optionally, the experts' log prior."""
        c = torch.as_tensor(np.asarray(calibration_C2, dtype=np.float64))
        if c.shape != self.calibration_C2.shape or bool((c < 0).any()):
            raise ValueError(f"need ({len(self.categories)}, 2) non-negative (tau, beta), got {c.tolist()}")
        self.calibration_C2.copy_(c)
        if prior_N is not None:
            self.prior_N.copy_(torch.as_tensor(np.asarray(prior_N, dtype=np.float64)))

    def calibrate_logits(self, raw_QN: np.ndarray, category_Q: np.ndarray) -> np.ndarray:
        """τ_c · raw + β_c · prior for each question's category."""
        cal_QC = self.calibration_C2.numpy()[np.asarray(category_Q, dtype=np.int64)]
        return (
            cal_QC[:, :1] * np.asarray(raw_QN, dtype=np.float64)
            + cal_QC[:, 1:] * self.prior_N.numpy()[None, :]
        )

    def features(self, emb_QD: torch.Tensor, category_Q: torch.Tensor) -> torch.Tensor:
        if not self.cfg.use_category:
            return emb_QD
        onehot_QC = nn.functional.one_hot(category_Q.long(), len(self.categories)).to(emb_QD.dtype)
        return torch.cat([emb_QD, onehot_QC], dim=1)

    def forward(self, emb_QD: torch.Tensor, category_Q: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(emb_QD, category_Q))

    @torch.no_grad()
    def raw_logits(self, emb_QD: np.ndarray, category_Q: np.ndarray) -> np.ndarray:
        """The MLP's logits, before calibration (float64, shape (Q, N))."""
        x = torch.as_tensor(np.asarray(emb_QD, dtype=np.float32))
        c = torch.as_tensor(np.asarray(category_Q, dtype=np.int64))
        return self(x, c).double().numpy()

    def logits(self, emb_QD: np.ndarray, category_Q: np.ndarray) -> np.ndarray:
        """Calibrated logits (module doc): numpy in, numpy out (float64, shape (Q, N))."""
        return self.calibrate_logits(self.raw_logits(emb_QD, category_Q), category_Q)

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
        state.setdefault("calibration_C2", gate.calibration_C2)
        state.setdefault("prior_N", gate.prior_N)
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
