"""`loss` (ours, beyond the paper): each matrix carries `tails[k]`, the estimated loss increase of
keeping k triplets (welore.factorize.attach_loss_tails). The rule minimises the total estimate for
the budget by a Lagrangian: at price `level` per parameter, every matrix independently picks the
cheapest of "dense" (no error, mn parameters) and "rank k" (tails[k] + level * k(m+n)); the price
is searched like WeLore's threshold (a higher price never keeps more parameters). WeLore's
normalised spectra treat a matrix in the first block and one in the last alike; the loss estimate
knows that some matrices matter far more than others."""

from __future__ import annotations

import numpy as np

from ..spectrum import Spectra
from .rule import Rule


class LossRule(Rule):
    label = "loss"
    level_name = "price"
    default_min_ratio = 0.0  # the rule already weighs dense against factorised for every matrix
    needs_tails = True

    def __init__(self, spectra: Spectra):
        super().__init__(spectra)
        self.require(spectra, "tails", "the loss allocation needs loss estimates (calibration data)")
        self.tails = [np.asarray(spectra.tails[t.name], dtype=np.float64) for t in spectra.targets]
        self.sizes = [(sum(t.shape), t.shape[0] * t.shape[1]) for t in spectra.targets]
        # prices from "everything dense" to "every matrix at rank 1", on a fine geometric grid
        hi = max(tl[0] / mn for tl, (mn, _) in zip(self.tails, self.sizes) if len(tl)) * 10
        pos = [tl[-1] / full for tl, (_, full) in zip(self.tails, self.sizes) if len(tl) and tl[-1] > 0]
        lo = min(pos) / 10 if pos else hi * 1e-12
        self.candidates = self.price_grid(lo, hi)

    def kept(self, level: float) -> np.ndarray:
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

    @classmethod
    def describe(cls, level: float) -> str:
        return f"price {level:.3g} per parameter"
