"""Layers that train over quantised weights, for the quantised training modes (welore.modes).

    Complemented   an LRC over a frozen quantised copy of what its factors leave out of the base
                   matrix: W ~ up down + Q(W - up down), the factors train (LQ-LoRA's shape)
    TrainedScales  a QuantLinear whose per-group scales and zeros train, the integer levels frozen
                   (PEQA, Kim et al. 2023; EfficientQAT's end-to-end stage): a quantised model
                   recovers what quantisation cost it, and stays exactly as small

Both turn back into plain QuantLinears (`finish`), which is what is saved: the outputs load wherever
a quantised welore directory does, without this module.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LowRankLinear, QuantLinear
from .quantize import with_correction


class Complemented(nn.Module):
    """y = up(down(x)) + Q(W - up down)(x): the LRC's factors trainable, the complement frozen."""

    def __init__(self, lrc: LowRankLinear, rest: QuantLinear):
        super().__init__()
        self.lrc, self.rest = lrc, rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrc(x) + self.rest(x)

    def finish(self) -> QuantLinear:
        """One Q + LR QuantLinear: the complement, with the trained factors its (fp16) correction."""
        up, down = self.lrc.up, self.lrc.down
        return with_correction(self.rest, up.weight.detach(), down.weight.detach(), up.bias)


def _weight(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(levels - zero) * scale, group by group, as the (out x in) matrix (past it: padding groups)."""
    return ((levels.to(scale.dtype) - zero) * scale).reshape(-1)[: shape[0] * shape[1]].view(shape)


class _DequantisedMatmul(torch.autograd.Function):
    """x W^T with W = (levels - zero) * scale, differentiable in x, scale and zero; W is rebuilt in the
    backward rather than kept (a full-precision copy per matrix would outlive the forward)."""

    @staticmethod
    def forward(ctx, x, levels, scale, zero, shape):
        ctx.save_for_backward(x, levels, scale, zero)
        ctx.shape = shape
        return x @ _weight(levels, scale, zero, shape).to(x.dtype).t()

    @staticmethod
    def backward(ctx, g):
        x, levels, scale, zero = ctx.saved_tensors
        w = _weight(levels, scale, zero, ctx.shape)
        gx = g @ w.to(g.dtype) if ctx.needs_input_grad[0] else None
        gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(scale.dtype).reshape(-1)
        gw = torch.cat([gw, gw.new_zeros(levels.numel() - gw.numel())]).view_as(levels)  # padding groups: 0
        return gx, None, (gw * (levels.to(scale.dtype) - zero)).sum(1, keepdim=True), -(gw * scale).sum(1, keepdim=True), None


class TrainedScales(nn.Module):
    """A QuantLinear whose scales and zeros are fp32 parameters; its levels, bias and Q + LR correction frozen."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q
        self.register_buffer("levels", q.group_levels().contiguous(), persistent=False)  # a byte a weight, for the run
        self.scale = nn.Parameter(q.scale.float().clone())
        self.zero = nn.Parameter(q.zero.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        y = _DequantisedMatmul.apply(x, self.levels, self.scale, self.zero, (q.out_features, q.in_features))
        if q.bias is not None:
            y = y + q.bias.to(x.dtype)
        return y if not q.rank else y + (x @ q.lr_down.t().to(x.dtype)) @ q.lr_up.t().to(x.dtype)

    @torch.no_grad()
    def finish(self) -> QuantLinear:
        """The QuantLinear with the trained scales and zeros, stored in its fp16."""
        self.q.scale.copy_(self.scale)
        self.q.zero.copy_(self.zero)
        return self.q


def finish_all(model: nn.Module, kind: type) -> nn.Module:
    """Every `kind` layer (Complemented, TrainedScales) in `model` replaced by what it `finish`es as."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]:
        model.set_submodule(name, m.finish())
    return model
