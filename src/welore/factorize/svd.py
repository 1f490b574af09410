"""`svd`: WeLore as published: the plain SVD of W, in float32, no data."""

from __future__ import annotations

import torch

from ..spectrum import truncated_svd
from .base import Factorizer


class SVD(Factorizer):
    needs_stats = False
    is_weight_svd = True

    def decompose(self, w: torch.Tensor, st, rank: int):
        # the same fp32 SVD as `welore.analyze(keep_factors=True)`, so both give identical factors
        U, S, Vh = truncated_svd(w, rank)
        return U, S, Vh, "svd"
