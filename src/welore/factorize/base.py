"""The Factorizer interface: the SVD of D W S, folded back (see welore.factorize)."""

from __future__ import annotations

import torch

from ..spectrum import thin_svd


class Factorizer:
    """One factorisation method. Subclasses override `input_scaling` and/or `output_weights`
    (or `decompose` itself); the defaults are the identity, i.e. plain SVD in float64."""

    needs_stats: bool = True  # calibration statistics (InputStats) of each matrix's inputs
    needs_gradients: bool = False  # ... with loss gradients (collect_stats(gradients=True))
    # its triplets are the weight spectrum's own, so `analyze(keep_factors=True)` gives both in one SVD
    is_weight_svd: bool = False

    def input_scaling(self, st) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """(S, S^-1, how) for one matrix, or None for S = I."""
        return None

    def output_weights(self, st) -> torch.Tensor | None:
        """D's diagonal (float64, one per output channel), or None for D = I."""
        return None

    def decompose(self, w: torch.Tensor, st, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """(U/D [:, :rank], all singular values s, (V^T S^-1)[:rank], how) of D W S, in float64."""
        w = w.double()
        scale = self.input_scaling(st)
        S, S_inv, how = scale if scale is not None else (None, None, "none")
        d = self.output_weights(st)
        a = w if S is None else w @ S.to(w.device)
        U, s, Vh = thin_svd(a if d is None else d.to(w.device)[:, None] * a)
        U = U[:, :rank] if d is None else U[:, :rank] / d.to(w.device)[:, None]
        return U, s, (Vh[:rank] if S_inv is None else Vh[:rank] @ S_inv.to(w.device)), how

    def loss_tails(self, w: torch.Tensor, factors, values: torch.Tensor, st) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss-increase estimate of dropping each kept triplet, total with none kept).

        With factors W = sum_j s_j u_j v_j^T and u orthonormal (svd, asvd, whiten), the output error
        of dropping triplet j is s_j^2 v_j^T G v_j (G the input Gram matrix) and the errors of
        different j add up (the cross terms vanish); each is weighted by the matrix's mean squared
        output gradient."""
        U, s, Vh = (f.double() for f in factors)
        G = st.gram.double().to(Vh.device)
        w = w.double().to(Vh.device)
        scale = st.grad_sq.double().mean().to(Vh.device)
        total = scale * torch.einsum("ij,jk,ik->", w, G, w)
        return scale * s.pow(2) * torch.einsum("kj,jl,kl->k", Vh, G, Vh), total
