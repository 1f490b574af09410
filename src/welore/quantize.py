"""Low-bit storage of a model's block matrices: dense ones (N-LRCs, or a whole uncompressed model)
and the two factors of every LRC, each becomes a QuantLinear (welore.layers) of `bits`-bit integers
in groups with an fp16 scale and zero. The quantisers are the HQQ library's, neither needs data:

    rtn   round to nearest: scale and zero from each group's min and max
    hqq   half-quadratic quantisation: scale and zero fitted to the group's weights (a few
          proximal iterations), what `transformers.HqqConfig` runs

Why HQQ rather than torchao, optimum-quanto or bitsandbytes: it packs 1, 2, 3, 4 and 8 bits (the
widths a joint rank-and-bits allocation chooses from) with any group size, in pure PyTorch on any
device, and quantises a 135M model in seconds on a CPU; torchao's sub-4-bit paths and bitsandbytes
are 4-bit (NF4/FP4) or CUDA-first, and quanto has no 3-bit.

Bits per weight are counted from what is stored: packed integers, scales, zeros (and a bias where
there is one), over the weights of the dense matrices they stand for; embeddings and head are
reported apart, in their own precision.
"""

from __future__ import annotations

from torch import nn

from .errors import WeloreError
from .layers import LowRankLinear, QuantLinear
from .progress import bar
from .targets import find_targets, layer_of, module_kind, weight_matrix

QUANTIZERS = {"rtn": False, "hqq": True}  # name -> HQQ's `optimize`
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


def quantize_model(model: nn.Module, bits: int, group: int = 128, quantizer: str = "rtn", *,
                   ignore: list[str] | None = None, progress: bool = True) -> dict:
    """Quantise, in place, every linear matrix in the blocks of `model` (the factors of LowRankLinear
    layers included; embeddings and head never) to `bits` bits. Returns `bits_report(model)`."""
    check_quant_args(bits, group, quantizer)
    targets = find_targets(model, ignore=ignore)
    for t in bar(targets, progress=progress, desc=f"Quantising ({quantizer}, {bits}-bit)", unit="matrix"):
        module = model.get_submodule(t.name)
        q = QuantLinear.from_weight(weight_matrix(module), module.bias, bits, group_for(t.in_features, group),
                                    optimize=QUANTIZERS[quantizer], kind=t.kind)
        model.set_submodule(t.name, q)
    return bits_report(model)


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
            return f"{f.bits}-bit g{f.group}"
        return f"{8 * weight_matrix(f).element_size()}-bit"
    if isinstance(m, LowRankLinear):
        return f"rank {m.rank}, " + " / ".join(sorted({one(m.down), one(m.up)}))
    return one(m) + ("" if isinstance(m, QuantLinear) else " dense")
