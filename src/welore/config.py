"""CompressConfig: every setting of a compression, validated in one place and written as-is
(`to_dict`) into the output's welore.json, so a directory says how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .allocate import RULES, check_allocation_args
from .allocate.rule import Rule
from .errors import WeloreError
from .factorize import Factorizer, get_method


@dataclass
class CompressConfig:
    """ratio/target: the reduction to hit ("rank": effective rank reduction, "params": parameters of
    the targets), or `threshold`: WeLore's t given directly. allocation: a rule in
    welore.allocate.RULES; method: a factorisation in welore.factorize.METHODS. min_ratio: None for
    the rule's default (0.5, the paper's; 0 for loss). alloc_spectrum: rules read the "weight" spectra
    (data-free) or the "data"-aware ones. refit: least-squares refit of each `up` factor.
    calib_passes > 1: re-collect the statistics on the compressed model, refactorise, re-plan."""

    ratio: float | None = 0.5
    target: str = "rank"
    allocation: str = "welore"
    min_ratio: float | None = None
    threshold: float | None = None
    method: str = "svd"
    alloc_spectrum: str = "weight"
    refit: bool = False
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_passes: int = 1
    seed: int = 0
    targets: list[str] | None = field(default=None)
    ignore: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.min_ratio is None:
            self.min_ratio = RULES[self.allocation].default_min_ratio if self.allocation in RULES else 0.5
        check_allocation_args(ratio=self.ratio, target=self.target, allocation=self.allocation,
                              min_ratio=self.min_ratio, threshold=self.threshold)
        get_method(self.method)  # an unknown method is a one-line error now, not after loading
        if self.alloc_spectrum not in ("weight", "data"):
            raise WeloreError(f"unknown allocation spectrum {self.alloc_spectrum!r}; choose weight or data")
        if self.calibrated and self.calib_samples <= 0:
            what = self.method if self.factorizer.needs_stats else (
                f"the {self.allocation} allocation" if self.rule.needs_tails else "refit")
            raise WeloreError(f"{what} needs calibration data (calib samples > 0)")
        if not (isinstance(self.calib_passes, int) and self.calib_passes >= 1):
            raise WeloreError(f"calibration passes must be a positive integer, got {self.calib_passes}")
        if self.calib_passes > 1 and not self.calibrated:
            raise WeloreError("more than one calibration pass needs a calibrated method, refit or the loss allocation")

    @property
    def rule(self) -> type[Rule]:
        return RULES[self.allocation]

    @property
    def factorizer(self) -> Factorizer:
        return get_method(self.method)

    @property
    def calibrated(self) -> bool:
        """Needs calibration statistics (a data-aware method, refit, or a rule that reads loss estimates)."""
        return self.factorizer.needs_stats or self.refit or self.rule.needs_tails

    @property
    def gradients(self) -> bool:
        """The statistics include loss gradients."""
        return self.factorizer.needs_gradients or self.rule.needs_tails

    @property
    def uniform_target(self) -> str:
        """What the uniform baseline matches: parameters for a parameter target, else effective rank."""
        return "params" if self.target == "params" and self.threshold is None else "rank"

    def to_dict(self) -> dict:
        """The settings as welore.json records them."""
        d = asdict(self)
        calib = {k: d.pop(k) for k in ("calib_samples", "calib_seqlen", "seed", "calib_passes")}
        d["calibration"] = {"corpus": "c4-train", "samples": calib["calib_samples"], "seqlen": calib["calib_seqlen"],
                            "seed": calib["seed"], "loss_gradients": self.gradients,
                            "passes": calib["calib_passes"]} if self.calibrated else None
        return d
