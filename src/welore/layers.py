"""LowRankLinear: a weight W (out x in) stored as two factors, W ~= up.weight @ down.weight;
QuantLinear (qlinear.py): a weight stored in low-bit groups with a scale and zero per group.

The factors come from one truncated SVD, W_k = U_k S_k V_k^T, with sqrt(S_k) folded into *both*:
down = sqrt(S_k) V_k^T (k x in), up = U_k sqrt(S_k) (out x k). Balanced factors have equal norms,
which keeps gradient scales of the two similar when the LRC is fine-tuned (putting S into one side
makes one factor orders of magnitude larger than the other).

The factors are two plain `nn.Linear`s, so anything that understands Linear (PEFT, quantisers,
torch.compile, FSDP wrapping) works on them unchanged.

This file imports nothing from welore but its sibling qlinear.py, on purpose: `welore.io.save_compressed`
copies both into every output directory (this one as `modeling_welore.py`, with BASE_CLASS filled in)
and points config.json's `auto_map` at it, so `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` rebuilds the low-rank and quantised layers where welore is not installed.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from .qlinear import QuantLinear, dense_module


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
    """The device and dtype of the weight of the module `name` replaces (an LRC's: its factors'; none:
    the defaults)."""
    module = model.get_submodule(name)
    w = getattr(getattr(module, "up", module), "weight", None)
    return {"device": w.device, "dtype": w.dtype} if isinstance(w, torch.Tensor) else {"device": None, "dtype": None}


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
