"""RankPlan: how many singular values each target matrix keeps, and which matrices are LRCs.

A plan is what every allocation rule produces and what `apply_plan`, `save_compressed` and
`load_compressed` consume; it round-trips through JSON (`welore.json`, `plan.json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import WeloreError
from .rules import RULES

PLAN_FORMAT = "welore-plan/1"


@dataclass
class MatrixPlan:
    name: str
    kind: str  # "linear" | "conv1d"
    out_features: int
    in_features: int
    full_rank: int
    alloc_rank: int  # what the allocation rule asked for
    lrc: bool  # factorised (alloc_rank kept) or dense (full rank kept)
    bits: int | None = None  # the bit width the `bits` rule chose (16 or 32: as stored); None: not chosen
    nbytes: int | None = None  # the bytes that choice stores (packed integers, scales and zeros)
    correction: int = 0  # a dense matrix's Q + LR correction rank (W ~ Q + LR), 0 for none

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
    target: dict | None  # {"kind": "rank"|"params"|"latency"|"bits", "ratio": r} when searched, None for an explicit t
    matrices: list[MatrixPlan] = field(default_factory=list)
    speed: dict | None = None  # with a cost model: its device and the predicted seconds (welore.costs.predict)

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

    @property
    def bits_per_weight(self) -> float | None:
        """Bits stored per weight of the target matrices, for plans that chose bit widths."""
        if any(m.nbytes is None for m in self.matrices):
            return None
        return 8 * sum(m.nbytes for m in self.matrices) / max(self.params_before, 1)

    def get(self, name: str) -> MatrixPlan:
        for m in self.matrices:
            if m.name == name:
                return m
        raise KeyError(name)

    def summary(self) -> str:
        rule = RULES.get(self.allocation)
        what = rule.describe(self.level) if rule is not None else f"level {self.level:g}"
        bits = "" if self.bits_per_weight is None else f"{self.bits_per_weight:.2f} bits per weight, "
        speed = "" if self.speed is None else ", predicted decode / prefill time of the targets " + " / ".join(
            f"{self.speed[r]['plan_s'] / self.speed[r]['dense_s']:.2f}x" for r in ("decode", "prefill")) + " dense"
        return (f"{self.allocation}: {what}, {bits}effective rank reduction {self.effective_rank_reduction:.1%}, "
                f"target-parameter reduction {self.param_reduction:.1%}, "
                f"{len(self.lrcs)}/{len(self.matrices)} matrices low-rank{speed}")

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
                **({} if self.bits_per_weight is None else {"bits_per_weight": self.bits_per_weight}),
            },
            "matrices": [asdict(m) for m in self.matrices],
            **({} if self.speed is None else {"speed": self.speed}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RankPlan:
        try:
            if d.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {PLAN_FORMAT!r}")
            mats = [MatrixPlan(**m) for m in d["matrices"]]
            plan = cls(d["allocation"], float(d["level"]), float(d["min_ratio"]), d["target"], mats, d.get("speed"))
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
