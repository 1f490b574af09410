"""What a command does besides what the model becomes: where the model comes from and goes, what is
compared and reported, how it runs. One dataclass per command, validated in `__post_init__` and
turned into flags by `transformers.HfArgumentParser` beside the settings dataclasses of config.py
(`CompressConfig` is what the model becomes; `CompressJob` is the rest of `welore compress`).

Shared pieces are base classes, so a flag is declared once: `Runtime` (--device, -q), `Loading`
(+ --dtype, for commands that load a model), `Overwrite`, `Output` (+ -o), `Selection` (config.py:
--targets, --ignore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .allocate import check_allocation_args
from .config import Selection, _help, check_positive
from .errors import WeloreError
from .finetune_config import FinetuneConfig
from .generate import PROMPT
from .modes import COMPARED


@dataclass
class Runtime:
    """Where and how a command runs."""

    device: str | None = field(default=None, metadata=_help("cpu, cuda, cuda:N (default: cuda if available, else cpu)"))
    quiet: bool = field(default=False, metadata=_help("no progress bars", aliases=["-q"]))

    @property
    def progress(self) -> bool:
        return not self.quiet


@dataclass
class Loading(Runtime):
    dtype: str = field(default="auto", metadata=_help("auto (the checkpoint's), float32, bfloat16, float16"))


@dataclass
class Overwrite:
    overwrite: bool = field(default=False, metadata=_help("replace an existing output"))


@dataclass
class Output(Overwrite):
    output: str | None = field(default=None, metadata=_help(
        "output directory (default: a name made from the model and the settings)", aliases=["-o"]))


@dataclass
class CompressJob(Loading, Output):
    """`welore compress` around `CompressConfig`: evaluation, comparison rows, caches, streaming, and
    the recovery that may follow. See welore.pipeline.run_compress."""

    corpus: str = field(default="wikitext2", metadata=_help("evaluation corpus", choices=("wikitext2", "c4")))
    eval_tokens: int = field(default=4096, metadata=_help("tokens of the corpus to evaluate"))
    seqlen: int = field(default=512, metadata=_help("tokens per evaluation window"))
    eval: bool = field(default=True, metadata=_help("evaluate (--no-eval: skip perplexity entirely)"))
    compare: bool = field(default=True, metadata=_help("add the dense and uniform rows (--no-compare: skip them)"))
    recipe: bool = field(default=True, metadata=_help(
        "add the calibrated recipe's row (loss + whiten-fisher at the same parameter count) to a data-free run's "
        "comparison (--no-recipe: skip it)"))
    recipe_samples: int = field(default=16, metadata=_help(
        "calibration sequences of the recipe row (16 x 512 tokens keeps the main job near 2 minutes)"))
    new_tokens: int = field(default=12, metadata=_help("tokens of each row's greedy continuation (0: none)"))
    prompt: str = field(default=PROMPT, metadata=_help("the text each row continues (pick one that suits the model)"))
    spectra: str | None = field(default=None, metadata=_help(
        "reuse a spectra.safetensors from `welore analyze` (checked for staleness)"))
    stream: bool | None = field(default=None, metadata=_help(
        "block by block from the safetensors shards of MODEL (a directory): models larger than memory, a sharded "
        "output, no comparison rows (default: streams a directory when the job needs nothing else or the model "
        "would not fit in memory; --no-stream: always in memory)", nargs="?", const=True))
    resume: bool = field(default=False, metadata=_help("continue a killed streaming run from its last block"))
    recover: int | None = field(default=None, metadata=_help(
        "then recover quality: STEPS steps of LRC-only training on C4 text (FinetuneConfig.recovery; 500 steps of "
        "the 135M default take ~12 min on 2 CPU cores), or, quantised (--bits, --bits-per-weight), of its scales "
        "(--train scales), written to OUTPUT/recovered/", metavar="STEPS"))
    recover_data: str = field(default="c4", metadata=_help(
        "with --recover: train on this text instead of C4 train, a .txt / .jsonl / .json / .parquet file of the "
        "domain you care about (its last 4096 tokens are held out to judge the run)", metavar="TEXT"))

    def __post_init__(self) -> None:
        check_positive(self, "eval_tokens", "seqlen", "recipe_samples")
        if self.new_tokens < 0:
            raise WeloreError(f"new tokens must be >= 0, got {self.new_tokens}")
        if self.eval and self.eval_tokens < self.seqlen:
            raise WeloreError(f"eval tokens ({self.eval_tokens}) must be at least seqlen ({self.seqlen})")
        if self.recover is not None and self.recover <= 0:
            raise WeloreError(f"--recover must be a positive integer, got {self.recover}")
        if self.recover_data != "c4" and not self.recover:
            raise WeloreError("--recover-data needs --recover STEPS")
        if self.resume and self.stream is False:
            raise WeloreError("--resume continues a streamed run; drop --no-stream")
        if self.recover and (self.stream or self.resume):
            raise WeloreError("--recover trains in memory; after --stream, run `welore finetune OUTPUT -o "
                              "OUTPUT/recovered` if the model fits")
        if self.recover:
            FinetuneConfig.recovery(self.recover, data=self.recover_data)  # a bad text fails before compressing

    @property
    def evaluation(self) -> dict | None:
        """The evaluation protocol as welore.json records it (None: no evaluation)."""
        return {"corpus": self.corpus, "tokens": self.eval_tokens, "seqlen": self.seqlen, "prompt": self.prompt,
                "new_tokens": self.new_tokens} if self.eval else None


@dataclass
class AnalyzeConfig(Selection, Loading, Output):
    """`welore analyze`: the spectra, and the WeLore plan at `ratio` as an illustration."""

    ratio: float = field(default=0.5, metadata=_help("effective rank reduction for the illustrated plan"))
    min_ratio: float = field(default=0.5, metadata=_help("LRC if a matrix's reduction exceeds this"))

    def __post_init__(self) -> None:
        check_allocation_args(ratio=self.ratio, min_ratio=self.min_ratio)


@dataclass
class GradientsConfig(Selection, Loading, Output):
    """`welore gradients`: fine-tune MODEL (or pretrain a fresh LLaMA, `preset`) and record its gradients."""

    preset: str | None = field(default=None, metadata=_help(
        "pretrain a fresh LLaMA of this size instead: llama-tiny, llama-small (the tokenizer comes from MODEL)"))
    steps: int | None = field(default=None, metadata=_help("training steps (default 40; 300 with --preset)"))
    every: int = field(default=10, metadata=_help("record every N steps"))
    lr: float | None = field(default=None, metadata=_help("AdamW learning rate (default 1e-4; 1e-3 with --preset)"))
    batch_size: int = field(default=8, metadata=_help("sequences per step"))
    seqlen: int = field(default=128, metadata=_help("tokens per sequence"))
    top_k: int = field(default=8, metadata=_help("gradient singular values kept per record"))
    rank: int = field(default=4, metadata=_help("rank of the subspaces compared across records"))
    exact: bool = field(default=False, metadata=_help("exact SVDs instead of randomized ones"))
    ratio: float = field(default=0.5, metadata=_help("effective rank reduction defining the WeLore threshold"))
    seed: int = field(default=0, metadata=_help("seed of the data and of a preset's initialisation"))

    def __post_init__(self) -> None:
        self.steps = self.steps if self.steps is not None else (300 if self.preset else 40)
        self.lr = self.lr if self.lr is not None else (1e-3 if self.preset else 1e-4)
        check_positive(self, "steps", "batch_size", "seqlen", "top_k", "rank")
        if not 1 <= self.every <= self.steps:
            raise WeloreError(f"the sampling interval must be in [1, steps={self.steps}], got {self.every}")
        if self.rank > self.top_k:
            raise WeloreError(f"rank must be in [1, top_k={self.top_k}], got {self.rank}")
        if not self.lr > 0:
            raise WeloreError(f"learning rate must be > 0, got {self.lr}")
        check_allocation_args(ratio=self.ratio)


@dataclass
class Budget:
    budget: float | None = field(default=None, metadata=_help(
        "of an elastic directory (compressed with --budgets): the budget to load (default: its first)"))


@dataclass
class EvaluateJob(Loading, Budget):
    corpus: list[str] = field(default_factory=lambda: ["wikitext2"], metadata=_help(
        "wikitext2, c4, or a .txt / .jsonl / .json / .parquet file (default: wikitext2)", metavar="CORPUS"))
    text_field: str = field(default="text", metadata=_help("the field holding the text in .jsonl/.json/.parquet files"))
    seqlen: int = field(default=512, metadata=_help("tokens per window"))
    max_tokens: int | None = field(default=None, metadata=_help("bound the tokens evaluated"))
    batch_size: int = field(default=1, metadata=_help("windows per forward"))
    stream: bool = field(default=False, metadata=_help("block by block from the shards of MODEL (a directory)"))
    output: str | None = field(default=None, metadata=_help(
        "also write the results (with each corpus' sha256) to this JSON file", aliases=["-o"]))

    def __post_init__(self) -> None:
        check_positive(self, "seqlen", "batch_size", *(["max_tokens"] if self.max_tokens is not None else []))


@dataclass
class GenerateJob(Loading, Budget):
    raw: bool = field(default=False, metadata=_help("continue the text as it is, without the chat template"))
    max_new_tokens: int = field(default=128, metadata=_help("tokens to generate"))
    temperature: float = field(default=0.0, metadata=_help("0 (default): greedy"))
    seed: int = field(default=0, metadata=_help("seed of the sampling"))
    compile: bool = field(default=False, metadata=_help(
        "compile the decoding step (torch.compile, static KV cache): ~30 s once, then ~1.3x the tokens/s on a CPU; "
        "for long generations"))

    def __post_init__(self) -> None:
        check_positive(self, "max_new_tokens")
        if self.temperature < 0:
            raise WeloreError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class MergeJob(Loading, Overwrite, Budget):
    """`welore merge MODEL OUTPUT`."""


@dataclass
class FinetuneJob(Runtime, Output, Budget):
    """`welore finetune` around `FinetuneConfig`."""

    resume: bool = field(default=False, metadata=_help("continue from OUTPUT.ckpt/"))

    def __post_init__(self) -> None:
        if self.output is None:
            raise WeloreError("name the output directory with -o OUTPUT")


@dataclass
class CompareJob(Runtime, Output, Budget):
    """`welore compare` around `FinetuneConfig`: one run per mode."""

    modes: list[str] = field(default_factory=lambda: list(COMPARED), metadata=_help(
        "the modes to run (each in its own process)"))
    mode_lr: list[str] = field(default_factory=list, metadata=_help(
        "a mode's own learning rate instead of --lr, e.g. full=5e-5", metavar="MODE=LR"))

    def __post_init__(self) -> None:
        if self.output is None:
            raise WeloreError("name the output directory with -o OUTPUT")
        self.lrs  # noqa: B018 -- a malformed MODE=LR fails here, before any run

    @property
    def lrs(self) -> dict[str, float]:
        """--mode-lr as {mode: rate} (the modes themselves are checked by welore.compare_modes)."""
        out: dict[str, float] = {}
        for s in self.mode_lr:
            mode, sep, lr = s.partition("=")
            try:
                if not sep:
                    raise ValueError
                rate = float(lr)
            except ValueError:
                raise WeloreError(f"--mode-lr: expected MODE=LR, e.g. full=5e-5, got {s!r}") from None
            if mode in out:
                raise WeloreError(f"--mode-lr names a mode twice: {mode}")
            out[mode] = rate
        return out
