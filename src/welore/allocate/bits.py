"""`bits` (ours, beyond the paper): rank and bit width chosen together under a byte budget.

Every matrix carries a table of storage choices (welore.quantize.attach_choices): dense at 2, 3, 4, 8
bits or as stored, dense at 3 or 4 bits plus a small fp16 low-rank correction (Q + LR), or its leading
k triplets as two factors at 3, 4 or 8 bits, each with the bytes it
stores and its error: the estimated loss increase (calibration data with loss gradients, as the
`loss` rule), else the relative output error on the calibration inputs, else the relative weight
error ||W - W'||^2 / ||W||^2 (data-free). At price `level` per byte every matrix independently
takes the choice minimising error + level * bytes; the price is searched for the budget, as WeLore's
threshold is (a higher price never stores more). Low rank is one option among the bit widths, so
the rule factorises only where a factorisation is cheaper per unit of error than fewer bits."""

from __future__ import annotations

import numpy as np

from ..spectrum import Spectra
from .rule import Rule


class BitsRule(Rule):
    label = "rank+bits"
    level_name = "price"
    min_ratio_applies = False  # a factorisation is chosen on its error and bytes, not its rank reduction
    default_min_ratio = 0.0
    needs_choices = True

    def __init__(self, spectra: Spectra):
        super().__init__(spectra)
        self.require(spectra, "choices", "the bits allocation needs storage choices (welore.quantize.attach_choices)")
        self.tables = [{k: np.asarray(v) for k, v in spectra.choices[t.name].items()} for t in spectra.targets]
        errs = np.concatenate([tb["err"] for tb in self.tables])
        nbytes = np.concatenate([tb["nbytes"] for tb in self.tables])
        # prices from "the best choice everywhere" to "the fewest bytes everywhere"
        hi = max(errs.max(), 1e-30) / max(np.diff(np.unique(nbytes)).min(initial=1.0), 1.0) * 10
        pos = errs[errs > 0]
        lo = (pos.min() if len(pos) else hi * 1e-12) / nbytes.max() / 10
        self.candidates = self.price_grid(lo, hi)

    def pick(self, level: float) -> list[int]:
        """Index of each matrix's choice at this price (ties go to fewer bytes, then to fewer bits)."""
        out = []
        for tb in self.tables:
            cost = tb["err"] + level * tb["nbytes"]
            best = np.flatnonzero(cost <= cost.min() * (1 + 1e-12) + 1e-300)
            out.append(int(best[np.lexsort((tb["bits"][best], tb["nbytes"][best]))[0]]))
        return out

    def kept(self, level: float) -> np.ndarray:
        return np.array([int(tb["rank"][i]) for tb, i in zip(self.tables, self.pick(level))])

    def storage(self, level: float) -> list[tuple[int, int, int]]:
        return [(int(tb["bits"][i]), int(tb["nbytes"][i]), int(tb["correction"][i]) if "correction" in tb else 0)
                for tb, i in zip(self.tables, self.pick(level))]

    @classmethod
    def describe(cls, level: float) -> str:
        return f"price {level:.3g} per byte"
