"""Which weight matrices WeLore works on.

Targets are found by module *type* (`nn.Linear`, and GPT-2's `Conv1D`, which stores its weight
transposed) and narrowed by regexes, the way PEFT and llm-compressor select modules. No attribute
names of any one architecture are assumed. By default a target is a linear layer inside the
repeated transformer blocks (its qualified name has a numeric index, e.g. `model.layers.3.mlp.up_proj`,
`transformer.h.0.attn.c_attn`), and the LM head / anything sharing the embedding weight is excluded:
the head is tied to the embeddings in many models and its spectrum is not like the blocks'.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import WeloreError
from .layers import QuantLinear

_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    name: str  # qualified module name
    kind: str  # "linear" or "conv1d" (weight stored as (in, out))
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    @property
    def type(self) -> str:
        """Matrix type for grouping, the name with the block index removed: `self_attn.q_proj`."""
        m = _INDEX.search(f".{self.name}.")
        return self.name[m.end() - 1:] if m else self.name


def layer_of(name: str) -> int | None:
    """Block index of a module or tensor name (its first numeric path component), if any."""
    m = _INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) matrix, whatever the module stores."""
    kind = module_kind(module)
    if kind == "conv1d":
        return module.weight.t()
    if kind == "linear":
        return module.weight
    raise TypeError(f"not a linear module: {type(module).__name__}")


def find_targets(model: nn.Module, targets: Iterable[str] | None = None,
                 ignore: Iterable[str] | None = None) -> list[Target]:
    """Target matrices of `model`, in module order.

    targets: regexes (re.search on the qualified name); a module is kept if any matches. Default:
             every linear layer inside the transformer blocks.
    ignore:  regexes; a module matching any is dropped (applied after `targets`).
    """
    inc = _compile(targets, "targets")
    exc = _compile(ignore, "ignore")
    excluded = _embedding_weights(model)
    found = []
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None:
            continue
        if inc:
            if not any(p.search(name) for p in inc):
                continue
        elif _identity(module.weight) in excluded or not _INDEX.search(f".{name}."):
            continue
        if any(p.search(name) for p in exc):
            continue
        out_f, in_f = weight_matrix(module).shape
        found.append(Target(name, kind, int(out_f), int(in_f)))
    if not found:
        raise WeloreError("the model has no linear target matrices (check --targets / --ignore)")
    return found


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise WeloreError(f"bad {what} regex {p!r}: {e}") from e
    return out


def _identity(w: torch.Tensor) -> int:
    """Storage identity of a weight (shared storage = tied); on the meta device, where every tensor's
    data_ptr is 0, the tensor object's own."""
    return id(w) if w.device.type == "meta" else w.data_ptr()


def _embedding_weights(model: nn.Module) -> set[int]:
    """Identities of the input/output embedding weights (the head and anything tied to it)."""
    ptrs = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, getter, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            ptrs.add(_identity(emb.weight))
    return ptrs


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once); a QuantLinear's weights count too (they are
    stored as buffers of packed integers)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen or p.device.type == "meta":
            seen.add(p.data_ptr())
            total += p.numel()
    return total + sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantLinear))
