"""`whiten` (SVD-LLM, Wang et al. 2024): S = L with L L^T = X^T X, the Cholesky factor of the input
Gram matrix. Then ||W X^T - W_k X^T||_F = ||(W - W_k) L||_F, so truncating the SVD of W L is
*optimal* for the output error, and the dropped singular values are exactly that error.

Cholesky fails on a rank-deficient Gram matrix (dead channels, too few tokens: a known failure of
SVD-LLM's code), so it is regularised (ridge scaled to the mean diagonal), retried in float64 with
more ridge, and finally replaced by the symmetric square root from an eigendecomposition."""

from __future__ import annotations

import torch

from .base import Factorizer


def whitening_factor(gram: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(S, S^-1, how) with S S^T = gram + ridge: Cholesky, Cholesky with more ridge, or eigh."""
    n = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(n, dtype=torch.float64, device=gram.device)
    for r in (ridge, ridge * 100, ridge * 1e4):
        L, info = torch.linalg.cholesky_ex(gram.double() + r * scale * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            return L, torch.linalg.solve_triangular(L, eye, upper=False), f"cholesky(ridge={r:g})"
    # symmetric square root: always exists for a PSD matrix once tiny eigenvalues are clamped
    evals, Q = torch.linalg.eigh(gram.double())
    evals = evals.clamp_min(ridge * scale)
    return Q * evals.sqrt(), (Q / evals.sqrt()).T, "eigh"


class Whiten(Factorizer):
    def input_scaling(self, st) -> tuple[torch.Tensor, torch.Tensor, str]:
        return whitening_factor(st.gram)
