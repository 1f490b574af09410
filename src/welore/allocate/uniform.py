"""`uniform` (the baseline): every matrix drops the same fraction of its rank. `min_ratio` does not
apply: with one ratio for all it would turn every matrix on or off at once."""

from __future__ import annotations

import numpy as np

from ..spectrum import Spectra
from .rule import Rule


class UniformRule(Rule):
    label = "uniform"
    level_name = "uniform ratio"
    min_ratio_applies = False

    def __init__(self, spectra: Spectra):
        super().__init__(spectra)
        # dropped(r) = floor(r * n + 0.5) changes at r = (j + 0.5) / n
        cand = [np.array([0.0, 1.0])] + [(np.arange(n) + 0.5) / n for n in set(self.full.tolist())]
        self.candidates = np.unique(np.concatenate(cand))

    def kept(self, level: float) -> np.ndarray:
        return np.maximum(self.full - np.floor(level * self.full + 0.5).astype(int), 1)
