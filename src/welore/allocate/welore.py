"""`welore` (the paper's rule): min-max normalise each matrix's singular values to [0, 1]; every
matrix drops its normalised values below one global threshold t. Heavy-tailed spectra drop many,
flat spectra few, so ranks come out non-uniform without any per-model table."""

from __future__ import annotations

import numpy as np

from ..spectrum import Spectra
from .rule import Rule, normalized_spectrum


class WeLoreRule(Rule):
    label = "WeLore"
    level_name = "threshold"

    def __init__(self, spectra: Spectra):
        super().__init__(spectra)
        # ascending normalised values per matrix; kept(t) = n - #(values < t)
        self.norm = [np.sort(normalized_spectrum(spectra.values[t.name].numpy())) for t in spectra.targets]
        cand = np.unique(np.concatenate([[0.0, 1.0], *self.norm]))
        self.candidates = cand[(cand >= 0) & (cand <= 1)]

    def kept(self, level: float) -> np.ndarray:
        dropped = np.array([np.searchsorted(v, level, side="left") for v in self.norm])
        return np.maximum(self.full - dropped, 1)
