"""Experts as batched weights: E MLPs stored as ``[E, D, F]`` and ``[E, H, D]`` tensors.

Weights are kept pre-transposed for ``x @ W`` so every expert GEMM reads them contiguously. For
SwiGLU the gate and up projections are fused in one ``[E, D, 2H]`` tensor (columns ``[:H]`` gate,
``[H:]`` up), so both come out of one GEMM. How the experts execute is the backend's job
(:mod:`edgemoe.moe.backends`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemoe.moe.buffers import GradBuffers, SortedBuffers


class GroupedExperts(nn.Module):
    """E independent expert MLPs of width ``dim -> hidden_dim -> dim`` (no biases)."""

    row_buffers: SortedBuffers

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, kind: str = "swiglu", init_std: float = 0.02
    ):
        super().__init__()
        if kind not in ("swiglu", "mlp"):
            raise ValueError(f"expert: must be 'swiglu' or 'mlp', got {kind!r}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.kind = kind
        in_width = 2 * hidden_dim if kind == "swiglu" else hidden_dim
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out_EHD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters(init_std)
        # Storage the ``sorted`` backend reuses across steps (not state: never saved or loaded).
        self.row_buffers = SortedBuffers()
        self.grad_buffers = GradBuffers()

    def reset_parameters(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.w_in_EDF, std=init_std)
        nn.init.normal_(self.w_out_EHD, std=init_std / math.sqrt(2.0))

    def activation(self, h_NF: Tensor) -> Tensor:
        """Hidden activation: ``silu(gate) * up`` (SwiGLU) or ``gelu(h)`` (MLP)."""
        if self.kind == "swiglu":
            gate_NH, up_NH = h_NF.chunk(2, dim=-1)
            return F.silu(gate_NH) * up_NH
        return F.gelu(h_NF)

    def expert_forward(self, x_ND: Tensor, expert: int) -> Tensor:
        """Reference forward of one expert on its tokens."""
        return self.activation(x_ND @ self.w_in_EDF[expert]) @ self.w_out_EHD[expert]

    def dense_forward(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: ``[E, T, D]`` (the reference for k = E)."""
        h_ETF = torch.einsum("td,edf->etf", x_TD, self.w_in_EDF)
        return torch.einsum("eth,ehd->etd", self.activation(h_ETF), self.w_out_EHD)
