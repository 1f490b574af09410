"""`welore` command line: argument parsing over the library API, one-line errors, exit codes.

Exit codes: 0 ok, 1 unexpected failure (a bug: traceback shown), 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from transformers import HfArgumentParser

from ._version import __version__
from .blockwise import perplexity_streaming
from .compress import merge_to_dense
from .config import MODES, CompressConfig, FinetuneConfig, from_namespace
from .data import corpus_info
from .errors import WeloreError
from .evaluate import perplexity
from .generate import generate, has_chat_template
from .io import atomic_file, load_compressed, save_dense
from .models import load_model
from .pipeline import default_output, run_analyze, run_compress
from .progress import shown
from .report import text_table
from .stream import compress_streaming


def _positive_int(s: str) -> int:
    if not s.strip().isdigit() or int(s) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def _mode_lr(s: str) -> tuple[str, float]:
    """MODE=LR of `welore compare --mode-lr` (the mode and the rate are checked by `compare`)."""
    mode, sep, lr = s.partition("=")
    try:
        if not sep:
            raise ValueError
        return mode, float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODE=LR, e.g. full=5e-5, got {s!r}") from None


def _common(p: argparse.ArgumentParser, model_optional: bool = True) -> None:  # MODEL, where and how to run
    if model_optional:
        p.add_argument("model", nargs="?", default=None,
                       help="model directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", nargs="+", metavar="REGEX",
                   help="regexes of module names to compress (default: every linear layer in the blocks)")
    p.add_argument("--ignore", nargs="+", metavar="REGEX", help="regexes of module names to leave dense")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already speaks of it or there is none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="welore", description="WeLore: data-free non-uniform low-rank compression of causal LMs.")
    ap.add_argument("--version", action="version", version=f"welore {__version__}")
    sub = ap.add_subparsers(dest="command", required=True,  # HfArgumentParser: a job's dataclass -> its flags
                            parser_class=functools.partial(HfArgumentParser, formatter_class=_Help))

    p = sub.add_parser("analyze", help="singular value spectra of every target matrix, with plots")
    _common(p)
    _targets(p)
    p.add_argument("-o", "--output", help="output directory (default: analysis/<model name>)")
    p.add_argument("--ratio", type=float, default=0.5, help="effective rank reduction for the illustrated plan")
    p.add_argument("--min-ratio", type=float, default=0.5, help="LRC if a matrix's reduction exceeds this")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("compress", help="WeLore compression (the main job); compares dense / uniform / WeLore",
                       dataclass_types=[CompressConfig])
    _common(p)
    p.add_argument("--param-ratio", type=float, default=None, help="parameter reduction of the targets to hit "
                   "(short for --ratio R --target params)")
    p.set_defaults(ratio=None)  # unset, so that giving two of --ratio, --param-ratio, --threshold is caught
    p.add_argument("--stream", action="store_true", help="block by block from the safetensors shards of MODEL (a "
                   "directory), for models larger than memory; writes a sharded output, no comparison")
    p.add_argument("--resume", action="store_true", help="with --stream: continue a killed run from its last block")
    p.add_argument("--recover", type=_positive_int, default=None, metavar="STEPS",
                   help="then recover quality: STEPS steps of LRC-only training on C4 text (the recipe of "
                        "FinetuneConfig.recovery; 500 steps of the default take ~12 min on 2 CPU cores), "
                        "written to OUTPUT/recovered/")
    p.add_argument("--recover-data", default="c4", metavar="TEXT",
                   help="with --recover: train on this text instead of C4 train, a .txt / .jsonl / .json / .parquet "
                        f"file of the domain you care about (its last {FinetuneConfig.eval_tokens} tokens are held "
                        "out to judge the run)")
    p.add_argument("--spectra", help="reuse a spectra.safetensors from `welore analyze` (checked for staleness)")
    p.add_argument("-o", "--output", help="output directory (default: compressed/<model>-<allocation>-r<ratio>)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-compare", action="store_true", help="skip the dense and uniform rows")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity entirely")
    p.add_argument("--no-recipe", action="store_true",
                   help="skip the calibrated-recipe row (loss + whiten-fisher at the same parameter count) that "
                        "a data-free run adds to the comparison")
    p.add_argument("--corpus", default="wikitext2", choices=["wikitext2", "c4"])
    p.add_argument("--eval-tokens", type=_positive_int, default=4096, help="tokens of the corpus to evaluate")
    p.add_argument("--seqlen", type=_positive_int, default=512)

    p = sub.add_parser("evaluate", help="perplexity on WikiText-2, held-out C4, or your own text file")
    _common(p)
    p.add_argument("--corpus", nargs="+", default=["wikitext2"], metavar="CORPUS",
                   help="wikitext2, c4, or a .txt / .jsonl / .json / .parquet file (default: wikitext2)")
    p.add_argument("--text-field", default="text", help="the field holding the text in .jsonl/.json/.parquet files")
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="bound the tokens evaluated")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--stream", action="store_true", help="block by block from the shards of MODEL (a directory)")
    p.add_argument("-o", "--output", help="also write the results (with each corpus' sha256) to this JSON file")

    p = sub.add_parser("generate", help="continue or answer a prompt with any model welore loads (streams tokens)")
    p.add_argument("model", help="model directory, welore-compressed directory, .gguf file, hub id, or 'default' "
                                 "(the embedded SmolLM2-135M-Instruct)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read standard input)")
    p.add_argument("--raw", action="store_true", help="continue the text as it is, without the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--seed", type=int, default=0)
    _common(p, model_optional=False)

    for name, help_ in (("finetune", "fine-tune a compressed model (default: only the LRC factors)"),
                        ("compare", "fine-tune with several --train modes on the same data; one table + plot")):
        p = sub.add_parser(name, help=help_, dataclass_types=[FinetuneConfig])
        p.add_argument("model", help="welore-compressed directory")
        p.add_argument("-o", "--output", required=True, help="output directory")
        if name == "finetune":
            p.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt/")
        else:
            p.add_argument("--modes", nargs="+", default=list(MODES), help="the modes to run (each in its own process)")
            p.add_argument("--mode-lr", nargs="+", type=_mode_lr, default=[], metavar="MODE=LR",
                           help="a mode's own learning rate instead of --lr, e.g. full=5e-5")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--device", default=None)
        p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("gradients", help="record gradient low-rankness during training and relate it to WeLore")
    _common(p)
    _targets(p)
    p.add_argument("--preset", default=None, help="pretrain a fresh LLaMA of this size instead: llama-tiny, "
                   "llama-small (the tokenizer comes from MODEL)")
    p.add_argument("-o", "--output", help="output directory (default: gradients/<model or preset>)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 40; 300 with --preset)")
    p.add_argument("--every", type=int, default=10, help="record every N steps")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4; 1e-3 with --preset)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seqlen", type=_positive_int, default=128)
    p.add_argument("--top-k", type=_positive_int, default=8, help="gradient singular values kept per record")
    p.add_argument("--rank", type=_positive_int, default=4, help="rank of the subspaces compared across records")
    p.add_argument("--exact", action="store_true", help="exact SVDs instead of randomized ones")
    p.add_argument("--ratio", type=float, default=0.5, help="effective rank reduction defining the WeLore threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("merge", help="write a compressed model as a plain dense Hugging Face model")
    p.add_argument("model", help="welore-compressed directory")
    p.add_argument("output", help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="welore: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    try:
        with shown(not getattr(args, "quiet", False)):  # -q: ours and the libraries' bars alike
            return COMMANDS[args.command](args)
    except WeloreError as e:
        print(f"welore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("welore: interrupted", file=sys.stderr)
        return 130


def cmd_analyze(a) -> int:
    out, spectra, plan = run_analyze(a.model, a.output, targets=a.targets, ignore=a.ignore, ratio=a.ratio,
                                     min_ratio=a.min_ratio, device=a.device, dtype=a.dtype,
                                     overwrite=a.overwrite, progress=not a.quiet)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/ (spectra.safetensors, plan.json, spectra.png, reduction.png, summary.md)")
    return 0


def cmd_compress(a) -> int:
    given = [f"--{k.replace('_', '-')}" for k in ("ratio", "param_ratio", "threshold") if getattr(a, k) is not None]
    if len(given) > 1:
        raise WeloreError(f"give one of --ratio, --param-ratio, --threshold, not {' and '.join(given)}")
    if a.param_ratio is not None:
        a.ratio, a.target = a.param_ratio, "params"
    a.ratio = 0.5 if a.ratio is None else a.ratio
    cfg = from_namespace(CompressConfig, a)
    if a.recover and (a.stream or a.resume):
        raise WeloreError("--recover trains in memory; after --stream, run `welore finetune OUTPUT -o "
                          "OUTPUT/recovered` if the model fits")
    if a.recover_data != "c4" and not a.recover:
        raise WeloreError("--recover-data needs --recover STEPS")
    if a.recover:
        FinetuneConfig.recovery(a.recover, data=a.recover_data)  # a bad recovery text fails before compressing
    if a.stream or a.resume:
        return _compress_streaming(a, cfg)
    # the recipe row shows what calibration buys; a run that is itself calibrated has no need of it
    res = run_compress(a.model, a.output, cfg, spectra_path=a.spectra, compare=not a.no_compare,
                       evaluate=not a.no_eval, corpus=a.corpus, eval_tokens=a.eval_tokens, seqlen=a.seqlen,
                       recipe=not a.no_recipe and not cfg.calibrated, device=a.device, dtype=a.dtype,
                       overwrite=a.overwrite, progress=not a.quiet)
    print(f"{res.plan.summary()}\n\n{res.table()}\n\n{res.explain(recovering=bool(a.recover))}")
    print(f"\nwrote {res.output}/ (model.safetensors, welore.json, modeling_welore.py, report.md, spectra.png, "
          f"reduction.png)")
    if a.recover:
        from .train import recover  # the training stack: see cmd_finetune

        text = "C4 text" if a.recover_data == "c4" else a.recover_data
        print(f"\nrecovering: {a.recover} steps of training the low-rank factors on {text}", flush=True)
        rec = recover(res.output, steps=a.recover, device=a.device, progress=not a.quiet, data=a.recover_data)
        print(text_table(rec.evals))
        print(f"wrote {rec.output}/ (the recovered model: use this one; finetune.json records the recovery)")
    return 0


def _compress_streaming(a, cfg: CompressConfig) -> int:  # welore compress --stream
    if not a.stream:
        raise WeloreError("--resume continues a --stream run; add --stream")
    if a.model is None:
        raise WeloreError("--stream reads a model directory with safetensors weights; name one")
    out = a.output or default_output(Path(a.model).name, cfg.allocation, cfg.target, cfg.ratio, cfg.threshold)
    res = compress_streaming(a.model, out, cfg, resume=a.resume, overwrite=a.overwrite, device=a.device,
                             progress=not a.quiet)
    if res.rank == 0:
        print(res.summary())
    return 0


def cmd_evaluate(a) -> int:
    for corpus in a.corpus:  # a missing or unknown corpus fails before the model loads
        corpus_info(corpus, a.text_field)
    if a.stream and (a.dtype != "auto" or a.model is None):
        raise WeloreError("--stream evaluates a model directory (name one) in its own dtype (no --dtype)")
    loaded = None if a.stream else load_model(a.model, device=a.device, dtype=a.dtype)
    rows = []
    for corpus in a.corpus:
        kw = dict(seqlen=a.seqlen, max_tokens=a.max_tokens, text_field=a.text_field, progress=not a.quiet)
        r = perplexity_streaming(a.model, None, corpus, device=a.device, **kw) if a.stream else \
            perplexity(loaded.model, loaded.tokenizer, corpus, batch_size=a.batch_size, **kw)
        rows.append({"model": Path(a.model).name if a.stream else loaded.name, "corpus": corpus, "ppl": r.ppl, "tokens": r.tokens,
                     "seqlen": r.seqlen, "seconds": r.seconds, "sha256": r.sha256})
    print(text_table([{**r, "sha256": r["sha256"][:12]} for r in rows]))
    if a.output:
        with atomic_file(a.output) as tmp:
            tmp.write_text(json.dumps({"model": a.model if a.stream else loaded.source, "results": rows}, indent=1))
        print(f"wrote {a.output}")
    return 0


def cmd_generate(a) -> int:
    prompt = a.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise WeloreError("no prompt: give one after the model, or pipe it on standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise WeloreError("the prompt is empty")
    loaded = load_model(None if a.model == "default" else a.model, device=a.device, dtype=a.dtype)
    chat = not a.raw and has_chat_template(loaded.tokenizer)
    generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=a.max_new_tokens, chat=chat,
             temperature=a.temperature, seed=a.seed, stream=True)
    return 0


def cmd_merge(a) -> int:

    if not Path(a.model).is_dir():
        raise WeloreError(f"no such directory: {a.model}")
    loaded = load_compressed(a.model, device=a.device)
    save_dense(merge_to_dense(loaded.model), a.output, tokenizer=loaded.tokenizer, overwrite=a.overwrite)
    print(f"wrote dense model to {a.output}/ (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_finetune(a) -> int:
    from .train import finetune  # the training stack (Trainer, PEFT) costs ~1.3 s to import: only here

    res = finetune(a.model, a.output, from_namespace(FinetuneConfig, a), resume=a.resume, overwrite=a.overwrite,
                   device=a.device, progress=not a.quiet)
    print(text_table(res.evals))
    m = res.metrics
    print(f"trainable {m['trainable_params']:,} / {m['total_params']:,}; {m['tokens_per_s']:.0f} tokens/s; "
          f"peak memory {m['peak_memory_gib']:.2f} GiB ({m['memory_kind']}); wrote {res.output}/")
    if m["returned_step"] != res.config.steps:
        print(f"returned the weights of step {m['returned_step']}, the best held-out evaluation (--no-keep-best: "
              "the last step's)")
    return 0


def cmd_compare(a) -> int:
    from .compare import compare  # the training stack: see cmd_finetune

    named = [m for m, _ in a.mode_lr]
    if len(set(named)) < len(named):
        raise WeloreError(f"--mode-lr names a mode twice: {' '.join(named)}")
    rows = compare(a.model, a.output, from_namespace(FinetuneConfig, a), a.modes, lrs=dict(a.mode_lr),
                   overwrite=a.overwrite, device=a.device, progress=not a.quiet)
    print(text_table(rows))
    print(f"wrote {a.output}/ (compare.md, compare.json, compare.png, one directory per mode)")
    return 0


def cmd_gradients(a) -> int:
    from .gradients import run_gradients  # the training stack: see cmd_finetune

    out, corr, rec = run_gradients(a.model, a.output, preset=a.preset, steps=a.steps, every=a.every, lr=a.lr,
                                   batch_size=a.batch_size, seqlen=a.seqlen, top_k=a.top_k, rank=a.rank,
                                   exact=a.exact, ratio=a.ratio, seed=a.seed, targets=a.targets, ignore=a.ignore,
                                   device=a.device, overwrite=a.overwrite, progress=not a.quiet)
    print((out / "report.md").read_text().split("![")[0].strip())
    print(f"\nwrote {out}/ (gradients.json, report.md, 4 PNGs)")
    return 0


COMMANDS = {name.removeprefix("cmd_"): f for name, f in list(globals().items()) if name.startswith("cmd_")}

if __name__ == "__main__":
    sys.exit(main())
