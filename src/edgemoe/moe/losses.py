"""Router auxiliary losses and statistics (closed forms, no coefficients: the caller applies them)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(scores_TE: Tensor, expert_ids_TK: Tensor, proposed_TK: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of proposed assignments that chose expert e (counted before any capacity
    drop, not differentiable) and ``P_e`` the mean gate score of expert e over the tokens. It is 1
    for perfectly uniform routing and grows with imbalance.
    """
    num_experts = scores_TE.shape[-1]
    ids = expert_ids_TK.reshape(-1)
    mask = None if proposed_TK is None else proposed_TK.reshape(-1).to(scores_TE.dtype)
    counts_E = torch.bincount(ids, weights=mask, minlength=num_experts).to(scores_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = scores_TE.mean(dim=0)
    return num_experts * (f_E.detach() * p_E).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``."""
    acc = torch.float32 if logits_TE.dtype in (torch.float16, torch.bfloat16) else logits_TE.dtype
    return torch.logsumexp(logits_TE.to(acc), dim=-1).square().mean().to(logits_TE.dtype)


def router_entropy(scores_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the gate distribution; sigmoid scores are normalised first."""
    p_TE = scores_TE.detach().float()
    p_TE = p_TE / p_TE.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p_TE * p_TE.clamp_min(1e-12).log()).sum(dim=-1).mean()
