"""Router auxiliary losses and statistics (closed forms, no coefficients: the caller applies them)."""

from __future__ import annotations

import torch
from torch import Tensor


def count_per_expert(expert_ids: Tensor, num_experts: int, weights: Tensor | None = None) -> Tensor:
    """``[E]`` (weighted) count of each expert id, by scatter-add.

    Unlike ``torch.bincount``, which reads the largest id back to size its output on an
    accelerator, this never syncs with the host. Integer counts unless ``weights`` are given.
    """
    ids = expert_ids.reshape(-1)
    src = torch.ones_like(ids) if weights is None else weights.reshape(-1)
    return src.new_zeros(num_experts).scatter_add_(0, ids, src)


def load_balance_loss(scores_TE: Tensor, expert_ids_TK: Tensor, proposed_TK: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of proposed assignments that chose expert e (counted before any capacity
    drop, not differentiable) and ``P_e`` the mean gate score of expert e over the tokens. It is 1
    for perfectly uniform routing and grows with imbalance.
    """
    num_experts = scores_TE.shape[-1]
    mask = None if proposed_TK is None else proposed_TK.to(torch.float32)
    counts_E = count_per_expert(expert_ids_TK, num_experts, mask).to(scores_TE.dtype)
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
