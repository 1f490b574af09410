"""FinetuneConfig: every setting of one fine-tuning run (welore finetune / compare), validated in
`__post_init__`, recorded in finetune.json, and turned into CLI flags as welore.config's dataclasses are."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field

from .config import _help, check_positive
from .data import check_training_text, is_text_file
from .errors import WeloreError
from .modes import MODES, get_mode
from .quantizers import check_quant_args
from .tasks import TASKS

# settings read only when distilling
TEACHER_SETTINGS = ("kd_weight", "kd_temperature", "teacher_cache", "teacher_top_k")
DATA = ("c4", *TASKS)
# how a run computes, not what: the same steps to rounding, so a run may resume with them changed
HOW_SETTINGS = ("activation_checkpointing", "loss_chunk")


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
        "with --train qlrc, qlrc-complement or qlora: bits of the frozen matrices, quantised at load by HQQ in groups of 64"))
    frozen_scales: bool = field(default=False, metadata=_help(
        "with --train qlrc or qlrc-complement: the frozen matrices' group scales and zeros train too (PEQA), "
        "their integer levels fixed: the N-LRCs adapt at a few parameters per 64 weights"))
    # a scale moves its group's 64 weights together: at the factors' lr (3e-4) it hurt (C4 24.4 vs 23.0, 500 steps)
    frozen_scales_lr: float = field(default=0.1, metadata=_help(
        "with --frozen-scales: their learning rate, as a fraction of --lr"))
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
                            ("frozen scales lr", self.frozen_scales_lr),
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
    def recovery(cls, steps: int = 500, quantised: bool = False, **overrides) -> FinetuneConfig:
        """The recovery recipe (benchmarks/recovery.py): LRC-only, the LM loss on 2 x 128-token C4 batches, lr
        3e-4 (its sweep), 10 warmup steps, five evaluations, keep-the-best. The LM loss, not distillation: on the
        30% calibrated model as good as half distillation (WikiText-2 101.7 vs 100.3, C4 31.8 vs 31.6), better
        than distillation alone (103.3, 34.9) in half the time; 2x better on the 50% SVD model. ~12 min for 500
        steps of the default on 2 cores. teacher="base" (and kd_weight) distils instead.
        `quantised` (a --bits / --bits-per-weight model): its group scales train instead (mode scales) on
        4 x 256-token batches after 30 warmup steps at lr 4e-4, the best of 1e-4 / 4e-4 / 1e-3 after 60 steps
        on the 2.5-bit default (WikiText-2 120.7 / 109.3 / 112.6 at seqlen 256, from 203.4); 300 steps take
        it from 6.9x to 2.6x dense perplexity in 24 min on 2 cores (docs/results/quantize.md)."""
        recipe = ({"mode": "scales", "lr": 4e-4, "batch_size": 4, "seqlen": 256, "warmup": 30} if quantised else
                  {"mode": "lrc", "lr": 3e-4, "batch_size": 2, "seqlen": 128, "warmup": 10})
        return cls(**{**recipe, "steps": steps, "eval_every": max(1, steps // 5), **overrides})

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
