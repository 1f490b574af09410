"""One matrix to low-bit groups: the quantisers, each storing a QuantLinear (welore.qlinear) of `bits`-bit
integers in groups with an fp16 scale and zero, in HQQ's packed layout whichever fitted them:

    rtn   round to nearest: scale and zero from each group's min and max (HQQ's; no data)
    hqq   half-quadratic quantisation: scale and zero fitted to the group's weights by a few proximal
          iterations (HQQ's, what `transformers.HqqConfig` runs; no data)
    gptq  GPTQ (Frantar et al. 2022): columns quantised one at a time, each one's error pushed onto the
          columns not yet quantised through the inverse of the layer's input Hessian X^T X, so it needs
          calibration inputs (the Gram matrices welore's calibration collects). Act-order on static
          groups (the groups stay in the column order HQQ's layout stores) and GPTQ's clipping search:
          the lowest output error measured on the default's first three blocks (2-bit: 0.043 of the
          matrices' output energy on the calibration tokens; 0.061 without the search, 0.23 with rtn).

Why HQQ's layout and packing (rather than torchao, optimum-quanto or bitsandbytes): it packs 1, 2, 3, 4
and 8 bits (the widths a joint rank-and-bits allocation chooses from) with any group size, in pure
PyTorch on any device; torchao's sub-4-bit paths and bitsandbytes are 4-bit (NF4/FP4) or CUDA-first,
and quanto has no 3-bit. Why GPTQ's ~40 lines here rather than a library: llm-compressor pins older
torch and transformers releases; GPTQModel (7.6) installs here but pulls torchao, whose import (which
transformers then triggers on every model load) prints failed kernel loads, and its solver is an
internal API. Ours was checked against GPTQModel's on the same Hessians and settings (the default's
first three blocks, 21 matrices): the same output error at 3 bits (0.00975 both), within 2% at 2 bits
(0.0426 against 0.0418), in half its time.
"""

from __future__ import annotations

import torch

from .errors import WeloreError
from .qlinear import QuantLinear, qgroups

QUANTIZERS = {"rtn": "round to nearest", "hqq": "HQQ's half-quadratic fit", "gptq": "GPTQ (calibrated)"}
CALIBRATED = {"gptq"}  # quantisers that need each matrix's input Hessian
BITS = (2, 3, 4, 8)


def check_quant_args(bits: int | None, group: int, quantizer: str) -> None:
    """One-line errors for settings no quantiser can run."""
    if bits is not None and bits not in BITS:
        raise WeloreError(f"bits must be one of {', '.join(map(str, BITS))} (or none, 16-bit), got {bits}")
    if group <= 0 or group % 8:
        raise WeloreError(f"group size must be a positive multiple of 8, got {group}")
    if quantizer not in QUANTIZERS:
        raise WeloreError(f"unknown quantizer {quantizer!r}; choose one of {', '.join(QUANTIZERS)}")


def group_for(in_features: int, group: int) -> int:
    """The group size used for a matrix with rows of `in_features`: `group` itself when it divides the
    rows, else the largest multiple of 8 between group/2 and group that does (576-wide rows get 96 for
    128: groups never straddle two rows, at a few more scales), else `group` (groups run across rows)."""
    if in_features % group == 0:
        return group
    for g in range(group - 8, group // 2 - 1, -8):
        if g > 0 and in_features % g == 0:
            return g
    return group


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bias: torch.Tensor | None, bits: int, group: int, quantizer: str = "rtn", *,
                    hessian: torch.Tensor | None = None, kind: str = "linear") -> QuantLinear:
    """A QuantLinear holding `w` (out x in) quantised by `quantizer`; `hessian`: the input Gram matrix
    X^T X (in x in) that gptq needs. Where groups straddle rows (in_features not a multiple of the
    group: some LRC up factors), gptq cannot keep its column order and HQQ's fit stores the matrix."""
    return quantize_widths(w, bias, (bits,), group, quantizer, hessian=hessian, kind=kind)[0]


@torch.no_grad()
def quantize_widths(w: torch.Tensor, bias: torch.Tensor | None, widths: tuple[int, ...], group: int,
                    quantizer: str = "rtn", *, hessian: torch.Tensor | None = None, kind: str = "linear"
                    ) -> list[QuantLinear]:
    """`quantize_weight` at each of `widths`: GPTQ runs them as one pass over the stacked copies (one
    Hessian, one column loop), about a third of the time of one pass each."""
    from hqq.core.quantize import Quantizer

    out_features, in_features = w.shape
    if quantizer in CALIBRATED and hessian is None:
        raise WeloreError(f"the {quantizer} quantizer needs calibration data (a calibrated --method or --calib-samples)")
    if quantizer == "gptq" and in_features % group == 0:
        fits = _gptq(w, hessian, widths, group)
    else:
        flat = w.detach().float().reshape(-1)
        groups = qgroups(flat.numel(), group)
        # padded with the last weight so no group's range grows; the padding is cut off on the way back
        flat = torch.cat([flat, flat[-1:].expand(groups * group - flat.numel())]).view(groups, group)
        fits = []
        for bits in widths:
            q, meta = Quantizer.quantize(flat, nbits=bits, group_size=group, optimize=quantizer != "rtn", axis=1,
                                         device=str(w.device), compute_dtype=torch.float32)
            fits.append((q, meta["scale"], meta["zero"]))
    layers = []
    for bits, (q, scale, zero) in zip(widths, fits):
        layer = QuantLinear(in_features, out_features, bits, group, tuple(q.shape), str(q.dtype).removeprefix("torch."),
                            bias=bias is not None, kind=kind, device=w.device,
                            dtype=bias.dtype if bias is not None else w.dtype)
        layer.qweight.copy_(q)
        layer.scale.copy_(scale.reshape(-1, 1))
        layer.zero.copy_(zero.reshape(-1, 1))
        if bias is not None:
            layer.bias.copy_(bias)
        layers.append(layer)
    return layers


def _gptq(w: torch.Tensor, hessian: torch.Tensor, widths: tuple[int, ...], group: int, *, damp: float = 0.01,
          block: int = 128, grid: int = 25, max_shrink: float = 0.8, norm: float = 2.4
          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ on one matrix at each of `widths`: packed levels, scale and zero per group, groups row-major
    as HQQ stores them (padded to whole packing rows), dequantising as (level - zero) * scale. The
    reference algorithm (IST-DASLab/gptq's `fasterquant`, as GPTQModel runs it with `desc_act`,
    `static_groups` and `mse`): each group's grid fixed first from the weights, clipped by a search over
    shrunk ranges (`grid` steps down to 1 - `max_shrink`, error in the `norm`-norm); columns then
    quantised in order of decreasing Hessian diagonal, each column's rounding error pushed onto the
    columns not yet quantised through the Cholesky factor of the damped inverse Hessian, `block` columns
    at a time. The widths share the Hessian, so their copies of W are stacked and run as one."""
    from hqq.core.quantize import Quantizer

    H = hessian.to(w.device, torch.float64).clone()
    dead = H.diagonal() == 0  # inputs never seen: any value, no error
    H[dead, dead] = 1
    W = w.detach().float().clone()
    W[:, dead] = 0
    rows, cols = W.shape
    fits = [_grid(W.view(rows, cols // group, group), 2**b - 1, grid, max_shrink, norm) for b in widths]
    scale, zero = torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])  # (widths x rows) x groups
    maxq = torch.tensor([2.0**b - 1 for b in widths], device=W.device).repeat_interleave(rows)
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, perm].repeat(len(widths), 1), H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    # columns as rows (cols x widths*rows): the loop reads and updates one column at a time, and a
    # column of the transpose is contiguous (2x faster than strided columns on this CPU)
    Wt, levels = W.t().contiguous(), torch.empty(cols, len(widths) * rows, dtype=torch.uint8, device=W.device)
    st, zt, group_of = scale.t().contiguous(), zero.t().contiguous(), perm // group
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        s1, z1 = st[group_of[i1:i2]], zt[group_of[i1:i2]]
        Q1, err1, d = torch.empty_like(W1), torch.empty_like(W1), Hinv1.diagonal()
        for i in range(i2 - i1):
            s, z, e = s1[i], z1[i], err1[i]
            level = torch.minimum(W1[i].div(s).add_(z).round_().clamp_(min=0), maxq, out=Q1[i])
            torch.sub(W1[i], (level - z).mul_(s), out=e).div_(d[i])
            W1[i:].addr_(Hinv1[i, i:], e, alpha=-1)
        levels[perm[i1:i2]] = Q1.to(torch.uint8)
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ err1
    levels = levels.t()
    out = []
    for j, bits in enumerate(widths):
        part = slice(j * rows, (j + 1) * rows)
        q, sc, zr = levels[part].reshape(-1, group), scale[part].reshape(-1, 1), zero[part].reshape(-1, 1)
        pad = qgroups(q.numel(), group) - q.shape[0]  # whole groups of padding, cut off on the way back
        q, sc, zr = (torch.cat([t, t[-1:].expand(pad, -1)]) for t in (q, sc, zr))
        out.append((Quantizer.pack[Quantizer.bit_to_packing[bits]](q), sc, zr))
    return out


def _grid(x: torch.Tensor, maxq: int, grid: int, max_shrink: float, norm: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, integer zero) per group of `x` (... x group), the range [min(x, 0), max(x, 0)]
    shrunk by the factor of least quantisation error among `grid` steps (GPTQ's `mse` search)."""
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    tiny = (hi - lo) < 1e-12
    lo, hi = torch.where(tiny, lo - 1, lo), torch.where(tiny, hi + 1, hi)
    best = torch.full_like(lo, float("inf"))
    scale, zero, buf = torch.empty_like(lo), torch.empty_like(lo), torch.empty_like(x)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s = (hi - lo) * p / maxq
        z = (-lo * p / s).round()
        sn, zn = s[..., None], z[..., None]  # in place, one buffer: the same arithmetic, 1.5x faster
        err = torch.div(x, sn, out=buf).add_(zn).round_().clamp_(0, maxq).sub_(zn).mul_(sn).sub_(x).abs_().pow_(norm).sum(-1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero
