"""`asvd` (ASVD, Yuan et al. 2023): S = diag(mean |x_j|^alpha), so input channels that carry large
activations (the outlier features of real LLMs) are protected."""

from __future__ import annotations

import torch

from .base import Factorizer


class ASVD(Factorizer):
    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    def input_scaling(self, st) -> tuple[torch.Tensor, torch.Tensor, str]:
        s = st.abs_mean.clamp_min(1e-6) ** self.alpha
        return torch.diag(s), torch.diag(1 / s), f"asvd(alpha={self.alpha:g})"
