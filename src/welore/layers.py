"""LowRankLinear: a weight W (out x in) stored as two factors, W ~= up.weight @ down.weight.

The factors come from one truncated SVD, W_k = U_k S_k V_k^T, with sqrt(S_k) folded into *both*:
down = sqrt(S_k) V_k^T (k x in), up = U_k sqrt(S_k) (out x k). Balanced factors have equal norms,
which keeps gradient scales of the two similar when the LRC is fine-tuned (putting S into one side
makes one factor orders of magnitude larger than the other).

The factors are two plain `nn.Linear`s, so anything that understands Linear (PEFT, quantisers,
torch.compile, FSDP wrapping) works on them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 kind: str = "linear", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.kind = in_features, out_features, rank, kind
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_svd(cls, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
                 bias: torch.Tensor | None, kind: str = "linear", dtype=None, device=None) -> LowRankLinear:
        """Build from the leading `rank` singular triplets of W = U diag(S) Vh (fp32 math, cast at the end)."""
        if rank > S.numel():
            raise ValueError(f"rank {rank} exceeds the {S.numel()} available singular triplets")
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        device = device or (bias.device if bias is not None else U.device)
        root = S[:rank].float().sqrt()
        layer = cls(Vh.shape[1], U.shape[0], rank, bias=bias is not None, kind=kind, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(root[:, None] * Vh[:rank].float())
            layer.up.weight.copy_(U[:, :rank].float() * root[None, :])
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def weight(self) -> torch.Tensor:
        """The dense (out x in) matrix the factors represent."""
        return self.up.weight @ self.down.weight

    def to_dense(self) -> nn.Module:
        """An equivalent dense module of the original type (Linear, or GPT-2's Conv1D)."""
        w = self.weight().detach()
        has_bias = self.up.bias is not None
        if self.kind == "conv1d":
            dense = Conv1D(self.out_features, self.in_features)
            dense.to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(w.t())
                dense.bias.copy_(self.up.bias if has_bias else torch.zeros_like(dense.bias))
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if has_bias:
                dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, kind={self.kind}"
