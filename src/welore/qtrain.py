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

# a parameter carrying this attribute trains at the run's learning rate times its value (WeloreTrainer)
LR_SCALE = "welore_lr_scale"


class Complemented(nn.Module):
    """y = up(down(x)) + Q(W - up down)(x): the LRC's factors trainable, the complement frozen."""

    def __init__(self, lrc: LowRankLinear, rest: QuantLinear):
        super().__init__()
        self.lrc, self.rest = lrc, rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrc(x) + self.rest(x)

    def finish(self) -> QuantLinear:
        """One Q + LR QuantLinear: the complement, with the trained factors its (fp16) correction. A
        complement whose scales trained (a TrainedScales) is finished first: finish_all(model, TrainedScales)."""
        up, down = self.lrc.up, self.lrc.down
        return with_correction(self.rest, up.weight.detach(), down.weight.detach(), up.bias)


def _weight(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(levels - zero) * scale, group by group, as the (out x in) matrix (past it: padding groups); one
    allocation (in place on the float levels), where the plain expression makes three."""
    return levels.to(scale.dtype).sub_(zero).mul_(scale).view(-1)[: shape[0] * shape[1]].view(shape)


class _DequantisedMatmul(torch.autograd.Function):
    """x W^T with W = (levels - zero) * scale, differentiable in x, scale and zero. W is rebuilt in the
    backward, and the levels unpacked again from the layer's packed bytes each time (about 0.2 ms for a
    576 x 1536 matrix): neither a full-precision copy nor a byte per weight outlives the forward, so a
    frozen matrix whose scales train costs its packed bytes and its scales, no more. Each pass makes
    two or three matrix-sized temporaries, not the plain expressions' nine: fewer and steadier sizes
    keep the allocator's high-water mark down on a CPU."""

    @staticmethod
    def forward(ctx, x, scale, zero, q):
        ctx.save_for_backward(x, scale, zero)
        ctx.q = q
        return x @ _weight(q.group_levels(), scale, zero, (q.out_features, q.in_features)).to(x.dtype).t()

    @staticmethod
    def backward(ctx, g):
        x, scale, zero = ctx.saved_tensors
        q = ctx.q
        shape, n = (q.out_features, q.in_features), q.out_features * q.in_features
        d = q.group_levels().to(scale.dtype).sub_(zero)  # levels - zero: dW/dscale, group by group
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g @ (d * scale).view(-1)[:n].view(shape).to(g.dtype)
        gw = d.new_zeros(d.shape)  # dL/dW, a row per group (padding groups: 0)
        g2, x2 = g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1])
        if g2.dtype == gw.dtype:
            torch.mm(g2, x2, out=gw.view(-1)[:n].view(shape))
        else:
            gw.view(-1)[:n].copy_((g2 @ x2).view(-1))
        g_scale = torch.bmm(gw.unsqueeze(1), d.unsqueeze(2)).view(-1, 1)  # rows of gw . d, no product matrix
        return gx, g_scale, -(gw.sum(1, keepdim=True) * scale), None


class TrainedScales(nn.Module):
    """A QuantLinear whose scales and zeros are fp32 parameters; its levels, bias and Q + LR correction
    frozen. `lr_scale`: they train at that fraction of the run's learning rate (welore's Trainer reads it)."""

    def __init__(self, q: QuantLinear, lr_scale: float | None = None):
        super().__init__()
        self.q = q
        self.scale = nn.Parameter(q.scale.float().clone())
        self.zero = nn.Parameter(q.zero.float().clone())
        if lr_scale is not None:
            setattr(self.scale, LR_SCALE, lr_scale)
            setattr(self.zero, LR_SCALE, lr_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        y = _DequantisedMatmul.apply(x, self.scale, self.zero, q)
        if q.bias is not None:
            y = y + q.bias.to(x.dtype)
        return y if not q.rank else y + (x @ q.lr_down.t().to(x.dtype)) @ q.lr_up.t().to(x.dtype)

    @torch.no_grad()
    def finish(self) -> QuantLinear:
        """The QuantLinear with the trained scales and zeros, stored in its fp16."""
        self.q.scale.copy_(self.scale)
        self.q.zero.copy_(self.zero)
        return self.q


def train_scales(model: nn.Module, lr_scale: float | None = None) -> int:
    """Every QuantLinear of `model` a TrainedScales: its group scales and zeros trainable (at `lr_scale`
    times the run's learning rate)."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, q in quant.items():
        model.set_submodule(name, TrainedScales(q, lr_scale))
    return len(quant)


def finish_all(model: nn.Module, kind: type) -> nn.Module:
    """Every `kind` layer (Complemented, TrainedScales) in `model` replaced by what it `finish`es as."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]:
        model.set_submodule(name, m.finish())
    return model
