"""Low-bit storage of a model's block matrices: dense ones (N-LRCs, or a whole uncompressed model)
and the two factors of every LRC, each becomes a QuantLinear (welore.qlinear) of `bits`-bit integers
in groups with an fp16 scale and zero, by one of welore.quantizers' quantisers (rtn, hqq: no data;
gptq: each matrix's calibration Gram matrix); plus the storage choices the `bits` allocation picks
from, Q + LR fits, and the report of the bits stored.

Bits per weight are counted from what is stored: packed integers, scales, zeros (and a bias where
there is one), over the weights of the dense matrices they stand for; embeddings and head are
reported apart, in their own precision.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .errors import WeloreError
from .factorize import whitening_factor
from .layers import LowRankLinear
from .progress import bar
from .qlinear import QuantLinear
from .quantizers import BITS, CALIBRATED, check_quant_args, group_for, quantize_weight, quantize_widths
from .spectrum import Spectra
from .targets import find_targets, layer_of, module_kind, weight_matrix

# the storage choices of the `bits` allocation (welore.allocate.bits): dense at any width, factors at
# 3 bits and up (2-bit factors measured worse than dropping their rank), ranks on a grid of fractions
FACTOR_BITS = (3, 4, 8)
RANK_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8)
# Q + LR choices: a quantised dense matrix with a small fp16 correction (up to an eighth of the rank);
# measured on the default at 2.5 and 3.25 bits, the rule never took 2-bit + LR nor a rank above 16
QLR_BITS, QLR_RANKS = (3, 4), (8, 16)


def check_budget(bits_per_weight: float | None, *, bits: int | None, allocation: str, threshold: float | None) -> None:
    """One-line errors for a bits-per-weight budget (the `bits` allocation) with settings it overrides."""
    if bits_per_weight is None:
        raise WeloreError("the bits allocation needs a budget: --bits-per-weight B")
    clash = ("--bits" if bits is not None else "--threshold" if threshold is not None else
             f"--allocation {allocation}" if allocation not in ("welore", "bits") else None)  # welore: the default
    if clash:
        raise WeloreError(f"--bits-per-weight chooses every matrix's rank and bit width itself: drop {clash}")


def quantize_model(model: nn.Module, bits: int | dict[str, int], group: int = 128, quantizer: str = "rtn", *,
                   ignore: list[str] | None = None, corrections: dict[str, int] | None = None,
                   stats: dict | None = None, fits: dict | None = None, progress: bool = True) -> dict:
    """Quantise, in place, every linear matrix in the blocks of `model` (the factors of LowRankLinear
    layers included; embeddings and head never) to `bits` bits, or, with a dict, each matrix named
    in it to its own width (an LRC's factors to their matrix's; 16 and up: left as stored).
    `corrections`: {name: rank} of matrices stored as Q + LR (`fit_q_plus_lr`, whitened with the
    calibration `stats` where given); a calibrated quantizer (gptq) reads its Hessians from `stats`.
    `fits`: {name: {bits: QuantLinear}}, dense fits of these weights by this quantizer with these
    statistics (`Spectra.fits`, made by attach_choices), stored as they are. Returns `bits_report(model)`."""
    widths, corrections = (bits if isinstance(bits, dict) else None), corrections or {}
    for b in set(widths.values()) - {16, 32} if widths else [bits]:
        check_quant_args(b, group, quantizer)
    targets = find_targets(model, ignore=ignore)
    what = "mixed" if widths else f"{bits}-bit"
    for t in bar(targets, progress=progress, desc=f"Quantising ({quantizer}, {what})", unit="matrix"):
        b = bits if widths is None else widths.get(t.name, widths.get(t.name.rpartition(".")[0], 16))
        if b >= 16:
            continue
        module, g = model.get_submodule(t.name), group_for(t.in_features, group)
        w, st = weight_matrix(module), (stats or {}).get(t.name)
        fit = None if corrections.get(t.name) else (fits or {}).get(t.name, {}).get(b)
        if fit is not None:
            q = copy.deepcopy(fit)  # a copy: the same fits serve every plan made from one table
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.detach().clone())
        else:
            hessian = _hessian(model, t.name, stats) if quantizer in CALIBRATED else None
            if corrections.get(t.name):
                q = fit_q_plus_lr(w, b, g, corrections[t.name], quantizer=quantizer, scaling=_scaling(st, w.device),
                                  bias=module.bias, kind=t.kind, hessian=hessian)
            else:
                q = quantize_weight(w, module.bias, b, g, quantizer, hessian=hessian, kind=t.kind)
        model.set_submodule(t.name, q.train(module.training))  # a model in eval mode stays in it
    return bits_report(model)


@torch.no_grad()
def attach_choices(model: nn.Module, spectra: Spectra, stats: dict | None = None, *, group: int = 128,
                   quantizer: str = "rtn", progress: bool = True) -> Spectra:
    """Set `spectra.choices[name]` to the storage choices of each target matrix, what the `bits`
    allocation chooses among: arrays `rank` (full rank: dense), `bits`, `nbytes` (what it stores,
    counted from the quantised tensors), `err` and `correction` (the rank of a Q + LR correction, 0
    for none). Dense at every width in BITS and as stored; Q + LR (`fit_q_plus_lr`, whitened with
    `stats`) at QLR_BITS with QLR_RANKS; the leading k triplets of `spectra.factors` (when there are
    any) at FACTOR_BITS, for k on RANK_FRACTIONS of the rank where the factors are smaller than the
    dense matrix. Bytes are those stored; `err`, from what `stats` (calibration statistics) carry:
    with loss gradients, the estimated loss increase
    (as `welore.factorize` estimates it for the `loss` rule); with inputs only, the relative output
    error; without, the relative weight error ||W - W'||^2 / ||W||^2. Errors are those of round to
    nearest, except the dense choices below 8 bits for a calibrated `quantizer` (see choices_estimator)."""
    check_quant_args(None, group, "rtn")
    estimator, spectra.fits = choices_estimator(quantizer), {}
    for t in bar(spectra.targets, progress=progress, desc="Storage choices", unit="matrix"):
        w = weight_matrix(model.get_submodule(t.name)).detach()
        m, n = w.shape
        st = stats.get(t.name) if stats else None
        scaling = _scaling(st, w.device)
        size, err = w.element_size(), _error_of(w.float(), st)
        full = min(m, n)
        rows = [(full, 8 * size, size * m * n, 0.0, 0)]
        low, high = tuple(b for b in BITS if b < 8), tuple(b for b in BITS if b >= 8)
        fits = quantize_widths(w, None, low, group_for(n, group), estimator, kind=t.kind,
                               hessian=st.gram if estimator in CALIBRATED else None)
        if estimator == quantizer != "rtn":  # what storage would compute again (GPTQ: most of its time)
            spectra.fits[t.name] = {q.bits: q for q in fits}
        for q in [*fits, *quantize_widths(w, None, high, group_for(n, group))]:
            rows.append((full, q.bits, _nbytes(q), err(q.dequantize(torch.float32)), 0))
        ranks = [k for k in QLR_RANKS if k <= full // 8]
        if ranks:  # every start is a prefix of one fit at the largest rank
            up, down = low_rank_fit(w.float(), max(ranks), scaling)
        for b in QLR_BITS:
            for k in ranks:
                q = fit_q_plus_lr(w, b, group_for(n, group), k, scaling=scaling, start=up[:, :k] @ down[:k])
                rows.append((full, b, _nbytes(q), err(q.dense(torch.float32)), k))
        if t.name in spectra.factors:
            U, S, Vh = spectra.factors[t.name]
            for k in sorted({max(1, round(f * full)) for f in RANK_FRACTIONS}):
                if k > S.numel() or k * (m + n) >= m * n:
                    continue
                lr = LowRankLinear.from_svd(U.to(w.device), S.to(w.device), Vh.to(w.device), k, None,
                                            dtype=torch.float32)
                for b in FACTOR_BITS:
                    qd = quantize_weight(lr.down.weight, None, b, group_for(n, group))
                    qu = quantize_weight(lr.up.weight, None, b, group_for(k, group))
                    rows.append((k, b, _nbytes(qd) + _nbytes(qu),
                                 err(up=qu.dequantize(torch.float32), down=qd.dequantize(torch.float32)), 0))
        spectra.choices[t.name] = {key: np.array(col) for key, col in
                                   zip(("rank", "bits", "nbytes", "err", "correction"), zip(*rows))}
    return spectra


def choices_estimator(quantizer: str) -> str:
    """The quantiser whose errors the storage choices estimate for a model `quantizer` stores: round to
    nearest (the bytes are the same, HQQ's fit only lowers the error and costs 20-50x as much: half an
    hour for the 135M default's table), except a calibrated one for the dense choices: GPTQ's output
    error is a quarter to a third of rounding's, and a rule that saw rounding's would factorise matrices
    GPTQ stores better dense (measured on the default at 3.25 bits: 116.3 WikiText-2 perplexity with
    rounding's estimates, 79.5 with GPTQ's, both stored by GPTQ)."""
    return quantizer if quantizer in CALIBRATED else "rtn"


@torch.no_grad()
def fit_q_plus_lr(w: torch.Tensor, bits: int, group: int, rank: int, *, quantizer: str = "rtn",
                  scaling: tuple[torch.Tensor, torch.Tensor] | None = None, rounds: int = 1,
                  bias: torch.Tensor | None = None, kind: str = "linear", start: torch.Tensor | None = None,
                  hessian: torch.Tensor | None = None) -> QuantLinear:
    """W ~ Q(W - LR) + LR, the shape of LQ-LoRA and CALDERA: from the rank-`rank` part of W (or `start`),
    `rounds` times quantise what the correction leaves, then refit the correction to what the quantiser
    lost, by a truncated SVD in the whitened norm ||(.) S|| when `scaling` = (S, S^-1) is given (the
    output error on the calibration inputs, as the `whiten` method), else in the plain one. A
    QuantLinear holding both."""
    w32 = w.detach().float()
    # started from the weight's own leading directions, not from zero as LoftQ starts: the quantiser then
    # sees W without its strongest directions, a far smaller range (on a heavy-tailed spectrum, measured:
    # 0.08x plain 2-bit's error at rank 8 against 0.80x from zero, in tests/test_quantize.py's setting;
    # further rounds then gain little: 0.081 after a second, 0.079 after a fourth)
    correction = (lambda up, down: up @ down)(*low_rank_fit(w32, rank, scaling)) if start is None else start
    for _ in range(rounds):
        q = quantize_weight(w32 - correction, None, bits, group, quantizer, hessian=hessian, kind=kind)
        up, down = low_rank_fit(w32 - q.dequantize(torch.float32), rank, scaling)
        correction = up @ down
    return with_correction(q, up, down, bias)


def with_correction(q: QuantLinear, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> QuantLinear:
    """`q` (without a correction) with `up @ down` added as its fp16 low-rank correction: Q + LR."""
    bias = q.bias if bias is None else bias
    layer = QuantLinear(q.in_features, q.out_features, q.bits, q.group, tuple(q.qweight.shape),
                        str(q.qweight.dtype).removeprefix("torch."), bias=bias is not None, kind=q.kind,
                        device=q.qweight.device, dtype=bias.dtype if bias is not None else up.dtype, rank=up.shape[1])
    layer.load_state_dict({"qweight": q.qweight, "scale": q.scale, "zero": q.zero, "lr_up": up.half(),
                           "lr_down": down.half(), **({"bias": bias} if bias is not None else {})})
    return layer


def low_rank_fit(r: torch.Tensor, rank: int, scaling=None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down), the best rank-`rank` approximation of `r` (in the norm ||(.) S|| with `scaling`):
    a randomised SVD (range finder with two power iterations and a seeded sketch, Halko et al.), as
    accurate as the full one at these small ranks and an order of magnitude cheaper."""
    S, S_inv = scaling if scaling is not None else (None, None)
    a = r if S is None else r @ S.to(r)
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = a @ torch.randn(a.shape[1], min(rank + 8, min(a.shape)), generator=g).to(a)
    for _ in range(2):
        y = a @ (a.t() @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q
    u, s, vh = torch.linalg.svd(basis.t() @ a, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = (basis @ u[:, :rank]) * root, root[:, None] * vh[:rank]
    return up, (down if S_inv is None else down @ S_inv.to(r))


def _nbytes(q: QuantLinear) -> int:
    return sum(b.numel() * b.element_size() for b in q.buffers())


def _hessian(model: nn.Module, name: str, stats: dict | None) -> torch.Tensor:
    """X^T X of the inputs matrix `name` sees, for a calibrated quantiser: its calibration Gram matrix G;
    an LRC's down factor sees its matrix's inputs (G), its up factor the down factor's outputs (D G D^T,
    with D as stored: quantised first, the up factor then answers for the down factor's error)."""
    parent, _, part = name.rpartition(".")
    stats = stats or {}
    st = stats.get(name) or stats.get(parent)
    if st is None:
        raise WeloreError(f"a calibrated quantizer needs calibration statistics, and {name} has none")
    if name in stats or part != "up":
        return st.gram
    down = model.get_submodule(f"{parent}.down")
    d = down.dense(torch.float64) if isinstance(down, QuantLinear) else weight_matrix(down).double()
    return d @ st.gram.to(d) @ d.T


def _scaling(st, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(S, S^-1) in float32 with S S^T the input Gram matrix of `st` (None without statistics)."""
    return None if st is None else tuple(f.float() for f in whitening_factor(st.gram.to(device))[:2])


def _error_of(w: torch.Tensor, st):
    """err(W'), or err(up=, down=) for W' = up @ down, for this matrix: see `attach_choices`."""
    if st is None:
        norm = w.pow(2).sum().clamp_min(1e-30)
        return lambda approx=None, up=None, down=None: float(
            (w - (approx if approx is not None else up @ down)).pow(2).sum() / norm)
    gram = st.gram.to(w.device, torch.float32)

    def output(d: torch.Tensor) -> torch.Tensor:  # ||d X^T||^2 = tr(d G d^T)
        return ((d @ gram) * d).sum().clamp_min(0)

    wg = w @ gram
    energy = (wg * w).sum(dtype=torch.float64)
    scale = st.grad_sq.double().mean().item() if st.grad_sq is not None else 1.0 / energy.clamp_min(1e-30).item()

    def factored(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        # tr((W - UD) G (W - UD)^T) expanded: rank-k products only (k n^2 + m n k, not m n^2: 4x less
        # over the factor choices of a 1536 x 576 matrix), accumulated in float64
        cross = (up * (wg @ down.T)).sum(dtype=torch.float64)
        return (energy - 2 * cross + ((up.T @ up) * (down @ gram @ down.T)).sum(dtype=torch.float64)).clamp_min(0)

    return lambda approx=None, up=None, down=None: float(
        scale * (output(w - approx) if approx is not None else factored(up, down)))


def bits_report(model: nn.Module) -> dict:
    """Bits actually stored per weight: per block matrix (an LRC's two factors together, over its
    dense out x in; biases apart), over everything in the blocks (norms and biases included), and,
    apart, the precision of the embeddings and head."""
    matrices, stored, weights, done = {}, 0, 0, []
    for name, m in model.named_modules():  # pre-order: a matrix comes before its factors
        if layer_of(name) is None or any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(m, (LowRankLinear, QuantLinear)) or module_kind(m) is not None:
            done.append(name)
            out_f, in_f = (m.out_features, m.in_features) if module_kind(m) is None else weight_matrix(m).shape
            bias = m.up.bias if isinstance(m, LowRankLinear) else m.bias
            nbytes = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
            matrices[name] = {"bits": round(8 * (nbytes - bias_bytes) / (out_f * in_f), 4), "stored": _storage(m)}
            stored += nbytes
            weights += out_f * in_f + (0 if bias is None else bias.numel())
        else:  # norms and the like: stored as they are
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                stored += t.numel() * t.element_size()
                weights += t.numel()
    outside = {}
    for part in ("input", "output"):
        w = getattr(getattr(model, f"get_{part}_embeddings", lambda: None)(), "weight", None)
        if w is not None:
            outside["embeddings" if part == "input" else "head"] = {
                "dtype": str(w.dtype).removeprefix("torch."), "params": w.numel()}
    return {"bits_per_weight": round(8 * stored / max(weights, 1), 4), "block_bytes": stored,
            "block_weights": weights, "outside_blocks": outside, "matrices": matrices}


def _storage(m: nn.Module) -> str:
    """How a matrix is stored, in words: "16-bit dense", "4-bit g128", "rank 96, 4-bit g128"."""
    def one(f: nn.Module) -> str:
        if isinstance(f, QuantLinear):
            return f"{f.bits}-bit g{f.group}" + (f" + rank {f.rank} fp16 correction" if f.rank else "")
        return f"{8 * weight_matrix(f).element_size()}-bit"
    if isinstance(m, LowRankLinear):
        return f"rank {m.rank}, " + " / ".join(sorted({one(m.down), one(m.up)}))
    return one(m) + ("" if isinstance(m, QuantLinear) else " dense")
