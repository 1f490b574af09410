"""LowRankLinear: a weight W (out x in) stored as two factors, W ~= up.weight @ down.weight;
QuantLinear: a weight stored in low-bit groups (HQQ's packing) with a scale and zero per group.

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

import math

import torch
import transformers
from torch import nn
from torch.nn import functional as F
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
            w = getattr(f, "weight", None)  # a QuantLinear factor has none
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

    @classmethod
    @torch.no_grad()
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                     kind: str = "linear") -> LowRankLinear:
        layer = cls(down.shape[1], up.shape[0], down.shape[0], bias=bias is not None, kind=kind, device=down.device,
                    dtype=down.dtype)
        for t, v in ((layer.down.weight, down), (layer.up.weight, up), (layer.up.bias, bias)):
            if v is not None:
                t.copy_(v)
        return layer

    def prefix(self, rank: int) -> LowRankLinear:
        """The leading `rank` components: where plans nest, the LRC a compression at a smaller budget makes."""
        return LowRankLinear.from_factors(self.down.weight[:rank], self.up.weight[:, :rank], self.up.bias, self.kind)

    def weight(self) -> torch.Tensor:
        """The dense (out x in) matrix the factors represent."""
        return dense_weight(self.up) @ dense_weight(self.down)

    def to_dense(self) -> nn.Module:
        """An equivalent dense module of the original type (Linear, or GPT-2's Conv1D)."""
        return dense_module(self.weight().detach(), self.up.bias, self.kind)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, kind={self.kind}"


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as `bits`-bit integers in groups of `group` consecutive weights
    (row-major, so a group stays in one row whenever `group` divides in_features), each group with an
    fp16 scale and zero: W = (q - zero) * scale. Quantising, packing and unpacking are the HQQ
    library's (hqq.core.quantize.Quantizer), imported only when used; the weight is dequantised on
    every forward (the packed one is what is kept in memory and on disk)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, qshape: tuple[int, int],
                 qdtype: str = "uint8", bias: bool = True, kind: str = "linear", device=None, dtype=None,
                 rank: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.kind, self.rank = kind, rank  # kind: the module it replaced ("linear" or GPT-2's "conv1d")
        groups = qgroups(in_features * out_features, group)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=getattr(torch, qdtype), device=device))
        self.register_buffer("scale", torch.ones(groups, 1, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(groups, 1, dtype=torch.float16, device=device))
        if rank:  # Q + LR: W ~ dequantised Q + lr_up @ lr_down, a low-rank correction in fp16
            self.register_buffer("lr_down", torch.zeros(rank, in_features, dtype=torch.float16, device=device))
            self.register_buffer("lr_up", torch.zeros(out_features, rank, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out x in) weight in `dtype` (default: the bias's, else float32)."""
        from hqq.core.quantize import Quantizer

        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        packing = Quantizer.bit_to_packing[self.bits]
        meta = {"nbits": self.bits, "group_size": self.group, "shape": (self.scale.shape[0], self.group),
                "scale": self.scale.to(dtype), "zero": self.zero.to(dtype), "axis": 1, "packing": packing,
                "view_as_float": False, "compute_dtype": dtype}
        w = Quantizer.dequantize(self.qweight, meta)
        return w.reshape(-1)[: self.out_features * self.in_features].view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.requires_grad and torch.is_grad_enabled() and not (bias is not None and bias.requires_grad):
            # training through this frozen matrix: HQQ's no-cache matmul dequantises it again in the
            # backward, where autograd would keep the full-precision weight alive until then
            from hqq.core.quantize import HQQMatmulNoCacheDeq

            y = HQQMatmulNoCacheDeq.apply(x, lambda: self.dequantize(x.dtype), bias)
        else:
            y = F.linear(x, self.dequantize(x.dtype), bias)
        return y if not self.rank else y + (x @ self.lr_down.t().to(x.dtype)) @ self.lr_up.t().to(x.dtype)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out x in) matrix this layer stands for: the dequantised weight, plus the correction."""
        w = self.dequantize(dtype)
        return w if not self.rank else w + (self.lr_up.to(w.dtype) @ self.lr_down.to(w.dtype))

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The dequantised weight in a plain module of the original type."""
        return dense_module(self.dense(dtype).detach(), self.bias, self.kind)

    def spec(self) -> dict:
        """What `swap_in_quant` needs to rebuild this layer empty (config.json's `welore_quant`)."""
        return {"in": self.in_features, "out": self.out_features, "bits": self.bits, "group": self.group,
                "qshape": list(self.qweight.shape), "qdtype": str(self.qweight.dtype).removeprefix("torch."),
                "bias": self.bias is not None, "kind": self.kind, "rank": self.rank}

    def extra_repr(self) -> str:
        lr = f", rank={self.rank}" if self.rank else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}{lr}"


def dense_module(w: torch.Tensor, bias: torch.Tensor | None, kind: str) -> nn.Module:
    """A plain module of type `kind` (Linear, or GPT-2's Conv1D) holding weight `w` (out x in) and `bias`."""
    out_features, in_features = w.shape
    if kind == "conv1d":
        dense = Conv1D(out_features, in_features)
        dense.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w.t())
            dense.bias.copy_(bias if bias is not None else torch.zeros_like(dense.bias))
        return dense
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def qgroups(numel: int, group: int) -> int:
    """Groups of a quantised matrix: enough for `numel` weights, a multiple of 8 so that every packing
    (8 two-bit or one-bit values, or two four-bit values, per byte) packs whole rows of groups."""
    return 8 * math.ceil(numel / (8 * group))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight of a Linear or a QuantLinear."""
    return module.dense() if isinstance(module, QuantLinear) else module.weight


def swap_in_quant(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Replace each module named in `specs` (QuantLinear.spec()) by an empty QuantLinear."""
    for name, spec in specs.items():
        model.set_submodule(name, QuantLinear(spec["in"], spec["out"], spec["bits"], spec["group"],
                                              tuple(spec["qshape"]), spec["qdtype"], bias=spec["bias"],
                                              kind=spec.get("kind", "linear"), rank=spec.get("rank", 0),
                                              **_placement(model, name)))
    return model


def _placement(model: nn.Module, name: str) -> dict:
    """The device and dtype of the weight of the module `name` replaces (none: the defaults)."""
    w = getattr(model.get_submodule(name), "weight", None)
    return {"device": w.device, "dtype": w.dtype} if w is not None else {"device": None, "dtype": None}


def swap_in_low_rank(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Replace each module named in `specs` ({name: {"in", "out", "rank", "bias", "kind"}}) by an
    empty LowRankLinear of that rank, on the replaced module's device and dtype (meta stays meta)."""
    for name, spec in specs.items():
        model.set_submodule(name, LowRankLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"],
                                                kind=spec.get("kind", "linear"), **_placement(model, name)))
    return model


def apply_budget(model: nn.Module, ranks: dict[str, int], extra: dict[str, tuple[torch.Tensor, torch.Tensor]]
                 ) -> nn.Module:
    """An elastic checkpoint's model, loaded at its least-compressed budget, cut to another: `ranks` names
    every LRC there. An LRC keeps a prefix of its factors; a matrix dense at the loaded budget takes
    its factors from `extra` {name: (down, up)}, stored beside it."""
    for name, k in ranks.items():
        m = model.get_submodule(name)
        if not isinstance(m, LowRankLinear):
            m = LowRankLinear.from_factors(*extra[name], m.bias, "conv1d" if isinstance(m, Conv1D) else "linear")
        model.set_submodule(name, m.prefix(k))
    return model


def column_major(model: nn.Module) -> nn.Module:
    """Every LowRankLinear's factors column-major (after loading, which assigns row-major tensors)."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.column_major_()
    return model


def low_rank_causal_lm(base: type) -> type:
    """A subclass of the transformers class `base` that builds the low-rank and quantised layers listed
    in `config.welore_lrcs` / `config.welore_quant` before the weights load (a config without them
    gives the plain model)."""

    class WeloreForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            swap_in_low_rank(self, getattr(config, "welore_lrcs", None) or {})
            swap_in_quant(self, getattr(config, "welore_quant", None) or {})  # after: factors may be quantised

        _keys_to_ignore_on_load_unexpected = [r"\.elastic\.(down|up)\.weight$"]  # factors for other budgets

        @classmethod
        def from_pretrained(cls, path, *args, welore_budget: float | None = None, **kwargs):
            model = column_major(super().from_pretrained(path, *args, **kwargs))
            budgets = getattr(model.config, "welore_budgets", None) or {}  # the first: the model stored
            # AutoModelForCausalLM hands welore_budget= to the config, whose attribute it is
            budget = welore_budget if welore_budget is not None else getattr(model.config, "welore_budget", None)
            key = None if budget is None else f"{float(budget):g}"  # as welore.elastic.key names it
            if key is None or key == next(iter(budgets), None):
                return model
            if key not in budgets:
                raise ValueError(f"budget {key} is not in this checkpoint; it has {', '.join(budgets) or 'one'}")
            from safetensors import safe_open
            from transformers.utils import cached_file

            with safe_open(cached_file(path, "model.safetensors"), "pt") as f:
                extra = {n: tuple(f.get_tensor(f"{n}.elastic.{p}.weight") for p in ("down", "up"))
                         for n in budgets[key] if f"{n}.elastic.down.weight" in f.keys()}
            model.config.welore_budget = key
            return apply_budget(model, budgets[key], extra)

    return WeloreForCausalLM


# Filled in by welore.io in each saved copy of this file, e.g. "LlamaForCausalLM".
BASE_CLASS = None
if BASE_CLASS is not None:
    WeloreForCausalLM = low_rank_causal_lm(getattr(transformers, BASE_CLASS))
