"""Training modes: what trains, and with which optimizer. One class per mode in a registry, as
factorisation methods (welore.factorize) and allocation rules (welore.allocate) are, so a new mode
is one class and one registry line; `welore finetune --train NAME` picks one.

    lrc     only the LRC factors (WeLore): N-LRCs, embeddings, norms and head frozen
    full    every weight of the compressed model
    lora    PEFT LoRA adapters on the block linears (the N-LRCs and both factors of each LRC)
    galore  every weight, with GaLore's projected Adam (Trainer's `optim="galore_adamw"`) on the
            block matrices whose smaller side exceeds its rank
    qlrc    lrc over a quantised rest: the N-LRCs frozen at --frozen-bits (HQQ), the LRC factors
            trained at full precision (QLoRA's shape with WeLore's split: no adapters, the
            factors are what trains); --frozen-scales: the frozen matrices' group scales and
            zeros train too, their levels fixed (as in scales), here and in qlrc-complement
    qlora   QLoRA: PEFT's LoRA adapters over every block linear quantised to --frozen-bits; saved as
            Q + LR layers, the adapter the correction
    qlrc-complement
            qlrc where each LRC also keeps a frozen copy of what its factors leave out of the base
            model's matrix, Q(W - up down) at --frozen-bits (LQ-LoRA's Q + LR, the ranks WeLore's):
            the whole model at QLoRA's memory, its top singular directions training; saved as Q + LR
    scales  a quantised model's (--bits-per-weight) group scales and zeros, its integer levels frozen
            (PEQA; EfficientQAT's end-to-end stage): recovery that keeps every byte where it was

The quantised modes quantise at load with HQQ's half-quadratic fit in groups of FROZEN_GROUP (QLoRA's
block size, and transformers' HqqConfig default), into welore's QuantLinear (HQQ's format; not HQQ's
own HQQLinear, whose packing needs an even number of groups, which a factor of odd rank does not
have), and dequantise again in the backward (HQQ's no-cache matmul) rather than keep a
full-precision copy of a frozen matrix alive.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .device import release_memory
from .errors import WeloreError
from .layers import LowRankLinear, QuantLinear
from .qtrain import Complemented, TrainedScales, finish_all, train_scales
from .quantize import quantize_model, with_correction
from .quantizers import group_for, quantize_weight
from .targets import count_parameters, find_targets, layer_of, weight_matrix

if TYPE_CHECKING:
    from .finetune_config import FinetuneConfig

TRAINABLE = ("lrc", "full", "none")  # what `set_trainable` marks
FROZEN_GROUP = 64


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def set_trainable(model: nn.Module, mode: str = "lrc") -> tuple[int, int]:
    """Mark what trains: "lrc" = only the LRC factors (WeLore), "full" = everything, "none".

    In "lrc" mode N-LRCs, embeddings, norms, the LM head and the LRC biases stay frozen: the claim
    under test is that the low-rank factors alone carry the adaptable part of the model.
    Returns (trainable, total) parameter counts.
    """
    if mode not in TRAINABLE:
        raise WeloreError(f"unknown train mode {mode!r}; choose one of {', '.join(TRAINABLE)}")
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "lrc":
        lrcs = low_rank_modules(model)
        if not lrcs:
            raise WeloreError("the model has no low-rank components to train")
        if any(isinstance(f, QuantLinear) for m in lrcs.values() for f in (m.down, m.up)):
            raise WeloreError("this model's low-rank factors are quantised (--bits) and cannot be trained; "
                              "compress without --bits to fine-tune, or `welore merge` to dequantise")
        for m in lrcs.values():
            m.down.weight.requires_grad_(True)
            m.up.weight.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, count_parameters(model)


def block_linears(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Every nn.Linear inside the blocks (dense N-LRCs and both factors of each LRC), or those of
    them whose name `pattern` (a regex) is found in."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and layer_of(n) is not None]
    return names if pattern is None else [n for n in names if re.search(pattern, n)]


def matched_lora_rank(model: nn.Module, pattern: str | None = None) -> int:
    """The LoRA rank (on the targets `pattern` selects) whose trainable parameter count is closest
    to the LRC factors' count."""
    lrc = sum(m.down.weight.numel() + m.up.weight.numel() for m in low_rank_modules(model).values())
    names = set(block_linears(model, pattern))
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if n in names)
    return max(1, round(lrc / per_rank)) if per_rank else 1


class Mode:
    """A training mode: `prepare` marks what trains (and may wrap the model), `finish` turns the
    trained model back into a plain compressed one before it is saved."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()  # FinetuneConfig fields only this mode reads

    def __init__(self, base: str | None = None):
        self.base = base  # the base model the compressed one was made from (welore.json), where recorded

    def prepare(self, model: nn.Module, cfg: FinetuneConfig) -> tuple[nn.Module, dict, dict]:
        """(model, optimizer settings for TrainingArguments, facts for finetune.json)."""
        set_trainable(model, "full")
        return model, {"optim": "adamw_torch"}, {}

    def finish(self, model: nn.Module) -> nn.Module:
        return model


class Lrc(Mode):
    name = "lrc"

    def prepare(self, model, cfg):
        set_trainable(model, "lrc")
        return model, {"optim": "adamw_torch"}, {}


class Full(Mode):
    name = "full"


class Lora(Mode):
    name = "lora"
    settings = ("lora_rank", "lora_alpha", "lora_targets")

    def prepare(self, model, cfg):
        targets, rank = self.targets(model, cfg)
        return self.wrap(model, cfg, targets, rank)

    @staticmethod
    def targets(model, cfg) -> tuple[list[str], int]:
        targets = block_linears(model, cfg.lora_targets)
        if not targets:
            raise WeloreError(f"no linear layer in the blocks matches --lora-targets {cfg.lora_targets!r}")
        return targets, cfg.lora_rank or matched_lora_rank(model, cfg.lora_targets)

    @staticmethod
    def wrap(model, cfg, targets: list[str], rank: int):
        from peft import LoraConfig, get_peft_model  # the training stack: imported where it is used
        from peft.tuners.lora.layer import Linear

        set_trainable(model, "none")
        config = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha or 2 * rank, target_modules=targets, lora_dropout=0.0)
        # PEFT's own LoRA layer over a quantised one (qlora): it adds B A x to whatever the base returns
        config._register_custom_module({QuantLinear: Linear})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unsupported layer type")  # that one, QuantLinear
            model = get_peft_model(model, config)
        return model, {"optim": "adamw_torch"}, {"lora_rank": rank, "lora_matrices": len(targets)}

    def finish(self, model):
        return model.merge_and_unload()  # the adapters fold into the (factor) weights they adapt


class GaLore(Mode):
    name = "galore"
    settings = ("galore_rank", "galore_update_gap", "galore_scale")

    def prepare(self, model, cfg):
        set_trainable(model, "full")
        projected = [n for n in block_linears(model) if min(model.get_submodule(n).weight.shape) > cfg.galore_rank]
        if not projected:
            raise WeloreError(f"no block matrix has both sides above the GaLore rank {cfg.galore_rank}")
        # GaLore's optimizer state holds its projector objects; a resumed run loads them back from
        # our own checkpoint, which torch.load's weights-only unpickler refuses unless allowed.
        # Imported here: galore-torch imports bitsandbytes, which the other modes never need
        from galore_torch.galore_projector import GaLoreProjector

        torch.serialization.add_safe_globals([GaLoreProjector])
        optim = {"optim": "galore_adamw", "optim_target_modules": "|".join(re.escape(n) for n in projected),
                 "optim_args": f"rank={cfg.galore_rank},update_proj_gap={cfg.galore_update_gap},"
                               f"scale={cfg.galore_scale},proj_type=std"}
        return model, optim, {"galore_rank": cfg.galore_rank, "galore_matrices": len(projected)}


class QLrc(Mode):
    name = "qlrc"
    settings = ("frozen_bits", "frozen_scales", "frozen_scales_lr")

    def prepare(self, model, cfg):
        lrcs = low_rank_modules(model)
        if not lrcs:
            raise WeloreError("the model has no low-rank components to train")
        rest = {t.name: cfg.frozen_bits for t in find_targets(model)
                if t.name not in lrcs and t.name.rpartition(".")[0] not in lrcs}
        quantize_model(model, rest, FROZEN_GROUP, "hqq", progress=False)
        release_memory()  # the full-precision N-LRCs, so that the process holds what it trains with
        set_trainable(model, "lrc")
        if cfg.frozen_scales:
            train_scales(model, cfg.frozen_scales_lr)
        return model, {"optim": "adamw_torch"}, {"frozen_bits": cfg.frozen_bits, "frozen_matrices": len(rest)}

    def finish(self, model):
        return finish_all(model, TrainedScales)


class QLora(Lora):
    name = "qlora"
    settings = (*Lora.settings, "frozen_bits")

    def prepare(self, model, cfg):
        targets, rank = self.targets(model, cfg)  # the rank matched on the full-precision model
        quantize_model(model, dict.fromkeys(block_linears(model), cfg.frozen_bits), FROZEN_GROUP, "hqq",
                       progress=False)
        release_memory()
        model, optim, info = self.wrap(model, cfg, targets, rank)
        return model, optim, {**info, "frozen_bits": cfg.frozen_bits}

    def finish(self, model):
        """Each adapted layer becomes a Q + LR QuantLinear whose fp16 correction is the adapter (B x
        scaling, A): not merged into the low-bit weights, which would quantise it."""
        from peft.tuners.lora import LoraLayer

        adapters = {name: (m.lora_B["default"].weight * m.scaling["default"], m.lora_A["default"].weight)
                    for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
        model = model.unload()
        for name, (up, down) in adapters.items():
            model.set_submodule(name, with_correction(model.get_submodule(name), up.detach(), down.detach()))
        return model


class QLrcComplement(QLrc):
    name = "qlrc-complement"

    def prepare(self, model, cfg):
        from .models import load_model

        if not self.base:
            raise WeloreError("--train qlrc-complement needs the base model, and this directory records none")
        model, optim, info = super().prepare(model, cfg)
        base = load_model(self.base, device="cpu", tokenizer=False).model
        lrcs = low_rank_modules(model)
        for name, m in lrcs.items():
            try:
                w = weight_matrix(base.get_submodule(name)).detach()
            except (AttributeError, TypeError):
                raise WeloreError(f"the base model {self.base} has no linear {name}: not this model's base") from None
            if w.shape != (m.out_features, m.in_features):
                raise WeloreError(f"the base model {self.base}'s {name} is {tuple(w.shape)}, not this model's "
                                  f"{(m.out_features, m.in_features)}: not its base")
            with torch.no_grad():
                rest = w.to(m.up.weight) - m.up.weight @ m.down.weight
            q = quantize_weight(rest, None, cfg.frozen_bits, group_for(m.in_features, FROZEN_GROUP), "hqq", kind=m.kind)
            q = q.to(m.up.weight.device)
            model.set_submodule(name, Complemented(m, TrainedScales(q, cfg.frozen_scales_lr) if cfg.frozen_scales else q))
        del base
        release_memory()
        return model, optim, {**info, "complement_matrices": len(lrcs)}

    def finish(self, model):
        model = super().finish(model)  # every trained-scales layer, the N-LRCs and the complements inside Complemented
        return finish_all(model, Complemented)  # each a Q + LR QuantLinear, the factors its (fp16) correction


class Scales(Mode):
    name = "scales"

    def prepare(self, model, cfg):
        set_trainable(model, "none")
        quant = train_scales(model)
        if not quant:
            raise WeloreError("--train scales trains a quantised model's scales, and this model has no quantised "
                              "matrix (compress with --bits-per-weight)")
        return model, {"optim": "adamw_torch"}, {"quantised_matrices": quant}

    def finish(self, model):
        return finish_all(model, TrainedScales)


MODES: dict[str, type[Mode]] = {cls.name: cls for cls in (Lrc, Full, Lora, GaLore, QLrc, QLora, QLrcComplement,
                                                             Scales)}
COMPARED = ("lrc", "full", "lora", "galore")  # what `welore compare` runs by default


def get_mode(name: str, base: str | None = None) -> Mode:
    """The mode `name`, for a model made from `base` (welore.json's base_model)."""
    if name not in MODES:
        raise WeloreError(f"unknown training mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name](base)


def prepare_mode(model: nn.Module, cfg: FinetuneConfig, base: str | None = None) -> tuple[nn.Module, dict, dict]:
    """`cfg.mode`'s `prepare`: (model, optimizer settings for TrainingArguments, facts)."""
    return get_mode(cfg.mode, base).prepare(model, cfg)
