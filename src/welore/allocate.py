"""Rank allocation: how many singular values each target matrix keeps.

WeLore's rule: min-max normalise each matrix's singular values to [0, 1]; one global threshold t;
every matrix drops its normalised values below t. Heavy-tailed spectra drop many, flat spectra few,
so ranks come out non-uniform without any per-model table. t is found by bisection so the whole
model hits a requested *effective rank reduction* (dropped ranks / total ranks, counting only what is
really dropped) or *parameter reduction* (over the target matrices).

A matrix becomes a Low-rank Component (LRC, stored as two factors) only when its own reduction
exceeds `min_ratio` and the factors are smaller than the dense matrix, k(m+n) < mn. Everything else
is a Non-Low-rank Component (N-LRC), kept dense and exact. The `uniform` baseline gives every matrix
the same reduction ratio (searched the same way); `min_ratio` does not apply to it, since with one
ratio for all it would turn every matrix on or off at once.

The `loss` allocation (ours, beyond the paper) needs calibration data: each matrix carries
`tails[k]`, the estimated loss increase of keeping k triplets (welore.calibrate.attach_loss_tails).
It minimises the total estimate for the budget by a Lagrangian: at price `level` per parameter,
every matrix independently picks the cheapest of "dense" (no error, mn parameters) and "rank k"
(tails[k] + level * k(m+n)); the price is searched like WeLore's threshold (a higher price never
keeps more parameters). WeLore's normalised spectra treat a matrix in the first block and one in
the last alike; the loss estimate knows that some matrices matter far more than others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import WeloreError
from .spectrum import Spectra

PLAN_FORMAT = "welore-plan/1"
ALLOCATIONS = ("welore", "uniform", "loss")


@dataclass
class MatrixPlan:
    name: str
    kind: str  # "linear" | "conv1d"
    out_features: int
    in_features: int
    full_rank: int
    alloc_rank: int  # what the allocation rule asked for
    lrc: bool  # factorised (alloc_rank kept) or dense (full rank kept)

    @property
    def kept_rank(self) -> int:
        return self.alloc_rank if self.lrc else self.full_rank

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        return self.alloc_rank * (self.out_features + self.in_features) if self.lrc else self.params_before

    @property
    def reduction(self) -> float:
        """The rule's rank reduction ratio for this matrix (whether or not it is applied)."""
        return 1.0 - self.alloc_rank / self.full_rank


@dataclass
class RankPlan:
    allocation: str  # "welore" | "uniform"
    level: float  # the threshold t (welore) or the per-matrix ratio (uniform)
    min_ratio: float
    target: dict | None  # {"kind": "rank"|"params", "ratio": r} when searched, None for an explicit t
    matrices: list[MatrixPlan] = field(default_factory=list)

    # ---- totals ----
    @property
    def lrcs(self) -> list[MatrixPlan]:
        return [m for m in self.matrices if m.lrc]

    @property
    def effective_rank_reduction(self) -> float:
        full = sum(m.full_rank for m in self.matrices)
        return sum(m.full_rank - m.kept_rank for m in self.matrices) / full

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.matrices)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def get(self, name: str) -> MatrixPlan:
        for m in self.matrices:
            if m.name == name:
                return m
        raise KeyError(name)

    def summary(self) -> str:
        what = {"welore": f"threshold {self.level:.4f}", "uniform": f"uniform ratio {self.level:.4f}",
                "loss": f"price {self.level:.3g} per parameter"}.get(self.allocation, f"level {self.level:g}")
        return (f"{self.allocation}: {what}, effective rank reduction {self.effective_rank_reduction:.1%}, "
                f"target-parameter reduction {self.param_reduction:.1%}, "
                f"{len(self.lrcs)}/{len(self.matrices)} matrices low-rank")

    # ---- JSON round trip ----
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "allocation": self.allocation,
            "level": self.level,
            "min_ratio": self.min_ratio,
            "target": self.target,
            "totals": {
                "effective_rank_reduction": self.effective_rank_reduction,
                "param_reduction": self.param_reduction,
                "params_before": self.params_before,
                "params_after": self.params_after,
                "lrc_count": len(self.lrcs),
                "matrix_count": len(self.matrices),
            },
            "matrices": [asdict(m) for m in self.matrices],
        }

    @classmethod
    def from_dict(cls, d: dict) -> RankPlan:
        try:
            if d.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {PLAN_FORMAT!r}")
            mats = [MatrixPlan(**m) for m in d["matrices"]]
            plan = cls(d["allocation"], float(d["level"]), float(d["min_ratio"]), d["target"], mats)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WeloreError(f"invalid rank plan: {e}") from e
        for m in mats:
            if not (1 <= m.alloc_rank <= m.full_rank == min(m.out_features, m.in_features)):
                raise WeloreError(f"invalid rank plan: impossible ranks for {m.name}")
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise WeloreError(f"cannot read rank plan {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The rules: a "level" (threshold or uniform ratio) -> kept rank of each matrix


def normalized_spectrum(s) -> np.ndarray:
    """Min-max normalised singular values in [0, 1] (a flat spectrum maps to all ones: nothing is low)."""
    s = np.asarray(s, dtype=np.float64)
    lo, hi = s.min(), s.max()
    if hi - lo <= 1e-12 * max(hi, 1e-30):
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


class _Rule:
    """Kept ranks for every matrix as a function of one monotone level, plus the candidate levels
    where any rank changes (so bisection over them is exact, not a float approximation)."""

    def __init__(self, allocation: str, spectra: Spectra):
        self.allocation = allocation
        self.full = np.array([min(t.shape) for t in spectra.targets])
        if allocation == "welore":
            # ascending normalised values per matrix; kept(t) = n - #(values < t)
            self.norm = [np.sort(normalized_spectrum(spectra.values[t.name].numpy())) for t in spectra.targets]
            cand = np.unique(np.concatenate([[0.0, 1.0], *self.norm]))
            self.candidates = cand[(cand >= 0) & (cand <= 1)]
        elif allocation == "loss":
            missing = [t.name for t in spectra.targets if t.name not in spectra.tails]
            if missing:
                raise WeloreError(f"the loss allocation needs loss estimates (calibration data) for {missing[0]}")
            self.tails = [np.asarray(spectra.tails[t.name], dtype=np.float64) for t in spectra.targets]
            self.sizes = [(sum(t.shape), t.shape[0] * t.shape[1]) for t in spectra.targets]
            # prices from "everything dense" to "every matrix at rank 1", on a fine geometric grid
            hi = max(tl[0] / mn for tl, (mn, _) in zip(self.tails, self.sizes) if len(tl)) * 10
            pos = [tl[-1] / full for tl, (_, full) in zip(self.tails, self.sizes) if len(tl) and tl[-1] > 0]
            lo = min(pos) / 10 if pos else hi * 1e-12
            self.candidates = np.concatenate([[0.0], np.geomspace(max(lo, 1e-300), max(hi, lo * 10), 20001)])
        elif allocation == "uniform":
            # dropped(r) = floor(r * n + 0.5) changes at r = (j + 0.5) / n
            cand = [np.array([0.0, 1.0])] + [(np.arange(n) + 0.5) / n for n in set(self.full.tolist())]
            self.candidates = np.unique(np.concatenate(cand))
        else:
            raise ValueError(allocation)  # checked by check_allocation_args

    def kept(self, level: float) -> np.ndarray:
        if self.allocation == "loss":
            out = []
            for tl, (mn, full_params), full in zip(self.tails, self.sizes, self.full):
                if len(tl) < 2 or level <= 0:
                    out.append(full)
                    continue
                ks = np.arange(1, len(tl))
                cost = tl[1:] + level * ks * mn
                k = int(ks[np.argmin(cost)])
                out.append(k if cost[k - 1] < level * full_params else full)
            return np.array(out)
        if self.allocation == "welore":
            dropped = np.array([np.searchsorted(v, level, side="left") for v in self.norm])
        else:
            dropped = np.floor(level * self.full + 0.5).astype(int)
        return np.maximum(self.full - dropped, 1)


def _plan_at(rule: _Rule, spectra: Spectra, level: float, min_ratio: float, target: dict | None) -> RankPlan:
    mats = []
    for t, full, k in zip(spectra.targets, rule.full, rule.kept(level)):
        k, full = int(k), int(full)
        m, n = t.shape
        reduces_enough = rule.allocation == "uniform" or (1 - k / full) > min_ratio
        lrc = k < full and reduces_enough and k * (m + n) < m * n
        mats.append(MatrixPlan(t.name, t.kind, m, n, full, k, lrc))
    return RankPlan(rule.allocation, float(level), float(min_ratio), target, mats)


def allocate(spectra: Spectra, *, ratio: float | None = 0.5, target: str = "rank",
             allocation: str = "welore", min_ratio: float = 0.5, threshold: float | None = None) -> RankPlan:
    """A rank plan for `spectra`.

    ratio:      the reduction to hit, in (0, 1); `target` says of what: "rank" (effective rank
                reduction) or "params" (parameters of the target matrices).
    threshold:  WeLore's t in [0, 1] given directly instead of searched (then `ratio` is ignored).
    min_ratio:  a matrix is an LRC only if its own rank reduction exceeds this (WeLore allocation).
    """
    check_allocation_args(ratio=ratio, target=target, allocation=allocation, min_ratio=min_ratio,
                          threshold=threshold)
    rule = _Rule(allocation, spectra)
    if threshold is not None:
        return _plan_at(rule, spectra, float(threshold), min_ratio, None)
    tgt = {"kind": target, "ratio": float(ratio)}
    metric = (lambda p: p.effective_rank_reduction) if target == "rank" else (lambda p: p.param_reduction)
    level = _bisect(rule.candidates, lambda lv: metric(_plan_at(rule, spectra, lv, min_ratio, tgt)), ratio)
    return _plan_at(rule, spectra, level, min_ratio, tgt)


def check_allocation_args(*, ratio: float | None = 0.5, target: str = "rank", allocation: str = "welore",
                          min_ratio: float = 0.5, threshold: float | None = None) -> None:
    """Raise WeloreError for arguments `allocate` would refuse (callable before any heavy work)."""
    if allocation not in ALLOCATIONS:
        raise WeloreError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if not (_is_number(min_ratio) and 0.0 <= min_ratio < 1.0):
        raise WeloreError(f"min_ratio must be in [0, 1), got {min_ratio}")
    if threshold is not None:
        if allocation != "welore":
            raise WeloreError("an explicit threshold applies to the welore allocation only")
        if not (_is_number(threshold) and 0.0 <= threshold <= 1.0):
            raise WeloreError(f"threshold must be in [0, 1], got {threshold}")
        return
    if target not in ("rank", "params"):
        raise WeloreError(f"unknown target {target!r}; choose rank or params")
    if not (_is_number(ratio) and 0.0 < ratio < 1.0):
        raise WeloreError(f"ratio must be in (0, 1), got {ratio}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
