"""One dataclass per job: every setting, validated in one place (`__post_init__`), written as-is
into the output (welore.json, finetune.json), and turned into CLI flags by
`transformers.HfArgumentParser` (field `metadata` carries the help text), so a flag is never
written twice.

    CompressConfig    welore compress
    (FinetuneConfig, welore finetune / compare: welore.finetune_config)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .allocate import RULES, check_allocation_args
from .allocate.rule import Rule
from .elastic import check_elastic, parse_budgets
from .errors import WeloreError
from .factorize import METHODS, Factorizer, get_method
from .quantize import check_budget
from .quantizers import BITS, CALIBRATED, QUANTIZERS, check_quant_args


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


def check_positive(obj, *names: str) -> None:
    """A one-line error for the first of `obj`'s fields `names` that is not > 0."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise WeloreError(f"{name.replace('_', ' ')} must be > 0, got {getattr(obj, name)}")


@dataclass
class Selection:
    """Which matrices a job works on (welore.targets.find_targets): every linear layer in the blocks,
    less those `ignore` matches, or only those `targets` matches."""

    targets: list[str] | None = field(default=None, metadata=_help(
        "regexes of module names to compress (default: every linear layer in the blocks)", metavar="REGEX"))
    ignore: list[str] | None = field(default=None, metadata=_help("regexes of module names to leave dense",
                                                                  metavar="REGEX"))


@dataclass
class CompressConfig(Selection):
    """ratio/target: the reduction to hit ("rank": effective rank reduction, "params": parameters of
    the targets), or `threshold`: WeLore's t given directly. allocation: a rule in
    welore.allocate.RULES; method: a factorisation in welore.factorize.METHODS. min_ratio: None for
    the rule's default (0.5, the paper's; 0 for loss). alloc_spectrum: rules read the "weight" spectra
    (data-free) or the "data"-aware ones. refit: least-squares refit of each `up` factor.
    calib_passes > 1: re-collect the statistics on the compressed model, refactorise, re-plan."""

    ratio: float | None = field(default=0.5, metadata=_help("the reduction to hit (default 0.5): effective rank "
                                                             "(--target params: parameters of the targets; latency: "
                                                             "their predicted decode time)"))
    target: str = field(default="rank", metadata=_help(
        "what --ratio reduces: effective rank, parameters of the targets, or their batch-1 decode time as "
        "measured on this device (latency: implies --speed)", choices=("rank", "params", "latency")))
    speed: bool = field(default=False, metadata=_help(
        "time dense and factored products on this device (cached per device) and allocate with it: no LRC slower "
        "than its dense matrix, ranks rounded to the device's fast multiple (off: plans independent of the device)"))
    budgets: list[str] | None = field(default=None, metadata=_help(
        "one elastic directory for several reductions in --target's units, e.g. 0.1,0.2,0.3 (load with --budget)"))
    allocation: str = field(default="welore", metadata=_help(
        "rank allocation rule: welore (data-free, the paper), uniform, or loss (minimises a calibrated estimate "
        "of the loss increase)", choices=RULES.keys()))  # a live view: rules registered later are choices too
    min_ratio: float | None = field(default=None, metadata=_help(
        "a matrix is low-rank only if its reduction exceeds this (default 0.5; 0 for --allocation loss; 0 = "
        "truncate all, as the paper's compression-only script)"))
    threshold: float | None = field(default=None, metadata=_help("WeLore threshold t in [0,1], not searched"))
    method: str | None = field(default=None, metadata=_help(
        "factorisation: plain SVD (WeLore), activation-aware (ASVD), whitened (SVD-LLM), or whitened inputs + "
        "loss-gradient-weighted outputs (default: svd; whiten-fisher with --bits-per-weight)", choices=METHODS.keys()))
    alloc_spectrum: str = field(default="weight", metadata=_help(
        "allocate ranks on the weight spectra (data-free) or the data-aware ones", choices=("weight", "data")))
    refit: bool = field(default=False, metadata=_help("least-squares refit of each up factor on calibration data"))
    calib_samples: int = field(default=32, metadata=_help("calibration sequences"))
    calib_seqlen: int = field(default=512, metadata=_help("tokens per calibration sequence"))
    calib_data: str = field(default="c4-train", metadata=_help(
        "calibration text: c4-train (C4 training documents) or self (sequences the model samples itself: no data)",
        choices=("c4-train", "self")))
    calib_passes: int = field(default=1, metadata=_help(
        "2+: re-calibrate on the compressed model, refactorise and re-plan (one more pass each)"))
    seed: int = field(default=0, metadata=_help("seed of the calibration sample"))
    bits: int | None = field(default=None, metadata=_help(
        "store the LRC factors and N-LRCs as B-bit integers in groups, each with an fp16 scale and zero "
        f"({', '.join(map(str, BITS))}; default: unquantised)"))
    bits_per_weight: float | None = field(default=None, metadata=_help(
        "a byte budget: at most B bits stored per block weight, each matrix's rank and bit width chosen together "
        "(--allocation bits; data-aware with a calibrated --method)"))
    group_size: int = field(default=128, metadata=_help("weights per quantisation group (with --bits)"))
    quantizer: str | None = field(default=None, metadata=_help(
        "rtn (round to nearest) or hqq (HQQ's fit of scale and zero), both data-free, or gptq (GPTQ on the "
        "calibration inputs; calibrates even a data-free --method). Default: rtn, gptq with --bits-per-weight",
        choices=QUANTIZERS.keys()))

    def __post_init__(self) -> None:
        b = self.bits_per_weight  # alone, what docs/results/quantize.md ranks best at every budget: calibrated, gptq
        self.method, self.quantizer = (self.method or ("svd" if b is None else "whiten-fisher"),
                                       self.quantizer or ("rtn" if b is None else "gptq"))
        check_quant_args(self.bits, self.group_size, self.quantizer)
        if self.target == "latency":
            self.speed = True
        if self.speed and self.quantized:
            raise WeloreError("--speed times unquantised factors; it does not apply with --bits or --bits-per-weight")
        if self.bits_per_weight is not None or self.allocation == "bits":  # the bits rule, searched for B
            check_budget(self.bits_per_weight, bits=self.bits, allocation=self.allocation, threshold=self.threshold)
            self.allocation, self.target, self.ratio = "bits", "bits", self.bits_per_weight
        if self.budgets is not None:  # the first (least-compressed) is the model written; the others, plans
            self.budgets, self.ratio = (budgets := parse_budgets(self.budgets)), budgets[0]
            check_elastic(self)
        if self.min_ratio is None:
            self.min_ratio = RULES[self.allocation].default_min_ratio if self.allocation in RULES else 0.5
        check_allocation_args(ratio=self.ratio, target=self.target, allocation=self.allocation,
                              min_ratio=self.min_ratio, threshold=self.threshold)
        get_method(self.method)  # an unknown method is a one-line error now, not after loading
        if self.alloc_spectrum not in ("weight", "data"):
            raise WeloreError(f"unknown allocation spectrum {self.alloc_spectrum!r}; choose weight or data")
        if self.calibrated and self.calib_samples <= 0:
            what = self.method if self.factorizer.needs_stats else (
                f"the {self.allocation} allocation" if self.rule.needs_tails else "refit" if self.refit
                else f"the {self.quantizer} quantizer")
            raise WeloreError(f"{what} needs calibration data (calib samples > 0)")
        check_positive(self, "calib_seqlen")
        if not (isinstance(self.calib_passes, int) and self.calib_passes >= 1):
            raise WeloreError(f"calibration passes must be a positive integer, got {self.calib_passes}")
        if self.calib_passes > 1 and not self.calibrated:
            raise WeloreError("more than one calibration pass needs a calibrated method, refit or the loss allocation")

    @property
    def quantized(self) -> bool:
        """Stores low-bit integers (--bits or --bits-per-weight)."""
        return self.bits is not None or self.bits_per_weight is not None

    @property
    def rule(self) -> type[Rule]:
        return RULES[self.allocation]

    @property
    def factorizer(self) -> Factorizer:
        return get_method(self.method)

    @property
    def calibrated(self) -> bool:
        """Needs calibration statistics (a data-aware method, refit, a rule that reads loss estimates, or a
        calibrated quantiser)."""
        return (self.factorizer.needs_stats or self.refit or self.rule.needs_tails
                or (self.quantized and self.quantizer in CALIBRATED))

    @property
    def gradients(self) -> bool:
        """The statistics include loss gradients."""
        return self.factorizer.needs_gradients or self.rule.needs_tails

    @property
    def uniform_target(self) -> str:
        """What the uniform baseline matches: parameters for a parameter or latency target, else effective rank."""
        return "params" if self.target in ("params", "latency") and self.threshold is None else "rank"

    def to_dict(self) -> dict:
        """The settings as welore.json records them."""
        d = asdict(self)
        d = {**d, "targets": d.pop("targets"), "ignore": d.pop("ignore")}  # where they were before Selection
        calib = {k: d.pop(k) for k in ("calib_samples", "calib_seqlen", "seed", "calib_passes", "calib_data")}
        d["calibration"] = {"corpus": calib["calib_data"], "samples": calib["calib_samples"], "seqlen": calib["calib_seqlen"],
                            "seed": calib["seed"], "loss_gradients": self.gradients,
                            "passes": calib["calib_passes"]} if self.calibrated else None
        return d


def from_namespace(cls, namespace) -> object:
    """The dataclass `cls` built from the parsed flags HfArgumentParser added for it."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})
