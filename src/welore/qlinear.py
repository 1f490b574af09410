"""QuantLinear: a weight stored in low-bit groups (HQQ's packing) with a scale and zero per group,
and the fast CPU product for 4 bits or fewer (PyTorch's own int4 kernel).

HQQ's forward on a CPU is plain PyTorch: unpack, scale, then a dense fp32 product, on every call.
In batch-1 decoding that reads each weight three times over (measured: quantised layers decoded at
0.3x a dense model's tokens/s). PyTorch ships a fused int4 kernel for CPUs,
`aten._weight_int4pack_mm_for_cpu` (the one torchao's and gpt-fast's int4 weight-only CPU paths
call): one pass over 4-bit levels with a scale and zero per group. On 2 cores it multiplies a
1536 x 576 matrix by one token in 35 us where the dense fp32 product takes 142 us (weights out of
cache). `Int4Weight` is a layer's weight in that kernel's layout, built at the first inference
call from the stored levels (2- and 3-bit levels fit in 4 bits as they are): exact in the weights,
the activations rounded to bfloat16 (the kernel's fast path; fp32 activations take a slow one).
Training, gradients and other devices keep HQQ's dequantising path.

Like layers.py, this file imports nothing from welore: both are copied into every output directory.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 kernel takes


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as `bits`-bit integers in groups of `group` consecutive weights
    (row-major, so a group stays in one row whenever `group` divides in_features), each group with an
    fp16 scale and zero: W = (q - zero) * scale. Quantising, packing and unpacking are the HQQ
    library's (hqq.core.quantize.Quantizer), imported only when used; the weight is dequantised on
    every forward (the packed one is what is kept in memory and on disk), or, in inference on a CPU at
    4 bits or fewer (eval mode, no gradient wanted, up to `int4_rows` rows), multiplied by PyTorch's
    int4 kernel (`Int4Weight`, built at first use, dropped by `train()`). Training keeps HQQ's path
    and its memory: the kernel's copy is ~5 bits a weight more."""

    int4_kernel = True  # False: always HQQ's fp32 path (activations not rounded to bfloat16)
    # the kernel's time grows with the rows (~12 us a row for 1536 x 576 on 2 cores) where HQQ's is
    # one dequantisation and one GEMM: past ~128 rows (a prefill) that is faster
    int4_rows = 128

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
        self._int4: tuple | None = None  # (the stored tensors' identity, their Int4Weight or None)

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

    def group_levels(self) -> torch.Tensor:
        """The integer levels unpacked from HQQ's packing, a row per group (groups x group; past the
        matrix's weights, padding groups)."""
        from hqq.core.quantize import Quantizer

        q = Quantizer.unpack[Quantizer.bit_to_packing[self.bits]](self.qweight, dtype=torch.uint8)
        return q[: self.scale.shape[0]]  # rows past the groups: 3-bit packing's padding

    def levels(self) -> torch.Tensor:
        """The (out x in) integer levels, unpacked from HQQ's packing."""
        n = self.out_features * self.in_features
        return self.group_levels().reshape(-1)[:n].view(self.out_features, self.in_features)

    def int4(self) -> Int4Weight | None:
        """The weight in the int4 kernel's layout, built once and rebuilt when the stored tensors
        change (loading, moving); None where the kernel does not apply."""
        if torch.compiler.is_compiling():  # compiled decoding: the eager prefill built it; trace no checks
            return None if self._int4 is None else self._int4[1]
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight, self.scale, self.zero))
        if self._int4 is None or self._int4[0] != key:
            fits = (self.qweight.device.type == "cpu" and self.bits <= 4 and self.in_features % self.group == 0
                    and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))
            n = self.out_features * self.in_features // self.group
            self._int4 = (key, Int4Weight(self.levels(), self.scale[:n], self.zero[:n], self.group, self.bits)
                                if fits else None)
        return self._int4[1]

    def train(self, mode: bool = True) -> QuantLinear:
        if mode:  # training dequantises: the kernel's copy would only hold memory (an evaluation rebuilds it)
            self._int4 = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        bias_grad = bias is not None and bias.requires_grad
        grad = torch.is_grad_enabled() and (x.requires_grad or bias_grad)
        if grad and not bias_grad:
            # training through this frozen matrix: HQQ's no-cache matmul dequantises it again in the
            # backward, where autograd would keep the full-precision weight alive until then
            from hqq.core.quantize import HQQMatmulNoCacheDeq

            y = HQQMatmulNoCacheDeq.apply(x, lambda: self.dequantize(x.dtype), bias)
        elif (not grad and not self.training and self.int4_kernel
              and (kernel := self.int4()) is not None  # built even if not used here: a compiled decode after
              and x.numel() <= self.int4_rows * self.in_features):  # a long (HQQ-path) prefill needs it
            y = kernel(x) if bias is None else kernel(x) + bias
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


class Int4Weight:
    """An (out x in) weight of levels 0..15 with a scale and zero per `group` inputs, in the layout
    of `aten._weight_int4pack_mm_for_cpu`; calling it on x gives x @ W^T in x's dtype.

    - HQQ dequantises w = (q - zero) * scale; the kernel w = (q' - 8) * scale + zero'. With levels
      centred on 8, q' = q + 8 - 2^(bits-1), zero' = (2^(bits-1) - zero) * scale: small, so the
      kernel's bfloat16 zero' keeps its precision (uncentred 2-bit levels lose it to cancellation);
    - the kernel takes groups of 32, 64, 128 or 256 inputs: a group of 96 (576-wide rows at 128) is
      three of 32 sharing a scale; one that is no multiple of 32 (a factor of rank 72) is padded to
      one with zero columns, and the input padded alike on every call;
    - output rows padded to a multiple of 16 (the kernel's tile), cut off after."""

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bits: int = 4):
        out_features, in_features = levels.shape
        mid = 2 ** (bits - 1)
        self.out_features, self.group = out_features, group
        self.slot = -(-group // 32) * 32
        self.kernel_group = next(g for g in KERNEL_GROUPS if self.slot % g == 0)
        rows, groups = -(-out_features // 16) * 16, in_features // group
        q = levels.view(out_features, groups, group).to(torch.int32) + (8 - mid)
        q = F.pad(q, (0, self.slot - group, 0, 0, 0, rows - out_features), value=8).view(rows, -1)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        scale, zero = scale.float().view(out_features, groups), zero.float().view(out_features, groups)
        sz = torch.stack([scale, (mid - zero) * scale], dim=-1).repeat_interleave(self.slot // self.kernel_group, 1)
        sz = F.pad(sz, (0, 0, 0, 0, 0, rows - out_features))  # (rows, kernel groups, 2)
        self.scales_zeros = sz.transpose(0, 1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.slot != self.group:
            h = F.pad(h.view(h.shape[0], -1, self.group), (0, self.slot - self.group)).view(h.shape[0], -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(h, self.packed, self.kernel_group, self.scales_zeros)
        return y[:, : self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)
