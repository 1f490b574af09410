"""Rank allocation: how many singular values each target matrix keeps.

One rule (welore.allocate.rules.RULES: `welore`, `uniform`, `loss`) maps a single monotone level
to a kept rank per matrix; the level is found by bisection so the whole model hits a requested
*effective rank reduction* (dropped ranks / total ranks, counting only what is really dropped) or
*parameter reduction* (over the target matrices), or *latency reduction* (the target matrices'
predicted batch-1 decode time, from a measured welore.costs.CostModel), or is given directly
(WeLore's threshold t).

A matrix becomes a Low-rank Component (LRC, stored as two factors) only when its own reduction
exceeds `min_ratio` (for rules where it applies) and the factors are smaller than the dense matrix,
k(m+n) < mn, and, given a cost model, faster than it (ranks rounded to the device's fast multiple first).
Everything else is a Non-Low-rank Component (N-LRC), kept dense and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..costs import CostModel
from ..errors import WeloreError
from ..spectrum import Spectra
from .plan import PLAN_FORMAT, MatrixPlan, RankPlan
from .rule import Rule, normalized_spectrum
from .rules import RULES, register

__all__ = ["allocate", "check_allocation_args", "MatrixPlan", "RankPlan", "PLAN_FORMAT", "Rule", "RULES",
           "register", "normalized_spectrum"]


def _plan_at(rule: Rule, name: str, spectra: Spectra, level: float, min_ratio: float,
             target: dict | None, costs: CostModel | None = None) -> RankPlan:
    mats = []
    storage = rule.storage(level) or [(None, None, 0)] * len(spectra.targets)
    for t, full, k, (bits, nbytes, correction) in zip(spectra.targets, rule.full, rule.kept(level), storage):
        k, full = int(k), int(full)
        k = k if costs is None else costs.round(k, full)
        m, n = t.shape
        reduces_enough = not rule.min_ratio_applies or (1 - k / full) > min_ratio
        lrc = k < full and reduces_enough and k * (m + n) < m * n and (costs is None or costs.pays(m, n, k))
        mats.append(MatrixPlan(t.name, t.kind, m, n, full, k, lrc, bits, nbytes, correction))
    return RankPlan(name, float(level), float(min_ratio), target, mats)


def allocate(spectra: Spectra, *, ratio: float | None = 0.5, target: str = "rank",
             allocation: str = "welore", min_ratio: float = 0.5, threshold: float | None = None,
             costs: CostModel | None = None) -> RankPlan:
    """A rank plan for `spectra`.

    ratio:      the reduction to hit, in (0, 1); `target` says of what: "rank" (effective rank
                reduction), "params" (parameters of the target matrices) or "latency" (their predicted
                batch-1 decode time, needs `costs`); with target "bits" (the `bits` rule), the bits per
                weight the target matrices may store, the most under it.
    threshold:  WeLore's t in [0, 1] given directly instead of searched (then `ratio` is ignored).
    min_ratio:  a matrix is an LRC only if its own rank reduction exceeds this (WeLore allocation).
    costs:      a measured welore.costs.CostModel: no LRC slower than its dense matrix, ranks rounded to
                the device's fast multiple, and the plan records the predicted times (plan.speed).
    """
    check_allocation_args(ratio=ratio, target=target, allocation=allocation, min_ratio=min_ratio,
                          threshold=threshold)
    if costs is not None and RULES[allocation].needs_choices:
        raise WeloreError("the cost model times unquantised factors; it does not apply to the bits allocation")
    rule = RULES[allocation](spectra)

    def plan_at(level: float, tgt: dict | None) -> RankPlan:
        return _plan_at(rule, allocation, spectra, level, min_ratio, tgt, costs)

    if threshold is not None:
        return _timed(plan_at(float(threshold), None), costs)
    tgt = {"kind": target, "ratio": float(ratio)}
    if target == "bits":
        return plan_at(_within_budget(rule, spectra, ratio), tgt)
    if target == "latency":
        if costs is None:
            raise WeloreError("a latency target needs a cost model measured on the device (welore.costs)")
        most = costs.latency_reduction(plan_at(float(rule.candidates[-1]), tgt))
        if most < ratio:
            raise WeloreError(f"a {ratio:.1%} decode-latency reduction of the target matrices is beyond this device: "
                              f"at most {most:.1%} ({costs.device})")
    metric = {"rank": lambda p: p.effective_rank_reduction, "params": lambda p: p.param_reduction,
              "latency": lambda p: costs.latency_reduction(p)}[target]
    return _timed(plan_at(_bisect(rule.candidates, lambda lv: metric(plan_at(lv, tgt)), ratio), tgt), costs)


def _timed(plan: RankPlan, costs: CostModel | None) -> RankPlan:
    if costs is not None:
        plan.speed = costs.predict(plan)
    return plan


def check_allocation_args(*, ratio: float | None = 0.5, target: str = "rank", allocation: str = "welore",
                          min_ratio: float = 0.5, threshold: float | None = None) -> None:
    """Raise WeloreError for arguments `allocate` would refuse (callable before any heavy work)."""
    if allocation not in RULES:
        raise WeloreError(f"unknown allocation {allocation!r}; choose one of {', '.join(RULES)}")
    if not (_is_number(min_ratio) and 0.0 <= min_ratio < 1.0):
        raise WeloreError(f"min_ratio must be in [0, 1), got {min_ratio}")
    if threshold is not None:
        if allocation != "welore":
            raise WeloreError("an explicit threshold applies to the welore allocation only")
        if not (_is_number(threshold) and 0.0 <= threshold <= 1.0):
            raise WeloreError(f"threshold must be in [0, 1], got {threshold}")
        return
    if target not in ("rank", "params", "latency", "bits"):
        raise WeloreError(f"unknown target {target!r}; choose rank, params or latency")
    if (target == "bits") != RULES[allocation].needs_choices:
        raise WeloreError("a bits-per-weight budget is allocated by the bits rule, and the bits rule needs one")
    if target == "bits":
        if not (_is_number(ratio) and 0.0 < ratio <= 16.0):
            raise WeloreError(f"bits per weight must be in (0, 16], got {ratio}")
    elif not (_is_number(ratio) and 0.0 < ratio < 1.0):
        raise WeloreError(f"ratio must be in (0, 1), got {ratio}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _within_budget(rule: Rule, spectra: Spectra, budget: float) -> float:
    """The lowest price whose plan stores at most `budget` bits per weight (the best within it)."""
    def bits(level: float) -> float:
        return 8 * sum(b for _, b, _ in rule.storage(level)) / sum(t.shape[0] * t.shape[1] for t in spectra.targets)
    levels = rule.candidates
    if bits(levels[-1]) > budget:
        raise WeloreError(f"{budget:g} bits per weight is below the smallest setting: {bits(levels[-1]):.3f}")
    lo, hi = -1, len(levels) - 1  # invariant: bits(levels[hi]) <= budget, and lo is over it (or -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bits(levels[mid]) <= budget:
            hi = mid
        else:
            lo = mid
    return float(levels[hi])


def _bisect(levels: np.ndarray, f: Callable[[float], float], goal: float) -> float:
    """The level among sorted `levels` whose f (monotone non-decreasing) is closest to `goal`."""
    lo, hi = 0, len(levels) - 1
    if f(levels[hi]) <= goal:
        return float(levels[hi])
    while hi - lo > 1:  # invariant: f(levels[lo]) <= goal < f(levels[hi])
        mid = (lo + hi) // 2
        if f(levels[mid]) <= goal:
            lo = mid
        else:
            hi = mid
    return float(levels[lo] if goal - f(levels[lo]) <= f(levels[hi]) - goal else levels[hi])
