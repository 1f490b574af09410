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
from .config import CompressConfig, from_namespace
from .data import corpus_info
from .device import parse_dtype
from .errors import WeloreError
from .evaluate import perplexity
from .files import atomic_file
from .finetune_config import FinetuneConfig
from .generate import generate, has_chat_template
from .io import load_compressed, save_dense
from .jobs import (
    AnalyzeConfig,
    CompareJob,
    CompressJob,
    EvaluateJob,
    FinetuneJob,
    GenerateJob,
    GradientsConfig,
    MergeJob,
)
from .models import load_model
from .pipeline import run_analyze, run_compress
from .progress import shown
from .report import text_table


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already speaks of it or there is none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


MODEL_HELP = "model directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)"
COMPRESSED_HELP = "welore-compressed directory"
# command: (help, the dataclasses its flags come from, its positional arguments)
SUBCOMMANDS = {
    "analyze": ("singular value spectra of every target matrix, with plots", [AnalyzeConfig],
                [("model", "?", MODEL_HELP)]),
    "compress": ("WeLore compression (the main job); compares dense / uniform / WeLore",
                 [CompressConfig, CompressJob], [("model", "?", MODEL_HELP)]),
    "evaluate": ("perplexity on WikiText-2, held-out C4, or your own text file", [EvaluateJob],
                 [("model", "?", MODEL_HELP)]),
    "generate": ("continue or answer a prompt with any model welore loads (streams tokens)", [GenerateJob],
                 [("model", None, "model directory, welore-compressed directory, .gguf file, hub id, or 'default' "
                                  "(the embedded SmolLM2-135M-Instruct)"),
                  ("prompt", "?", "the prompt (default: read standard input)")]),
    "finetune": ("fine-tune a compressed model (default: only the LRC factors)", [FinetuneConfig, FinetuneJob],
                 [("model", None, COMPRESSED_HELP)]),
    "compare": ("fine-tune with several --train modes on the same data; one table + plot",
                [FinetuneConfig, CompareJob], [("model", None, COMPRESSED_HELP)]),
    "gradients": ("record gradient low-rankness during training and relate it to WeLore", [GradientsConfig],
                  [("model", "?", MODEL_HELP)]),
    "merge": ("write a compressed model as a plain dense Hugging Face model", [MergeJob],
              [("model", None, COMPRESSED_HELP), ("output", None, "output directory")]),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="welore", description="WeLore: data-free non-uniform low-rank compression of causal LMs.")
    ap.add_argument("--version", action="version", version=f"welore {__version__}")
    sub = ap.add_subparsers(dest="command", required=True,  # HfArgumentParser: a job's dataclasses -> its flags
                            parser_class=functools.partial(HfArgumentParser, formatter_class=_Help))
    for name, (help_, dataclasses, positional) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, dataclass_types=dataclasses)
        for arg, nargs, arg_help in positional:
            p.add_argument(arg, nargs=nargs, default=None, help=arg_help)
        if name == "compress":
            p.add_argument("--param-ratio", type=float, default=None, help="parameter reduction of the targets to "
                           "hit (short for --ratio R --target params)")
            p.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                           help="always in memory, never streamed")
            p.set_defaults(ratio=None)  # unset, so that giving two of --ratio, --param-ratio, --threshold is caught
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
    out, spectra, plan = run_analyze(a.model, from_namespace(AnalyzeConfig, a))
    print((out / "summary.md").read_text())
    print(f"wrote {out}/ (spectra.safetensors, plan.json, spectra.png, reduction.png, summary.md)")
    return 0


def cmd_compress(a) -> int:
    given = [f"--{k.replace('_', '-')}" for k in ("ratio", "param_ratio", "threshold") if getattr(a, k) is not None]
    if len(given) > 1:
        raise WeloreError(f"give one of --ratio, --param-ratio, --threshold, not {' and '.join(given)}")
    if a.budgets and given:
        raise WeloreError(f"--budgets names every reduction (in --target's units): drop {given[0]}")
    if a.param_ratio is not None:
        a.ratio, a.target = a.param_ratio, "params"
    a.ratio = 0.5 if a.ratio is None else a.ratio
    cfg, job = from_namespace(CompressConfig, a), from_namespace(CompressJob, a)
    res = run_compress(a.model, cfg, job)
    if res.stream is not None:
        if res.stream.rank == 0:
            print(f"welore: {res.path}\n{res.stream.summary()}" + (f"\n\n{res.table()}" if res.rows else ""))
        return 0
    print(f"welore: {res.path}\n{res.plan.summary()}\n\n{res.table()}\n\n{res.explain(recovering=bool(job.recover))}")
    print(f"\nwrote {res.output}/ (model.safetensors, welore.json, modeling_welore.py, report.md, spectra.png, "
          f"reduction.png)")
    if job.recover:
        from .train import recover  # the training stack (Trainer, PEFT) costs ~1.3 s to import: only here

        text = "C4 text" if job.recover_data == "c4" else job.recover_data
        what = "the quantisation scales" if cfg.quantized else "the low-rank factors"
        print(f"\nrecovering: {job.recover} steps of training {what} on {text}", flush=True)
        rec = recover(res.output, steps=job.recover, device=job.device, progress=job.progress, data=job.recover_data)
        print(text_table(rec.evals))
        print(f"wrote {rec.output}/ (the recovered model: use this one; finetune.json records the recovery)")
    return 0


def cmd_evaluate(a) -> int:
    job = from_namespace(EvaluateJob, a)
    for corpus in job.corpus:  # a missing or unknown corpus fails before the model loads
        corpus_info(corpus, job.text_field)
    if job.stream and (job.dtype != "auto" or a.model is None or job.budget is not None):
        raise WeloreError("--stream evaluates a model directory (name one) in its own dtype and budget (no --dtype, "
                          "--budget)")
    loaded = None if job.stream else load_model(a.model, device=job.device, dtype=job.dtype, budget=job.budget)
    rows = []
    for corpus in job.corpus:
        kw = dict(seqlen=job.seqlen, max_tokens=job.max_tokens, text_field=job.text_field, progress=job.progress)
        r = perplexity_streaming(a.model, None, corpus, device=job.device, **kw) if job.stream else \
            perplexity(loaded.model, loaded.tokenizer, corpus, batch_size=job.batch_size, **kw)
        rows.append({"model": Path(a.model).name if job.stream else loaded.name, "corpus": corpus, "ppl": r.ppl,
                     "tokens": r.tokens, "seqlen": r.seqlen, "seconds": r.seconds, "sha256": r.sha256})
    print(text_table([{**r, "sha256": r["sha256"][:12]} for r in rows]))
    if job.output:
        with atomic_file(job.output) as tmp:
            tmp.write_text(json.dumps({"model": a.model if job.stream else loaded.source, "results": rows}, indent=1))
        print(f"wrote {job.output}")
    return 0


def cmd_generate(a) -> int:
    job, prompt = from_namespace(GenerateJob, a), a.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise WeloreError("no prompt: give one after the model, or pipe it on standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise WeloreError("the prompt is empty")
    loaded = load_model(None if a.model == "default" else a.model, device=job.device, dtype=job.dtype,
                        budget=job.budget)
    chat = not job.raw and has_chat_template(loaded.tokenizer)
    generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=job.max_new_tokens, chat=chat,
             temperature=job.temperature, seed=job.seed, stream=True, compile=job.compile)
    return 0


def cmd_merge(a) -> int:
    job = from_namespace(MergeJob, a)
    if not Path(a.model).is_dir():
        raise WeloreError(f"no such directory: {a.model}")
    loaded = load_compressed(a.model, device=job.device, dtype=parse_dtype(job.dtype), budget=job.budget)
    save_dense(merge_to_dense(loaded.model), a.output, tokenizer=loaded.tokenizer, overwrite=job.overwrite)
    print(f"wrote dense model to {a.output}/ (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_finetune(a) -> int:
    from .train import finetune  # the training stack: see cmd_compress

    job = from_namespace(FinetuneJob, a)
    res = finetune(a.model, job.output, from_namespace(FinetuneConfig, a), resume=job.resume,
                   overwrite=job.overwrite, device=job.device, progress=job.progress, budget=job.budget)
    print(text_table(res.evals))
    m = res.metrics
    print(f"trainable {m['trainable_params']:,} / {m['total_params']:,}; {m['tokens_per_s']:.0f} tokens/s; "
          f"peak memory {m['peak_memory_gib']:.2f} GiB ({m['memory_kind']}); wrote {res.output}/")
    if m["returned_step"] != res.config.steps:
        print(f"returned the weights of step {m['returned_step']}, the best held-out evaluation (--no-keep-best: "
              "the last step's)")
    return 0


def cmd_compare(a) -> int:
    from .compare_modes import compare  # the training stack: see cmd_compress

    job = from_namespace(CompareJob, a)
    rows = compare(a.model, job.output, from_namespace(FinetuneConfig, a), job.modes, lrs=job.lrs,
                   overwrite=job.overwrite, device=job.device, progress=job.progress, budget=job.budget)
    print(text_table(rows))
    print(f"wrote {job.output}/ (compare.md, compare.json, compare.png, one directory per mode)")
    return 0


def cmd_gradients(a) -> int:
    from .gradients import run_gradients  # the training stack: see cmd_compress

    out, corr, rec = run_gradients(a.model, from_namespace(GradientsConfig, a))
    print((out / "report.md").read_text().split("![")[0].strip())
    print(f"\nwrote {out}/ (gradients.json, report.md, 4 PNGs)")
    return 0


COMMANDS = {name.removeprefix("cmd_"): f for name, f in list(globals().items()) if name.startswith("cmd_")}

if __name__ == "__main__":
    sys.exit(main())
