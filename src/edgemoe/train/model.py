"""The router-side half of the image MoE classifier: backbone, gate and classification head.

One sample becomes ``tokens_per_sample`` = P *tokens* of dimension D: with P = 1 the backbone's
pooled feature vector, with P > 1 the patches of a sqrt(P) x sqrt(P) grid over the feature map
(image patches), each with a learned position embedding. The gate (any router of :mod:`edgemoe.moe`, by
name) scores the J experts per token; the experts themselves live on the edge servers
(:mod:`edgemoe.train.server`). With expert outputs ``y_k`` for a token's kept experts and combine
weights ``w_k``, each token becomes ``norm(h + sum_k w_k y_k)`` (``residual: false`` drops ``h``), and
the logits are ``head(the sample's P tokens concatenated)``.

The combine weights are the gate scores at the kept experts divided by their (detached) sum: the
forward value is the usual renormalised weight, and the gate still gets a gradient at K = 1, where
the renormalised weight is the constant 1.

The model holds no popularity prior. It does hold ``route_bias_E``, a per-expert bias on the gate
scores learned during training from the controller's operating point (see
:meth:`RouterSide.update_route_bias`) and used by inference routing: top-K of ``scores + bias``.
It is a buffer, saved with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from edgemoe.config import ConfigError, check_choice, require
from edgemoe.moe import resolve_router_config
from edgemoe.moe.routing import combine_weights
from edgemoe.train.data import patchify


@dataclass
class ModelConfig:
    """Backbone and gate of the router-side model; expert width for the servers."""

    backbone: Literal["cnn", "vit"] = "cnn"
    dim: int = 64
    expert_hidden: int = 128
    router: str = "topk"
    router_options: dict | None = None
    router_capacity_factor: float = 0.0
    channels: int = 32
    patch: int = 4
    vit_depth: int = 2
    vit_heads: int = 4
    aux_coef: float = 0.0
    residual: bool = True
    tokens_per_sample: int = 1
    bias_rate: float = 1e-3

    def __post_init__(self) -> None:
        check_choice(self.backbone, "model.backbone", ("cnn", "vit"))
        for name in ("dim", "expert_hidden", "channels", "patch", "vit_depth", "vit_heads"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"model.{name}",
                f"must be a positive integer, got {value!r}",
            )
        require(
            self.backbone != "vit" or self.dim % self.vit_heads == 0,
            "model.vit_heads",
            f"must divide model.dim={self.dim}, got {self.vit_heads}",
        )
        p = self.tokens_per_sample
        require(
            isinstance(p, int) and p >= 1 and math.isqrt(p) ** 2 == p,
            "model.tokens_per_sample",
            f"must be a perfect square >= 1 (a grid of image patches: 1, 4, 16, ...), got {p!r}",
        )
        require(
            self.bias_rate >= 0 and math.isfinite(self.bias_rate),
            "model.bias_rate",
            f"must be a finite number >= 0, got {self.bias_rate!r}",
        )
        require(
            self.aux_coef >= 0 and math.isfinite(self.aux_coef),
            "model.aux_coef",
            f"must be a finite number >= 0, got {self.aux_coef!r}",
        )


class CNNBackbone(nn.Module):
    """Two 3x3 conv blocks, average pooling to a grid of cells (4x4, or finer when sqrt(P) > 4),
    cut into sqrt(P) x sqrt(P) patches of cells; each patch (its cells flattened, layout kept) is
    projected to ``dim`` and, when P > 1, given a learned position embedding. P = 1 is the whole 4x4
    grid in one token. Output ``[N, P, D]``."""

    def __init__(self, in_channels: int, channels: int, dim: int, tokens: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2)
        self.side = math.isqrt(tokens)
        self.cells = self.side * -(-4 // self.side)  # a multiple of sqrt(P), at least 4
        per_patch = (self.cells // self.side) ** 2
        self.proj = nn.Linear(2 * channels * per_patch, dim)
        self.pos_PD = nn.Parameter(torch.randn(tokens, dim) * 0.02) if tokens > 1 else None

    def forward(self, x_NCHW: Tensor) -> Tensor:
        x = nn.functional.relu(self.conv1(x_NCHW))
        x = nn.functional.relu(self.conv2(x))
        grid = nn.functional.adaptive_avg_pool2d(x, self.cells)
        n, c, side, cell = grid.shape[0], grid.shape[1], self.side, self.cells // self.side
        patches_NPF = (
            grid.reshape(n, c, side, cell, side, cell).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, -1)
        )
        tokens_NPD = self.proj(patches_NPF)
        return tokens_NPD if self.pos_PD is None else tokens_NPD + self.pos_PD


class ViTBackbone(nn.Module):
    """ViT-tiny: patch tokens, learned positions, a few pre-norm encoder layers; the patch grid is
    average-pooled to sqrt(P) x sqrt(P) tokens (P = 1: mean-pooled). Output ``[N, P, D]``."""

    def __init__(
        self, in_channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int, tokens: int = 1
    ):
        super().__init__()
        side = image_size // patch
        self.grid = math.isqrt(tokens)
        if self.grid > side:
            raise ConfigError(
                "model.tokens_per_sample", f"must be at most the {side * side} ViT patches, got {tokens}"
            )
        if image_size % patch:
            raise ConfigError("model.patch", f"must divide the image size {image_size}, got {patch}")
        self.patch = patch
        num_patches = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos_PD = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_NCHW: Tensor) -> Tensor:
        tokens_NPD = self.embed(patchify(x_NCHW, self.patch)) + self.pos_PD
        out_NPD = self.norm(self.encoder(tokens_NPD))
        n, p, d = out_NPD.shape
        side = math.isqrt(p)
        grid_NDHW = out_NPD.transpose(1, 2).reshape(n, d, side, side)
        return nn.functional.adaptive_avg_pool2d(grid_NDHW, self.grid).flatten(2).transpose(1, 2)


class RouterSide(nn.Module):
    """Backbone + gate + head: everything of the model that lives at the router (rank 0).

    Tokens are handled flat, ``T = N * P`` rows in sample order (a sample's P tokens are adjacent).
    """

    route_bias_E: Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        num_experts: int,
        top_k: int,
        aux_coef: float | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.tokens = cfg.tokens_per_sample
        self.aux_coef = cfg.aux_coef if aux_coef is None else aux_coef
        self.top_k = top_k
        if cfg.backbone == "cnn":
            self.backbone: nn.Module = CNNBackbone(in_channels, cfg.channels, cfg.dim, self.tokens)
        else:
            self.backbone = ViTBackbone(
                in_channels, image_size, cfg.patch, cfg.dim, cfg.vit_depth, cfg.vit_heads, self.tokens
            )
        router_cfg = resolve_router_config(
            {
                "name": cfg.router,
                "top_k": top_k,
                "capacity_factor": cfg.router_capacity_factor,
                **(cfg.router_options or {}),
            },
            field="model.router",
        )
        self.router = router_cfg.build(cfg.dim, num_experts)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(self.tokens * cfg.dim, num_classes)
        self.register_buffer("route_bias_E", torch.zeros(num_experts))

    @property
    def num_experts(self) -> int:
        return int(self.route_bias_E.numel())

    def features(self, x_NCHW: Tensor) -> Tensor:
        """The tokens of each sample, flattened: ``h`` [N * P, D]."""
        return self.backbone(x_NCHW).flatten(0, 1)

    def gate(self, h_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_TE, scores_TE)``: the router's gate, nothing folded in."""
        return self.router.gate(h_TD)

    def route(self, scores_TE: Tensor, live_E: Tensor, *, biased: bool = True) -> Tensor:
        """Inference routing: top-K of ``scores + route_bias`` (or plain scores) over live experts."""
        values_TE = scores_TE + self.route_bias_E if biased else scores_TE.clone()
        values_TE[:, ~live_E] = -torch.inf
        return values_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_route_bias(self, scores_TE: Tensor, target_E: Tensor, live_E: Tensor) -> None:
        """One auxiliary-loss-free balancing step toward the controller's operating point: each live
        expert's bias moves by ``bias_rate`` toward the share of assignments the controller gave it
        this slot (``target_E``, counts), measured against what top-K of scores + bias would give."""
        if len(scores_TE) == 0 or self.cfg.bias_rate == 0:
            return
        ids_TK = self.route(scores_TE, live_E)
        mine_E = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts).to(scores_TE.dtype)
        step_E = torch.sign(target_E.to(scores_TE.dtype) - mine_E) * live_E.to(scores_TE.dtype)
        self.route_bias_E += self.cfg.bias_rate * step_E
        self.route_bias_E -= self.route_bias_E[live_E].mean()

    def classify(
        self, h_TD: Tensor, scores_TE: Tensor, expert_ids_TK: Tensor, y_TKD: Tensor, kept_TK: Tensor
    ) -> Tensor:
        """Logits per sample [N, classes] from its P tokens (concatenated, in patch order), their kept
        expert outputs and combine weights (gate scores over their detached sum, so the gate learns
        at every K)."""
        gate_TK = scores_TE.gather(1, expert_ids_TK.clamp_min(0))
        kept_gate_TK = combine_weights(gate_TK, kept_TK, renormalize=False)
        weights_TK = kept_gate_TK / kept_gate_TK.sum(dim=-1, keepdim=True).detach().clamp_min(1e-9)
        mixed_TD = (weights_TK.unsqueeze(-1) * y_TKD).sum(dim=1)
        if self.cfg.residual:
            mixed_TD = mixed_TD + h_TD
        tokens_TD = self.norm(mixed_TD)
        return self.head(tokens_TD.reshape(-1, self.tokens * tokens_TD.shape[-1]))

    def aux_loss(
        self, logits_TE: Tensor, scores_TE: Tensor, expert_ids_TK: Tensor, kept_TK: Tensor
    ) -> Tensor:
        """The router's load-balance loss for the realised assignment, weighted by ``aux_coef``."""
        if self.aux_coef == 0:
            return logits_TE.new_zeros(())
        losses = self.router.aux_losses(logits_TE, scores_TE, expert_ids_TK.clamp_min(0), kept_TK)
        return self.aux_coef * losses["load_balance"]
