"""LowRankLinear: a weight W (out x in) stored as two factors, W ~= up.weight @ down.weight.

The factors come from one truncated SVD, W_k = U_k S_k V_k^T, with sqrt(S_k) folded into *both*:
down = sqrt(S_k) V_k^T (k x in), up = U_k sqrt(S_k) (out x k). Balanced factors have equal norms,
which keeps gradient scales of the two similar when the LRC is fine-tuned (putting S into one side
makes one factor orders of magnitude larger than the other).

The factors are two plain `nn.Linear`s, so anything that understands Linear (PEFT, quantisers,
torch.compile, FSDP wrapping) works on them unchanged.

This file imports nothing from welore on purpose: `welore.io.save_compressed` copies it into every
output directory as `modeling_welore.py` (with BASE_CLASS filled in) and points config.json's
`auto_map` at it, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` rebuilds
the low-rank layers where welore is not installed.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 kind: str = "linear", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.kind = in_features, out_features, rank, kind
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.column_major_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plain_factors():
            return self.up(self.down(x))  # wrapped factors (PEFT LoRA, hooks): let them run
        # x @ W^T as a plain mm on column-major factors (see column_major_): the no-transpose GEMM,
        # and no nn.Module dispatch for the two factors; in batch-1 decoding both are visible costs
        h = torch.mm(x.reshape(-1, self.in_features), self.down.weight.t())
        up = self.up
        y = torch.mm(h, up.weight.t()) if up.bias is None else torch.addmm(up.bias, h, up.weight.t())
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def column_major_(self) -> LowRankLinear:
        """Store both factors column-major: same shapes and values, but W^T is contiguous, so the
        forward's x @ W^T is the no-transpose GEMM, measured ~25% faster per factor pair than
        F.linear in batch-1 decoding on CPU (benchmarks/compress.py). Saving writes them row-major
        as usual; loading calls this again."""
        for f in (self.down, self.up):
            w = f.weight
            if isinstance(w, nn.Parameter) and not w.t().is_contiguous():
                f.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
        return self

    def _plain_factors(self) -> bool:
        for f in (self.down, self.up):
            if type(f) is not nn.Linear or f._forward_hooks or f._forward_pre_hooks or "forward" in f.__dict__:
                return False
        return True

    @classmethod
    def from_svd(cls, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
                 bias: torch.Tensor | None, kind: str = "linear", dtype=None, device=None) -> LowRankLinear:
        """Build from the leading `rank` singular triplets of W = U diag(S) Vh (fp32 math, cast at the end)."""
        if rank > S.numel():
            raise ValueError(f"rank {rank} exceeds the {S.numel()} available singular triplets")
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        device = device or (bias.device if bias is not None else U.device)
        root = S[:rank].float().sqrt()
        down, up = root[:, None] * Vh[:rank].float(), U[:, :rank].float() * root[None, :]
        # Data-aware factors (U/D, V^T S^-1) are not orthonormal: a component's two vectors can differ
        # in norm by orders of magnitude, and Adam moves every entry by about lr, so the first step of
        # fine-tuning wrecks the tiny one (measured: 4.7 -> 14.6 held-out loss at lr 3e-5). Rescaling
        # each component so both vectors carry the same norm leaves the product as it is. Components
        # that are balanced already (plain SVD, orthonormal U and V) keep their bits.
        c = (down.norm(dim=1) / up.norm(dim=0)).sqrt()
        c = torch.where(c.isfinite() & (c > 0) & ((c - 1).abs() > 1e-3), c, torch.ones_like(c))
        layer = cls(Vh.shape[1], U.shape[0], rank, bias=bias is not None, kind=kind, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down / c[:, None])
            layer.up.weight.copy_(up * c[None, :])
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


def swap_in_low_rank(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Replace each module named in `specs` ({name: {"in", "out", "rank", "bias", "kind"}}) by an
    empty LowRankLinear of that rank, on the replaced module's device and dtype (meta stays meta)."""
    for name, spec in specs.items():
        old = model.get_submodule(name)
        w = getattr(old, "weight", None)
        model.set_submodule(name, LowRankLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"],
                                                kind=spec.get("kind", "linear"),
                                                device=w.device if w is not None else None,
                                                dtype=w.dtype if w is not None else None))
    return model


def low_rank_specs(model: nn.Module) -> dict[str, dict]:
    """The `welore_lrcs` entry of a compressed model's config.json: every LowRankLinear's shape."""
    return {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "bias": m.up.bias is not None,
                   "kind": m.kind}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def column_major(model: nn.Module) -> nn.Module:
    """Every LowRankLinear's factors column-major (after loading, which assigns row-major tensors)."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.column_major_()
    return model


def low_rank_causal_lm(base: type) -> type:
    """A subclass of the transformers class `base` that builds the low-rank layers listed in
    `config.welore_lrcs` before the weights load (a config without it gives the plain model)."""

    class WeloreForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            swap_in_low_rank(self, getattr(config, "welore_lrcs", None) or {})

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return column_major(super().from_pretrained(*args, **kwargs))

    return WeloreForCausalLM


# Filled in by welore.io in each saved copy of this file, e.g. "LlamaForCausalLM".
BASE_CLASS = None
if BASE_CLASS is not None:
    WeloreForCausalLM = low_rank_causal_lm(getattr(transformers, BASE_CLASS))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen or p.device.type == "meta":
            seen.add(p.data_ptr())
            total += p.numel()
    return total
