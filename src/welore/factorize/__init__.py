"""Factorisation methods: how a target matrix W becomes the singular triplets its LRC is cut from.

Every method is the SVD of D W S for an input-side scaling S (from calibration inputs) and an
output-side weighting D, with S^-1 and D^-1 folded back, so W = (U/D) diag(s) (V^T S^-1) exactly:

    svd            S = I, D = I             WeLore as published; fp32; no data
    asvd           S = diag(mean|x|^0.5)    ASVD: protects input channels with large activations
    whiten         S = chol(X^T X)          SVD-LLM: dropped s_j are exactly the output error
    whiten-fisher  S = chol(X^T X), D^2 = f + mean f, f = mean (dLoss/dy)^2 per output channel:
                   dropped s_j^2 become an estimate of the loss increase (ours)

A method is one file (a `Factorizer` subclass) plus one line in `METHODS` below; `register` adds one
at run time (the CLI's `--method` choices are read from `METHODS`). The rest of welore only asks a
method two things: its triplets (`decompose`) and, for the `loss` allocation, the estimated loss
increase of keeping k of them (`loss_tails`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ..errors import WeloreError
from ..progress import bar
from ..spectrum import Spectra, fingerprint, max_useful_rank
from ..targets import Target, weight_matrix
from .asvd import ASVD
from .base import Factorizer
from .svd import SVD
from .whiten import Whiten, whitening_factor
from .whiten_fisher import WhitenFisher, output_weights

METHODS: dict[str, Factorizer] = {
    "svd": SVD(),
    "asvd": ASVD(),
    "whiten": Whiten(),
    "whiten-fisher": WhitenFisher(),
}

__all__ = ["METHODS", "Factorizer", "register", "get_method", "analyze_data_aware", "attach_loss_tails",
           "scaling", "whitening_factor", "output_weights", "output_error", "refit_up", "refit_terms",
           "refit_solve", "loss_tail"]


def register(name: str, method: Factorizer) -> Factorizer:
    """Make `method` available as `--method name` (and to every function taking a method name)."""
    if not isinstance(method, Factorizer):
        raise TypeError(f"{method!r} is not a welore.factorize.Factorizer")
    METHODS[name] = method
    return method


def get_method(name: str) -> Factorizer:
    if name not in METHODS:
        raise WeloreError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def scaling(method: str, st) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(S, S^-1, how): the input-side scaling of `method` for statistics `st`."""
    return get_method(method).input_scaling(st)


@torch.no_grad()
def analyze_data_aware(model: nn.Module, targets: list[Target], stats: dict, method: str, *,
                       progress: bool = True) -> Spectra:
    """Like `analyze(keep_factors=True)`, with `method`'s triplets: the spectra are the data-aware
    ones, and the kept factors (U/D, s, V^T S^-1) are what `LowRankLinear.from_svd` takes."""
    fac = get_method(method)
    if fac.needs_stats:
        missing = [t.name for t in targets if t.name not in stats]
        if missing:
            raise WeloreError(f"no calibration statistics for {missing[0]}: {method} needs calibration data")
    if fac.needs_gradients and any(stats[t.name].grad_sq is None for t in targets):
        raise WeloreError(f"{method} needs loss gradients: collect_stats(..., gradients=True)")
    values, fps, factors, how = {}, {}, {}, {}
    start = time.perf_counter()
    for t in bar(targets, desc=f"SVD ({method})", unit="matrix", progress=progress):
        module = model.get_submodule(t.name)
        w = weight_matrix(module).detach()
        if not torch.isfinite(w).all():
            raise WeloreError(f"weights of {t.name} contain NaN or Inf")
        U, s, Vh, how[t.name] = fac.decompose(w, stats.get(t.name) if stats else None, max_useful_rank(*t.shape))
        factors[t.name] = (U.float().cpu(), s[: U.shape[1]].float().cpu(), Vh.float().cpu())
        values[t.name] = s.float().cpu()
        fps[t.name] = fingerprint(module.weight)
    return Spectra(list(targets), values, fps, factors, time.perf_counter() - start, how=how)


@torch.no_grad()
def attach_loss_tails(model: nn.Module, spectra: Spectra, stats: dict, method: str) -> Spectra:
    """Set `spectra.tails[name][k]` (k = 0..r) to the estimated loss increase of keeping only the
    leading k triplets of `spectra.factors[name]`: what the `loss` allocation minimises (see
    `Factorizer.loss_tails`)."""
    if any(t.name not in stats or stats[t.name].grad_sq is None for t in spectra.targets):
        raise WeloreError("the loss allocation needs calibration statistics with loss gradients")
    if any(t.name not in spectra.factors for t in spectra.targets):
        raise WeloreError("the loss allocation needs the SVD factors (spectra loaded from a file have none)")
    fac = get_method(method)
    spectra.tails = {t.name: loss_tail(fac, weight_matrix(model.get_submodule(t.name)).detach(),
                                       spectra.factors[t.name], spectra.values[t.name], stats[t.name])
                     for t in spectra.targets}
    return spectra


def loss_tail(fac: Factorizer, w: torch.Tensor, factors, values: torch.Tensor, st) -> np.ndarray:
    """Estimated loss increase (numpy, k = 0..r) of keeping only the leading k of `factors`."""
    drop, total = fac.loss_tails(w, factors, values, st)
    kept = torch.cat([torch.zeros(1, dtype=drop.dtype), drop.cpu().cumsum(0)])
    return (total.cpu() - kept).clamp_min(0).numpy()


def output_error(w: torch.Tensor, w_approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ||(W - W') X^T||_F / ||W X^T||_F, via the Gram."""
    d = (w - w_approx).double()
    num = torch.einsum("ij,jk,ik->", d, gram, d)
    den = torch.einsum("ij,jk,ik->", w.double(), gram, w.double())
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-300))


def refit_up(w: torch.Tensor, down: torch.Tensor, gram: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Closed-form least-squares `up` for a fixed `down`: argmin_B ||W X^T - B A X^T||_F
    = W G A^T (A G A^T)^-1, with G the input Gram matrix."""
    return refit_solve(*refit_terms(w, down, gram), ridge)


def refit_terms(w: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W G A^T, A G A^T) in float64. For the leading k rows of A they are the leading k columns /
    k x k block, so terms taken once at the largest rank serve every rank (the streaming path keeps
    them instead of the Gram matrix, which can be larger)."""
    W, A, G = w.double(), down.double(), gram.double()
    AG = A @ G
    return (W @ G @ A.T), AG @ A.T


def refit_solve(wgat: torch.Tensor, agat: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    M = agat + ridge * agat.diagonal().mean().clamp_min(1e-12) * torch.eye(agat.shape[0], dtype=agat.dtype,
                                                                           device=agat.device)
    return torch.linalg.solve(M, wgat.T).T
