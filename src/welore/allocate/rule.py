"""The Rule interface: kept ranks of every matrix as a function of one monotone level."""

from __future__ import annotations

import numpy as np

from ..errors import WeloreError
from ..spectrum import Spectra


class Rule:
    """Kept ranks for every matrix as a function of one monotone `level` (a higher level never keeps
    more), plus the candidate levels where any rank changes, so bisection over them is exact, not a
    float approximation. A rule is one file plus one line in `welore.allocate.rules.RULES`."""

    label = "rule"  # the row name in comparison tables
    level_name = "level"  # what the level is, for summaries
    min_ratio_applies = True  # an LRC must reduce its own rank by more than min_ratio
    default_min_ratio = 0.5  # the paper's fine-tuning setting
    needs_tails = False  # needs calibrated loss estimates (spectra.tails)
    needs_choices = False  # needs each matrix's storage choices (spectra.choices: ranks x bit widths)

    def __init__(self, spectra: Spectra):
        self.full = np.array([min(t.shape) for t in spectra.targets])
        self.candidates = np.array([0.0, 1.0])

    def kept(self, level: float) -> np.ndarray:
        raise NotImplementedError

    def storage(self, level: float) -> list[tuple[int, int, int]] | None:
        """(bits, bytes, rank of a Q + LR correction) of every matrix at `level`, for rules that choose
        bit widths too; None for rules that choose ranks only (everything stays in its own precision)."""
        return None

    @staticmethod
    def require(spectra: Spectra, attr: str, what: str) -> None:
        """A one-line error naming the first target that `spectra.<attr>` (tails, choices) lacks."""
        missing = [t.name for t in spectra.targets if t.name not in getattr(spectra, attr)]
        if missing:
            raise WeloreError(f"{what} for {missing[0]}")

    @staticmethod
    def price_grid(lo: float, hi: float) -> np.ndarray:
        """Candidate prices: 0, then a fine geometric grid from `lo` to `hi` (a Lagrangian rule's levels)."""
        return np.concatenate([[0.0], np.geomspace(max(lo, 1e-300), max(hi, lo * 10), 20001)])

    @classmethod
    def describe(cls, level: float) -> str:
        return f"{cls.level_name} {level:.4f}"


def normalized_spectrum(s) -> np.ndarray:
    """Min-max normalised singular values in [0, 1] (a flat spectrum maps to all ones: nothing is low)."""
    s = np.asarray(s, dtype=np.float64)
    lo, hi = s.min(), s.max()
    if hi - lo <= 1e-12 * max(hi, 1e-30):
        return np.ones_like(s)
    return (s - lo) / (hi - lo)
