"""The router-side half of the image MoE classifier: backbone, gate and classification head.

One sample becomes one *token*: the backbone's feature vector ``h`` (dimension D). The gate (any
router of :mod:`edgemoe.moe`, by name) scores the J experts; the experts themselves live on the edge
servers (:mod:`edgemoe.train.server`). With expert outputs ``y_k`` for the token's kept experts and
combine weights ``w_k`` (gate scores at those experts, renormalised), the logits are
``head(norm(h + sum_k w_k y_k))`` (``residual: false`` drops the ``h`` term, so every prediction
goes through the experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
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
        require(
            self.aux_coef >= 0 and math.isfinite(self.aux_coef),
            "model.aux_coef",
            f"must be a finite number >= 0, got {self.aux_coef!r}",
        )


class CNNBackbone(nn.Module):
    """Two 3x3 conv blocks, average pooling to a 4x4 grid (keeps layout), linear projection to ``dim``."""

    def __init__(self, in_channels: int, channels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2)
        self.proj = nn.Linear(2 * channels * 16, dim)

    def forward(self, x_NCHW: Tensor) -> Tensor:
        x = nn.functional.relu(self.conv1(x_NCHW))
        x = nn.functional.relu(self.conv2(x))
        return self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class ViTBackbone(nn.Module):
    """ViT-tiny: patch tokens, learned positions, a few pre-norm encoder layers, mean-pooled."""

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
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
        return self.norm(self.encoder(tokens_NPD)).mean(dim=1)


class RouterSide(nn.Module):
    """Backbone + gate + head: everything of the model that lives at the router (rank 0).

    ``prior_J`` is an optional fixed expert-popularity prior multiplied into the gate scores (the
    scenario's skew); it is a buffer, not learned, and is saved with the model.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        num_experts: int,
        top_k: int,
        prior_J: np.ndarray | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "cnn":
            self.backbone = CNNBackbone(in_channels, cfg.channels, cfg.dim)
        else:
            self.backbone = ViTBackbone(
                in_channels, image_size, cfg.patch, cfg.dim, cfg.vit_depth, cfg.vit_heads
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
        self.head = nn.Linear(cfg.dim, num_classes)
        prior = torch.ones(num_experts) if prior_J is None else torch.as_tensor(prior_J, dtype=torch.float32)
        require(
            prior.shape == (num_experts,) and bool((prior > 0).all()),
            "gate_prior",
            f"must be {num_experts} positive weights",
        )
        self.register_buffer("prior_E", prior / prior.sum())

    @property
    def num_experts(self) -> int:
        return int(self.prior_E.numel())

    def features(self, x_NCHW: Tensor) -> Tensor:
        """The token of each sample: ``h`` [N, D]."""
        return self.backbone(x_NCHW)

    def gate(self, h_ND: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_NE, scores_NE)``: the router's gate with the popularity prior folded in."""
        logits_NE, scores_NE = self.router.gate(h_ND)
        scores_NE = scores_NE * self.prior_E
        return logits_NE, scores_NE / scores_NE.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def classify(
        self, h_ND: Tensor, scores_NE: Tensor, expert_ids_NK: Tensor, y_NKD: Tensor, kept_NK: Tensor
    ) -> Tensor:
        """Logits from the token, its kept expert outputs and the gate-score combine weights."""
        gate_NK = scores_NE.gather(1, expert_ids_NK.clamp_min(0))
        weights_NK = combine_weights(gate_NK, kept_NK, renormalize=True)
        mixed_ND = (weights_NK.unsqueeze(-1) * y_NKD).sum(dim=1)
        if self.cfg.residual:
            mixed_ND = mixed_ND + h_ND
        return self.head(self.norm(mixed_ND))

    def aux_loss(
        self, logits_NE: Tensor, scores_NE: Tensor, expert_ids_NK: Tensor, kept_NK: Tensor
    ) -> Tensor:
        """The router's load-balance loss for the realised assignment, weighted by ``aux_coef``."""
        if self.cfg.aux_coef == 0:
            return logits_NE.new_zeros(())
        losses = self.router.aux_losses(logits_NE, scores_NE, expert_ids_NK.clamp_min(0), kept_NK)
        return self.cfg.aux_coef * losses["load_balance"]
