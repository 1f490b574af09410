"""One dataclass per job: every setting, validated in one place (`__post_init__`), written as-is
into the output (welore.json, finetune.json), and turned into CLI flags by
`transformers.HfArgumentParser` (field `metadata` carries the help text), so a flag is never
written twice.

    CompressConfig    welore compress
    FinetuneConfig    welore finetune / compare
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields

from .allocate import RULES, check_allocation_args
from .allocate.rule import Rule
from .data import check_training_text, is_text_file
from .elastic import check_elastic, parse_budgets
from .errors import WeloreError
from .factorize import METHODS, Factorizer, get_method
from .modes import MODES, get_mode
from .quantize import BITS, QUANTIZERS, check_budget, check_quant_args
from .tasks import TASKS

# settings read only when distilling
TEACHER_SETTINGS = ("kd_weight", "kd_temperature", "teacher_cache", "teacher_top_k")
DATA = ("c4", *TASKS)
# how a run computes, not what: the same steps to rounding, so a run may resume with them changed
HOW_SETTINGS = ("activation_checkpointing", "loss_chunk")


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
                                                             "(with --target params: parameters of the targets)"))
    target: str = field(default="rank", metadata=_help("what --ratio reduces", choices=("rank", "params")))
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
    calib_samples: int = field(default=32, metadata=_help("calibration sequences from C4 train documents"))
    calib_seqlen: int = field(default=512, metadata=_help("tokens per calibration sequence"))
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
        "round to nearest, or HQQ's half-quadratic fit of scale and zero (both data-free; default: rtn, except hqq "
        "with --bits-per-weight below 2.75 or from 4)", choices=QUANTIZERS.keys()))

    def __post_init__(self) -> None:
        b = self.bits_per_weight  # alone, what docs/results/quantize.md ranks best there: calibrated, rtn/hqq by b
        self.method, self.quantizer = (self.method or ("svd" if b is None else "whiten-fisher"),
                                       self.quantizer or ("rtn" if b is None or 2.75 <= b < 4 else "hqq"))
        check_quant_args(self.bits, self.group_size, self.quantizer)
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
                f"the {self.allocation} allocation" if self.rule.needs_tails else "refit")
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
        d = {**d, "targets": d.pop("targets"), "ignore": d.pop("ignore")}  # where they were before Selection
        calib = {k: d.pop(k) for k in ("calib_samples", "calib_seqlen", "seed", "calib_passes")}
        d["calibration"] = {"corpus": "c4-train", "samples": calib["calib_samples"], "seqlen": calib["calib_seqlen"],
                            "seed": calib["seed"], "loss_gradients": self.gradients,
                            "passes": calib["calib_passes"]} if self.calibrated else None
        return d


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (see welore.finetune)."""

    mode: str = field(default="lrc", metadata=_help(f"what trains: {', '.join(MODES)}", aliases=["--train"]))
    data: str = field(default="c4", metadata=_help(
        f"c4 (continual LM on C4 train), a .txt / .jsonl / .json / .parquet file of your own text (continual LM; "
        f"its last --eval-tokens tokens are held out), or a task: {', '.join(TASKS)}"))
    steps: int = field(default=100, metadata=_help("optimizer steps"))
    lr: float = field(default=1e-4, metadata=_help("peak learning rate"))
    batch_size: int = field(default=4, metadata=_help("sequences per micro-batch and process"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    seqlen: int = field(default=256, metadata=_help("tokens per training sequence (task examples are cut to this)"))
    warmup: int = field(default=10, metadata=_help("linear warmup steps before the cosine decay"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0: none)"))
    eval_every: int = field(default=0, metadata=_help("steps between evaluations (0: only at the start and end)"))
    eval_tokens: int = field(default=4096, metadata=_help("held-out tokens for perplexity (c4, wikitext2, a text file)"))
    eval_examples: int = field(default=100, metadata=_help("held-out examples for accuracy (tasks)"))
    save_every: int = field(default=50, metadata=_help("steps between checkpoints (0: none)"))
    seed: int = field(default=0, metadata=_help("seed of the data order and of LoRA's initialisation"))
    lora_rank: int | None = field(default=None, metadata=_help("default: matched to lrc's trainable parameters"))
    lora_alpha: float | None = field(default=None, metadata=_help("default: 2 x rank"))
    lora_targets: str | None = field(default=None, metadata=_help(
        "with --train lora: a regex searched in module names; LoRA adapts the block linears it matches (default: "
        "all of them, the dense N-LRCs and both factors of each LRC; '\\.(down|up)$': the LRC factors only)",
        metavar="REGEX"))
    galore_rank: int = field(default=64, metadata=_help("rank of GaLore's gradient projection"))
    galore_update_gap: int = field(default=50, metadata=_help("steps between GaLore projection updates"))
    # 1, not GaLore's pretraining 0.25 (paired there with lr 1e-2): at 0.25 and the shared --lr, a quarter step
    galore_scale: float = field(default=1.0, metadata=_help(
        "GaLore's update scale: its projected matrices move lr x scale a step (1: the other modes' step)"))
    frozen_bits: int = field(default=4, metadata=_help(
        "with --train qlrc or qlora: bits of the frozen matrices, quantised at load by HQQ in groups of 64"))
    teacher: str | None = field(default=None, metadata=_help(
        "distil from this dense model (the flag alone: the base model recorded in welore.json)", nargs="?",
        const="base"))
    kd_weight: float = field(default=1.0, metadata=_help("with --teacher: weight of the distillation loss; "
                                                          "the LM loss gets 1 - it"))
    kd_temperature: float = field(default=2.0, metadata=_help("with --teacher: softmax temperature"))
    teacher_cache: str | None = field(default=None, metadata=_help(
        "with --teacher: a file of the teacher's top-k answers for this run's batches, built if missing and "
        "reused by every run on the same batches (no teacher in memory or in the loop)"))
    teacher_top_k: int = field(default=64, metadata=_help("with --teacher-cache: tokens kept per position"))
    keep_best: bool = field(default=True, metadata=_help(
        "return the weights of the best held-out evaluation (start included), never a worse model; on a task "
        "judged on --val-examples set aside from its train split, never on the eval examples it reports"))
    val_examples: int = field(default=50, metadata=_help(
        "with --keep-best on a task: train examples set aside (at most a fifth) to choose the returned weights"))
    activation_checkpointing: bool = field(default=False, metadata=_help(
        "keep only each block's input for the backward and recompute the rest (transformers' activation, or "
        "gradient, checkpointing): less memory, about one more forward of compute",
        aliases=["--gradient-checkpointing"]))
    loss_chunk: int = field(default=0, metadata=_help(
        "compute the loss (LM or distillation) this many positions at a time (the flag alone: 1024), recomputing "
        "each chunk's logits in the backward, so the [tokens x vocabulary] logits never exist whole (0: from the "
        "model's whole logits)", nargs="?", const=1024))
    # stop (as if killed) after this many steps and keep the checkpoint: for resume tests
    stop_after: int | None = field(default=None, metadata=_help(argparse.SUPPRESS))

    def __post_init__(self) -> None:
        get_mode(self.mode)
        if is_text_file(self.data):
            check_training_text(self.data)
        elif self.data not in DATA:
            raise WeloreError(f"unknown task {self.data!r}; choose one of {', '.join(DATA)}, or a text file")
        for name, value in (("learning rate", self.lr), ("galore scale", self.galore_scale),
                            ("kd temperature", self.kd_temperature)):
            if not (value > 0 and math.isfinite(value)):
                raise WeloreError(f"{name} must be > 0, got {value}")
        check_quant_args(self.frozen_bits, 64, "hqq")
        check_positive(self, "steps", "batch_size", "grad_accum", "seqlen", "eval_tokens", "eval_examples",
                       "galore_rank", "galore_update_gap", "teacher_top_k")
        if self.warmup < 0 or self.eval_every < 0 or self.save_every < 0 or self.val_examples < 0:
            raise WeloreError("warmup, eval_every, save_every and val_examples must be >= 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise WeloreError("weight decay and max grad norm must be >= 0")
        if self.lora_targets is not None:  # like --lora-rank, read by the lora mode only (compare runs several)
            try:
                re.compile(self.lora_targets)
            except re.error as e:
                raise WeloreError(f"--lora-targets {self.lora_targets!r} is not a valid regex: {e}") from None
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise WeloreError(f"lora rank must be > 0, got {self.lora_rank}")
        if not 0 <= self.kd_weight <= 1:
            raise WeloreError(f"kd weight must be in [0, 1], got {self.kd_weight}")
        if self.teacher_cache is not None and self.teacher is None:
            raise WeloreError("--teacher-cache needs --teacher")
        if self.loss_chunk < 0:
            raise WeloreError(f"loss chunk must be >= 0, got {self.loss_chunk}")
        if self.seqlen < 8:
            raise WeloreError(f"seqlen must be at least 8, got {self.seqlen}")

    @property
    def is_text(self) -> bool:
        """Continual language modelling (c4 or a text file), as opposed to a task."""
        return self.data not in TASKS

    @classmethod
    def recovery(cls, steps: int = 500, **overrides) -> FinetuneConfig:
        """The recovery recipe (benchmarks/recovery.py): LRC-only, the LM loss on 2 x 128-token C4 batches, lr
        3e-4 (its sweep), 10 warmup steps, five evaluations, keep-the-best. The LM loss, not distillation: on the
        30% calibrated model as good as half distillation (WikiText-2 101.7 vs 100.3, C4 31.8 vs 31.6), better
        than distillation alone (103.3, 34.9) in half the time; 2x better on the 50% SVD model. ~12 min for 500
        steps of the default on 2 cores. teacher="base" (and kd_weight) distils instead."""
        return cls(**{"mode": "lrc", "lr": 3e-4, "warmup": 10, "batch_size": 2, "seqlen": 128, "steps": steps,
                      "eval_every": max(1, steps // 5), **overrides})

    def to_dict(self) -> dict:
        """Every setting, as finetune.json records it."""
        return {k: v for k, v in asdict(self).items() if k != "stop_after"}

    def read_settings(self) -> dict:
        """The settings this run reads, i.e. what defines it (what a resumed run must match): to_dict()
        less another mode's settings, distillation's without a teacher, the other kind of data's, and
        those that change how memory is spent, not the steps (HOW_SETTINGS)."""
        unread = {name for cls in MODES.values() for name in cls.settings} - set(get_mode(self.mode).settings)
        unread |= set(TEACHER_SETTINGS) if self.teacher is None else set()
        unread |= {"eval_examples", "val_examples"} if self.is_text else {"eval_tokens"}
        unread |= set(HOW_SETTINGS)
        if not self.keep_best:
            unread.add("val_examples")  # the guard's only
        return {k: v for k, v in self.to_dict().items() if k not in unread}

    def same_settings(self, recorded: dict) -> bool:
        """Whether `recorded` (a config written by a run) has the settings this run reads. A setting the
        record lacks (added after it was written) counts as its default, so older runs still match; one
        this run does not read (GaLore's scale in an lrc run) never makes it another run."""
        defaults = FinetuneConfig().to_dict()
        return all(recorded.get(k, defaults[k]) == v for k, v in self.read_settings().items())


def from_namespace(cls, namespace) -> object:
    """The dataclass `cls` built from the parsed flags HfArgumentParser added for it."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})
