"""Compress a model: (calibrate) -> factorise -> allocate -> apply. LRCs become LowRankLinear,
N-LRCs stay as they are.

    from welore.compress import compress
    result = compress(model, tokenizer, CompressConfig(ratio=0.5))  # the whole line, in place
    plan, spectra = welore.plan_model(model, ratio=0.5)             # or by hand: one SVD per matrix
    welore.apply_plan(model, plan, spectra)                          # reuses those SVDs
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import RankPlan, allocate
from .calibrate import calibration_batches, collect_stats
from .config import CompressConfig
from .costs import CostModel, for_model
from .errors import WeloreError
from .factorize import analyze_data_aware, attach_loss_tails, refit_up
from .layers import LowRankLinear, QuantLinear
from .progress import bar
from .quantize import attach_choices, choices_estimator, quantize_model
from .spectrum import Spectra, analyze, svd_for
from .targets import Target, find_targets, layer_of, module_kind, weight_matrix


@dataclass
class Compressed:
    """What `compress` did: the plan, and what a comparison against baselines reuses."""

    model: nn.Module  # the same object that was passed in, now compressed
    config: CompressConfig
    plan: RankPlan
    spectra: Spectra  # the weight spectra (with the SVD factors when the method is plain svd)
    targets: list[Target]
    first_pass: tuple[Spectra, Spectra, dict | None]  # (factors, spectra the rule read, statistics)
    stats: dict | None  # the last pass's calibration statistics (None when data-free)
    prep_seconds: float  # analysis + calibration + factorisation + planning
    apply_seconds: float  # factors in place, and quantised (with cfg.bits)
    quant: dict | None = None  # welore.quantize.bits_report when cfg.bits is set
    costs: CostModel | None = None  # with cfg.speed: the device's measured costs the plans used


def compress(model: nn.Module, tokenizer, cfg: CompressConfig, *, spectra: Spectra | None = None,
             reuse: Compressed | None = None, progress: bool = True) -> Compressed:
    """Compress `model` in place as `cfg` says. `spectra`: cached weight spectra (values only) to
    allocate from instead of analysing again; they are checked against the weights. `reuse`: an
    earlier result on this same dense model with the same method and calibration: its first pass's
    factors, rule spectra and statistics are reused, and only the plan is made anew (how the
    comparison rows of welore.baselines cost no second SVD or calibration)."""
    if reuse is not None:
        return _replan(model, cfg, reuse, progress)
    fac, rule = cfg.factorizer, cfg.rule
    t = time.perf_counter()
    if spectra is not None:
        spectra.check_matches(model)
        targets = spectra.targets
    else:
        targets = find_targets(model, cfg.targets, cfg.ignore)
        spectra = analyze(model, targets, keep_factors=fac.is_weight_svd, progress=progress)
    costs = for_model(model, targets, progress) if cfg.speed else None

    def plan_from(stats) -> tuple[Spectra, Spectra, RankPlan]:
        """(factors apply_plan uses, spectra the rule reads, plan) for these statistics."""
        factors = spectra if fac.is_weight_svd else analyze_data_aware(model, targets, stats, cfg.method,
                                                                     progress=progress)
        alloc_spectra = factors if cfg.alloc_spectrum == "data" else spectra
        if rule.needs_tails:
            alloc_spectra = attach_loss_tails(model, factors, stats, cfg.method)
        if rule.needs_choices:
            alloc_spectra = attach_choices(model, factors, stats, group=cfg.group_size, quantizer=cfg.quantizer,
                                           progress=progress)
        return factors, alloc_spectra, allocate(alloc_spectra, ratio=_ratio(model, cfg, targets), target=cfg.target,
                                                allocation=cfg.allocation, min_ratio=cfg.min_ratio,
                                                threshold=cfg.threshold, costs=costs)

    stats = batches = None
    if cfg.calibrated:
        if tokenizer is None:
            raise WeloreError("calibration needs a tokenizer, and this model has none")
        batches = calibration_batches(tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.calib_data, seed=cfg.seed,
                                      model=model, progress=progress)
        stats = collect_stats(model, targets, batches, gradients=cfg.gradients, progress=progress)
    factors, alloc_spectra, plan = plan_from(stats)
    first_pass = factors, alloc_spectra, stats
    for _ in range(cfg.calib_passes - 1):
        # each matrix sees the inputs (and loss gradients) of the compressed model it will live in
        compressed = apply_plan(copy.deepcopy(model), plan, factors, refit=stats if cfg.refit else None,
                                progress=progress)
        stats = collect_stats(compressed, targets, batches, gradients=cfg.gradients, progress=progress)
        del compressed
        gc.collect()
        factors, alloc_spectra, plan = plan_from(stats)
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    apply_plan(model, plan, factors, refit=stats if cfg.refit else None, progress=progress)
    return Compressed(model, cfg, plan, spectra, list(targets), first_pass, stats, prep_s, time.perf_counter() - t,
                      _quantize(model, cfg, plan, stats, alloc_spectra, progress), costs)


def _ratio(model: nn.Module, cfg: CompressConfig, targets: list[Target]) -> float | None:
    """cfg.ratio, except for a bits-per-weight budget, which counts everything in the blocks (norms and
    biases, stored as they are) while the rule counts the target matrices: their share of it."""
    if cfg.target != "bits":
        return cfg.ratio
    names = {t.name for t in targets}
    other = [p for n, p in model.named_parameters()
             if layer_of(n) is not None and not (n.rpartition(".")[0] in names and n.endswith(".weight"))]
    weights = sum(t.out_features * t.in_features for t in targets)
    other_bits = sum(8 * p.numel() * p.element_size() for p in other)
    return (cfg.ratio * (weights + sum(p.numel() for p in other)) - other_bits) / weights


def _quantize(model: nn.Module, cfg: CompressConfig, plan: RankPlan, stats: dict | None, alloc_spectra: Spectra,
              progress: bool) -> dict | None:
    """With cfg.bits: factors and N-LRCs to low-bit groups (welore.quantize), or each matrix to the width
    its plan chose (reusing the dense fits its storage choices made); the bits spent."""
    if cfg.bits is None and plan.bits_per_weight is None:
        return None
    bits = cfg.bits if cfg.bits is not None else {m.name: m.bits for m in plan.matrices}
    # the fits of this plan's own table only: spectra passed in may carry an earlier call's
    fits = alloc_spectra.fits if cfg.rule.needs_choices else {}
    return quantize_model(model, bits, cfg.group_size, cfg.quantizer, ignore=cfg.ignore, stats=stats, fits=fits,
                          corrections={m.name: m.correction for m in plan.matrices if m.correction}, progress=progress)


SAME_FACTORS = ("method", "refit", "calib_samples", "calib_seqlen", "calib_data", "seed", "targets", "ignore")


def _replan(model: nn.Module, cfg: CompressConfig, reuse: Compressed, progress: bool) -> Compressed:
    """`compress` from `reuse`'s first pass: a new plan over the same factors (see `compress`)."""
    differ = [k for k in SAME_FACTORS if getattr(cfg, k) != getattr(reuse.config, k)]
    if cfg.rule.needs_choices and choices_estimator(cfg.quantizer) != choices_estimator(reuse.config.quantizer):
        differ.append("quantizer")  # the storage choices' errors were estimated for the other one
    if differ or cfg.calib_passes != 1:
        raise WeloreError(f"cannot reuse factors made with other settings ({', '.join(differ) or 'calib_passes'})")
    factors, alloc_spectra, stats = reuse.first_pass
    if cfg.rule.needs_choices and not alloc_spectra.choices:
        raise WeloreError("cannot reuse a first pass without storage choices for the bits allocation")
    costs = for_model(model, reuse.targets, progress) if cfg.speed else None
    plan = allocate(alloc_spectra, ratio=_ratio(model, cfg, reuse.targets), target=cfg.target,
                    allocation=cfg.allocation, min_ratio=cfg.min_ratio, threshold=cfg.threshold, costs=costs)
    t = time.perf_counter()
    apply_plan(model, plan, factors, refit=stats if cfg.refit else None, progress=progress)
    quant = _quantize(model, cfg, plan, stats, alloc_spectra, progress)
    return Compressed(model, cfg, plan, reuse.spectra, reuse.targets, reuse.first_pass, stats, reuse.prep_seconds,
                      time.perf_counter() - t, quant, costs)


def plan_model(model: nn.Module, *, targets: list[str] | None = None, ignore: list[str] | None = None,
               spectra: Spectra | None = None, progress: bool = True, **allocate_kwargs) -> tuple[RankPlan, Spectra]:
    """Analyze `model` (unless `spectra` are given) keeping the SVD factors, and allocate ranks.

    `allocate_kwargs` go to `welore.allocate` (ratio, target, allocation, min_ratio, threshold).
    """
    if spectra is None:
        spectra = analyze(model, find_targets(model, targets, ignore), keep_factors=True, progress=progress)
    else:
        spectra.check_matches(model)
    return allocate(spectra, **allocate_kwargs), spectra


def apply_plan(model: nn.Module, plan: RankPlan, spectra: Spectra | None = None, *,
               refit: dict | None = None, progress: bool = True) -> nn.Module:
    """Replace every LRC of `plan` in `model` (in place) by a LowRankLinear of its planned rank.

    The factors come from `spectra.factors` when present (the SVD computed by `analyze`, or the
    data-aware one of `welore.factorize`); a matrix without stored factors is decomposed here (the
    "naive" two-SVD flow, kept for benchmarking and for plans applied to a fresh model).
    refit: calibration statistics ({name: InputStats}); when given, each `up` factor is replaced by
    its closed-form least-squares fit to the dense layer's outputs on the calibration inputs.
    """
    factors = spectra.factors if spectra is not None else {}
    for mp in bar(plan.lrcs, desc="Factorising LRCs", unit="matrix", progress=progress):
        try:
            module = model.get_submodule(mp.name)
        except AttributeError:
            raise WeloreError(f"the plan names {mp.name}, which the model does not have") from None
        if module_kind(module) is None:
            raise WeloreError(f"{mp.name} is not a dense linear layer (already compressed?)")
        w = weight_matrix(module).detach()
        if tuple(w.shape) != (mp.out_features, mp.in_features):
            raise WeloreError(f"the plan's shape for {mp.name} does not match the model: "
                              f"{(mp.out_features, mp.in_features)} vs {tuple(w.shape)}")
        U, S, Vh = svd_for(w, mp.alloc_rank, factors.get(mp.name))
        layer = LowRankLinear.from_svd(U, S, Vh, mp.alloc_rank, module.bias, kind=mp.kind,
                                       dtype=w.dtype, device=w.device)
        if refit is not None:
            with torch.no_grad():
                gram = refit[mp.name].gram.to(w.device)
                layer.up.weight.copy_(refit_up(w, layer.down.weight, gram).to(w.dtype))
        model.set_submodule(mp.name, layer)
    return model


def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear and QuantLinear by an equivalent dense module of the original type
    (in place; quantised weights are dequantised)."""
    merged: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (LowRankLinear, QuantLinear)) and not any(name.startswith(m + ".") for m in merged):
            model.set_submodule(name, module.to_dense())  # an LRC's quantised factors go with it
            merged.append(name)
    return model
