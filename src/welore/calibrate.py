"""Data-aware factorisation on top of WeLore's allocation: ASVD and SVD-LLM whitening.

Plain SVD keeps the directions of largest *weight* energy; what matters is the layer's *output*,
W x, on real inputs. Both methods factorise W S for an invertible S built from calibration
activations and fold S^-1 back into the down factor:

    W ~= (U_k sqrt(s_k)) (sqrt(s_k) V_k^T S^-1)       where W S = U diag(s) V^T

* `asvd` (ASVD, Yuan et al. 2023): S = diag(mean |x_j|^alpha): input channels that carry large
  activations are protected.
* `whiten` (SVD-LLM, Wang et al. 2024): S = L with L L^T = X^T X (Cholesky of the input Gram matrix).
  Then ||W X^T - W_k X^T||_F = ||(W - W_k) L||_F, so truncating the SVD of W L is *optimal* for the
  output error, and the dropped singular values are exactly the output error. Cholesky fails on a
  rank-deficient Gram matrix (dead channels, too few tokens: a known failure of SVD-LLM's code), so
  it is regularised (ridge scaled to the mean diagonal), retried in float64 with more ridge, and
  finally replaced by the symmetric square root from an eigendecomposition, which always exists.
* `whiten-fisher` (ours): whitening on the input side *and* a diagonal Fisher weighting on the
  output side: the SVD of D W L with D = diag(sqrt(f + damp * mean f)), f the mean squared
  gradient of the LM loss with respect to each output channel. A first-order view of the loss,
  dL ~ g . dy, says output errors matter in proportion to g^2, so channels the loss is sensitive to
  are protected (FWSVD weights rows the same way, from weight gradients). Dropped singular values
  are then the Fisher-weighted output error, the loss-increase estimate the `loss` allocation uses.

The `loss` allocation (see welore.allocate) needs, per matrix, the estimated loss increase of
keeping only k singular triplets, for every k: `attach_loss_tails` computes it from the factors and
the statistics, for any method (see its docstring).

Calibration statistics come from forward hooks on the target modules while C4 training documents
(never the evaluation text) run through the model. Modules that read the same input tensor (q/k/v,
gate/up) share one Gram matrix, and blocks are hooked in groups sized to `max_stats_gib`, so memory
stays bounded on large models at the price of more passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import WeloreError
from .evaluate import encode_corpus
from .progress import bar
from .spectrum import Spectra, analyze, fingerprint, max_useful_rank
from .targets import Target, weight_matrix

METHODS = ("svd", "asvd", "whiten", "whiten-fisher")
FISHER_DAMP = 1.0  # f + FISHER_DAMP * mean(f): no channel is ignored; 0.1-1 measured alike on SmolLM2


@dataclass
class InputStats:
    """Second-moment statistics of one target's inputs (rows = tokens, columns = input channels)."""

    gram: torch.Tensor  # X^T X (in x in), float64
    abs_mean: torch.Tensor  # mean |x_j| per input channel, float64
    tokens: int
    grad_sq: torch.Tensor | None = None  # mean squared dLoss/dy per output channel (collect_stats(gradients=True))


@dataclass
class Calibration:
    stats: dict[str, InputStats]
    samples: int
    seqlen: int
    corpus: str
    tokens: int = 0
    info: dict = field(default_factory=dict)


def calibration_batches(tokenizer, samples: int, seqlen: int, corpus: str = "c4-train", seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens from `corpus` (a training corpus, by default)."""
    if corpus in ("c4", "wikitext2"):
        raise WeloreError(f"{corpus} is evaluation text; calibrate on c4-train")
    if samples <= 0 or seqlen <= 1:
        raise WeloreError(f"calibration needs samples > 0 and seqlen > 1, got {samples} x {seqlen}")
    if tokenizer is None:
        raise WeloreError("calibration needs a tokenizer, and this model has none")
    ids = encode_corpus(tokenizer, corpus)
    if ids.numel() < samples * seqlen:
        raise WeloreError(f"too few calibration tokens: {corpus} has {ids.numel():,}, "
                          f"{samples} x {seqlen} = {samples * seqlen:,} needed")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts])


def collect_stats(model: nn.Module, targets: list[Target], batches: torch.Tensor, *, max_stats_gib: float = 4.0,
                  gradients: bool = False, progress: bool = True) -> dict[str, InputStats]:
    """Input statistics of every target (see module docstring for sharing and grouping).

    gradients: also backpropagate the LM loss of each calibration sequence (labels = the sequence)
    and record the mean squared gradient per output channel of every target (`grad_sq`).
    Only activations get gradients (the weights' are never formed), so it costs about two forwards.
    """
    device = next(model.parameters()).device
    # group blocks so that one group's Gram matrices fit in max_stats_gib (float64)
    by_layer: dict[object, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    groups, current, size = [], [], 0.0
    for layer_targets in by_layer.values():
        need = sum(t.in_features ** 2 * 8 for t in layer_targets) / 2**30
        if current and size + need > max_stats_gib:
            groups.append(current)
            current, size = [], 0.0
        current += layer_targets
        size += need
    groups.append(current)

    out: dict[str, InputStats] = {}
    pbar = bar(total=len(groups) * len(batches), desc="Calibration passes", unit="seq", progress=progress)
    was_training = model.training
    model.eval()  # statistics of the model as it is used: no dropout
    try:
        for group in groups:
            out.update(_collect_group(model, group, batches, device, pbar, gradients))
    finally:
        model.train(was_training)
        pbar.close()
    return out


def _collect_group(model: nn.Module, group: list[Target], batches: torch.Tensor, device, pbar,
                   gradients: bool) -> dict[str, InputStats]:
    owner: dict[str, str] = {}  # module -> the module whose identical input tensor it shares
    first_pass: list[tuple[torch.Tensor, str]] = []  # references keep addresses from being reused
    acc: dict[str, list] = {}
    grad_acc: dict[str, torch.Tensor] = {}

    def grad_hook(name):
        def fn(module, args, output):
            def on_grad(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)
                grad_acc[name] = grad_acc[name] + g2 if name in grad_acc else g2
            if output.requires_grad:
                output.register_hook(on_grad)
        return fn

    def hook(name):
        def fn(module, args):
            x = args[0]
            if name not in owner:
                owner[name] = next((o for t, o in first_pass if t is x), name)
                first_pass.append((x, name))
            if owner[name] != name:
                return
            # fp32 product per sequence (fast), fp64 running sum (no drift over many sequences)
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            gram, abs_sum = (xf.T @ xf).double(), xf.abs().sum(0).double()
            if name in acc:
                acc[name][0] += gram
                acc[name][1] += abs_sum
                acc[name][2] += xf.shape[0]
            else:
                acc[name] = [gram, abs_sum, xf.shape[0]]
        return fn

    handles = [model.get_submodule(t.name).register_forward_pre_hook(hook(t.name)) for t in group]
    if gradients:
        handles += [model.get_submodule(t.name).register_forward_hook(grad_hook(t.name)) for t in group]
    try:
        for seq in batches:
            ids = seq[None].to(device)
            if gradients:
                with torch.enable_grad():
                    # gradients flow to a leaf copy of the embeddings, never to the weights
                    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
                    loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
                    torch.autograd.grad(loss, emb)
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            first_pass.clear()
            pbar.update(1)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for t in group:
        gram, abs_sum, n = acc[owner[t.name]]
        g2 = grad_acc[t.name] / n if t.name in grad_acc else None
        if gradients and g2 is None:
            raise WeloreError(f"no loss gradient reached {t.name}: is it used by the forward pass?")
        out[t.name] = InputStats(gram, abs_sum / n, n, g2)
    return out


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


def scaling(method: str, st: InputStats, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(S, S^-1, how) for one matrix: the input-side scaling."""
    if method == "asvd":
        s = st.abs_mean.clamp_min(1e-6) ** alpha
        return torch.diag(s), torch.diag(1 / s), f"asvd(alpha={alpha:g})"
    if method in ("whiten", "whiten-fisher"):
        return whitening_factor(st.gram)
    raise ValueError(method)


def output_weights(st: InputStats, damp: float = FISHER_DAMP) -> torch.Tensor:
    """D's diagonal for `whiten-fisher`: sqrt(f + damp * mean f) per output channel (float64)."""
    if st.grad_sq is None:
        raise WeloreError("whiten-fisher needs loss gradients: collect_stats(..., gradients=True)")
    f = st.grad_sq.double()
    return (f + damp * f.mean()).clamp_min(1e-30).sqrt()


@torch.no_grad()
def analyze_data_aware(model: nn.Module, targets: list[Target], stats: dict[str, InputStats], method: str, *,
                       alpha: float = 0.5, progress: bool = True) -> Spectra:
    """Like `analyze(keep_factors=True)`, but the SVD is of W S: the spectra are the data-aware ones,
    and the kept factors are (U, s, V^T S^-1), which `LowRankLinear.from_svd` turns into the
    data-aware factors unchanged."""
    if method == "svd":
        return analyze(model, targets, keep_factors=True, progress=progress)
    if method not in METHODS:
        raise WeloreError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    missing = [t.name for t in targets if t.name not in stats]
    if missing:
        raise WeloreError(f"no calibration statistics for {missing[0]}: {method} needs calibration data")
    if method == "whiten-fisher" and any(stats[t.name].grad_sq is None for t in targets):
        raise WeloreError("whiten-fisher needs loss gradients: collect_stats(..., gradients=True)")
    values, fps, factors, how = {}, {}, {}, {}
    import time

    start = time.perf_counter()
    for t in bar(targets, desc=f"SVD of W*S ({method})", unit="matrix", progress=progress):
        module = model.get_submodule(t.name)
        w = weight_matrix(module).detach().double()
        if not torch.isfinite(w).all():
            raise WeloreError(f"weights of {t.name} contain NaN or Inf")
        S, S_inv, how[t.name] = scaling(method, stats[t.name], alpha)
        S, S_inv = S.to(w.device), S_inv.to(w.device)
        d = output_weights(stats[t.name]).to(w.device) if method == "whiten-fisher" else None
        U, s, Vh = torch.linalg.svd(w @ S if d is None else d[:, None] * (w @ S), full_matrices=False)
        r = max_useful_rank(*t.shape)
        U = U[:, :r] if d is None else U[:, :r] / d[:, None]  # fold D^-1 back into the up factor
        factors[t.name] = (U.float().cpu(), s[:r].float().cpu(), (Vh[:r] @ S_inv).float().cpu())
        values[t.name] = s.float().cpu()
        fps[t.name] = fingerprint(module.weight)
    spectra = Spectra(list(targets), values, fps, factors, time.perf_counter() - start)
    spectra.how = how  # which square root each matrix got (reported; the eigh fallback is worth knowing)
    return spectra


@torch.no_grad()
def attach_loss_tails(model: nn.Module, spectra: Spectra, stats: dict[str, InputStats], method: str) -> Spectra:
    """Set `spectra.tails[name][k]` (k = 0..r) to the estimated loss increase of keeping only the
    leading k triplets of `spectra.factors[name]`: what the `loss` allocation minimises.

    The estimate is the Fisher-weighted output error on the calibration data. With factors
    W = sum_j s_j u_j v_j^T (u orthonormal: svd, asvd, whiten), the output error of dropping triplet
    j is s_j^2 v_j^T G v_j and the errors of different j add up (the cross terms vanish), weighted by
    the matrix's mean squared output gradient. For whiten-fisher the weighting is already inside the
    SVD and the error is exactly the sum of the dropped s_j^2.
    """
    if any(t.name not in stats or stats[t.name].grad_sq is None for t in spectra.targets):
        raise WeloreError("the loss allocation needs calibration statistics with loss gradients")
    if any(t.name not in spectra.factors for t in spectra.targets):
        raise WeloreError("the loss allocation needs the SVD factors (spectra loaded from a file have none)")
    tails = {}
    for t in spectra.targets:
        st = stats[t.name]
        s_all = spectra.values[t.name].double()
        U, s, Vh = (f.double() for f in spectra.factors[t.name])
        if method == "whiten-fisher":
            total, drop = s_all.pow(2).sum(), s.pow(2)
        else:
            G = st.gram.double().to(Vh.device)
            w = weight_matrix(model.get_submodule(t.name)).detach().double().to(Vh.device)
            scale = st.grad_sq.double().mean().to(Vh.device)
            total = scale * torch.einsum("ij,jk,ik->", w, G, w)
            drop = scale * s.pow(2) * torch.einsum("kj,jl,kl->k", Vh, G, Vh)
        kept = torch.cat([torch.zeros(1, dtype=drop.dtype), drop.cpu().cumsum(0)])
        tails[t.name] = (total.cpu() - kept).clamp_min(0).numpy()
    spectra.tails = tails
    return spectra


def output_error(w: torch.Tensor, w_approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ||(W - W') X^T||_F / ||W X^T||_F, via the Gram."""
    d = (w - w_approx).double()
    num = torch.einsum("ij,jk,ik->", d, gram, d)
    den = torch.einsum("ij,jk,ik->", w.double(), gram, w.double())
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-300))


def refit_up(w: torch.Tensor, down: torch.Tensor, gram: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Closed-form least-squares `up` for a fixed `down`: argmin_B ||W X^T - B A X^T||_F
    = W G A^T (A G A^T)^-1, with G the input Gram matrix."""
    W, A, G = w.double(), down.double(), gram.double()
    AG = A @ G
    M = AG @ A.T
    M = M + ridge * M.diagonal().mean().clamp_min(1e-12) * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.solve(M, (W @ G @ A.T).T).T
