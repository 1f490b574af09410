"""The jobs behind `welore analyze` and `welore compress` (the CLI only parses arguments).

    run_compress(source, CompressConfig(ratio=0.5), CompressJob())   # the main job

`run_compress` is load -> compress -> save, in memory or streamed block by block (`streams` picks
the path in one place), then the comparison rows (welore.baselines) and the report. The job
(`CompressJob`) says what is evaluated and compared; the config (`CompressConfig`) what the model
becomes, and is all that welore.json needs to reproduce it.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import elastic
from .allocate import RankPlan, allocate
from .baselines import comparison_rows, row_maker
from .blockwise import perplexity_streaming
from .compress import compress
from .config import CompressConfig
from .device import process_memory
from .errors import WeloreError
from .files import atomic_dir, atomic_file, check_output
from .io import is_quantised, load_compressed, read_tokenizer, save_compressed
from .jobs import AnalyzeConfig, CompressJob
from .models import load_model
from .report import markdown_table, plot_reduction_heatmap, plot_spectra, text_table
from .spectrum import Spectra, analyze
from .stream import StreamResult, compress_streaming
from .targets import find_targets

# in-memory peak over the checkpoint's bytes: the model, its SVD factors, one more copy for the
# comparison's baselines (measured: docs/streaming.md)
MEMORY_FACTOR = {True: 3.0, False: 2.0}


@dataclass
class CompressResult:
    output: Path
    plan: RankPlan
    rows: list[dict] = field(default_factory=list)  # one per model variant (dense / uniform / ours / recipe)
    settings: dict = field(default_factory=dict)
    path: str = ""  # which path ran and why, as printed
    stream: StreamResult | None = None  # the streamed path's own result
    per_token: float | None = None  # evaluation seconds per token of the compressed model

    def table(self) -> str:
        return text_table(self.rows)

    def explain(self, recovering: bool = False) -> str:
        """What the table's columns mean and what to try next, for the model that ran."""
        return next_steps(self.output, self.plan, self.settings, self.rows, self.per_token, recovering)


def default_output(name: str, cfg: CompressConfig) -> Path:
    tag = f"t{cfg.threshold:g}" if cfg.threshold is not None else \
        f"{cfg.target[0]}{round(cfg.ratio * 100)}"  # r50 (rank), p20 (params), l30 (latency), b3 (bits)
    return Path("compressed") / f"{name}-{cfg.allocation}-{tag}"


def run_analyze(source, cfg: AnalyzeConfig) -> tuple[Path, Spectra, RankPlan]:
    """Spectra of every target, saved with plots and the WeLore plan at `cfg.ratio` as an illustration."""
    check_output(cfg.output, cfg.overwrite)
    loaded = load_model(source, device=cfg.device, dtype=cfg.dtype, tokenizer=False)
    output = Path(cfg.output) if cfg.output else Path("analysis") / loaded.name
    with atomic_dir(output, cfg.overwrite) as tmp:
        spectra = analyze(loaded.model, find_targets(loaded.model, cfg.targets, cfg.ignore), progress=cfg.progress)
        plan = allocate(spectra, ratio=cfg.ratio, min_ratio=cfg.min_ratio)
        spectra.save(tmp / "spectra.safetensors")
        plan.save(tmp / "plan.json")
        plot_spectra(spectra, tmp / "spectra.png", title=f"{loaded.name}: normalised singular values")
        plot_reduction_heatmap(plan, spectra, tmp / "reduction.png")
        (tmp / "summary.md").write_text(type_summary(spectra, plan, loaded.name))
    return output, spectra, plan


def streams(source, cfg: CompressConfig, job: CompressJob) -> tuple[bool, str]:
    """Whether `welore compress` streams, and why: never with --bits (quantisation runs on the model
    in memory; --stream with it is an error); else as --stream / --no-stream (or --resume) say; else a
    directory of safetensors weights streams unless the job needs the model in memory (a spectra
    cache, another dtype, a recovery), and anything streams that would not fit in the memory
    available. Streamed, the dense and compressed models are evaluated block by block; the uniform
    and recipe rows and the continuations need the in-memory path (--no-stream)."""
    if cfg.quantized or cfg.budgets:
        what = "quantising" if cfg.quantized else "--budgets"
        if job.stream:
            raise WeloreError(f"{what} needs the model in memory; drop --stream")
        return False, f"{what} needs the model in memory"
    if job.stream is not None or job.resume:
        return bool(job.stream is not False), "as asked"
    d = Path(source) if source is not None else None
    if d is None or not d.is_dir() or (d / "welore.json").is_file() or not any(d.glob("*.safetensors")):
        return False, "the model is not a directory of safetensors weights"
    needs = [what for what, on in (("--spectra", job.spectra), ("--dtype", job.dtype != "auto"),
                                   ("--recover", job.recover)) if on]
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    need = size * MEMORY_FACTOR[bool(job.eval and job.compare)]
    free = psutil.virtual_memory().available
    if need > free:
        dropped = f"; skipped: {', '.join(needs)}" if needs else ""
        return True, f"in memory it would need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free{dropped}"
    if needs:
        return False, f"needs the model in memory for {', '.join(needs)}"
    rows = "; uniform and recipe rows and continuations: --no-stream" if job.eval and job.compare else ""
    return True, f"a directory of safetensors weights{rows}"


def _streamed_rows(source, cfg: CompressConfig, res: StreamResult, job: CompressJob) -> list[dict]:
    """Dense and compressed perplexity, each evaluated block by block (welore.blockwise): no model is
    ever whole in memory. Written to the output's results.json."""
    rows = []
    for label, path, plan in (("dense", Path(source), None), (cfg.rule.label, res.output, res.plan)):
        r = perplexity_streaming(path, None, job.corpus, seqlen=job.seqlen, max_tokens=job.eval_tokens,
                                 device=job.device, progress=job.progress)
        rows.append({"model": label, "eff. rank red.": f"{plan.effective_rank_reduction:.1%}" if plan else "0.0%",
                     "param red. (targets)": f"{plan.param_reduction:.1%}" if plan else "0.0%",
                     "LRCs": len(plan.lrcs) if plan else 0, f"{job.corpus} ppl": r.ppl, "eval s": r.seconds})
    with atomic_file(res.output / "results.json") as f:
        f.write_text(json.dumps({"rows": rows, "evaluation": job.evaluation, "streamed": True}, indent=1))
    return rows


def run_compress(source, cfg: CompressConfig, job: CompressJob) -> CompressResult:
    """The main job (see module docstring): the compressed model in `job.output`, its comparison rows."""
    if job.spectra and (cfg.rule.needs_tails or cfg.rule.needs_choices) and cfg.factorizer.is_weight_svd:
        raise WeloreError(f"the {cfg.allocation} allocation needs SVD factors, which --spectra files do not hold")
    stream, why = streams(source, cfg, job)
    path = f"{'streamed block by block' if stream else 'in memory'} ({why})"
    if stream:
        if source is None:
            raise WeloreError("--stream reads a model directory with safetensors weights; name one")
        out = Path(job.output) if job.output else default_output(Path(source).name, cfg)
        res = compress_streaming(source, out, cfg, resume=job.resume, overwrite=job.overwrite, device=job.device,
                                 progress=job.progress)
        evaluated = res.rank == 0 and job.eval and read_tokenizer(source) is not None
        rows = _streamed_rows(source, cfg, res, job) if evaluated else []
        return CompressResult(res.output, res.plan, rows, settings=cfg.to_dict(), path=path, stream=res)
    check_output(job.output, job.overwrite)
    t0 = time.perf_counter()
    loaded = load_model(source, device=job.device, dtype=job.dtype)
    if loaded.meta is not None:
        raise WeloreError(f"{loaded.source} is already compressed; compress its base model instead")
    output = Path(job.output) if job.output else default_output(loaded.name, cfg)
    check_output(output, job.overwrite)
    model, tok = loaded.model, loaded.tokenizer
    if job.eval and tok is None:
        raise WeloreError("the model has no tokenizer, so it cannot be evaluated (use --no-eval)")
    load_s = time.perf_counter() - t0
    dense = copy.deepcopy(model) if job.eval and job.compare else None  # the baselines' starting point

    done = compress(model, tok, cfg, spectra=Spectra.load(job.spectra) if job.spectra else None,
                    progress=job.progress)
    plan, spectra = done.plan, done.spectra
    plans = elastic.budget_plans(cfg, done) if cfg.budgets else None  # an elastic directory: every budget's plan
    recipe = dense is not None and job.recipe and not cfg.calibrated
    settings = {"source": loaded.source, "name": loaded.name, **cfg.to_dict(), "eval": job.evaluation,
                "recipe_row": {"allocation": "loss", "method": "whiten-fisher", "samples": job.recipe_samples,
                               "seqlen": cfg.calib_seqlen, "seed": cfg.seed} if recipe else None, "path": path}

    def write_spectra(tmp: Path) -> None:
        spectra.save(tmp / "spectra.safetensors")
        plot_spectra(spectra, tmp / "spectra.png", title=f"{loaded.name}: normalised singular values")
        plot_reduction_heatmap(plan, spectra, tmp / "reduction.png")

    # saved first: the comparison below only reads the compressed model and adds the report
    save_compressed(model, output, plan, tokenizer=tok, base_model=loaded.source, settings=settings,
                    overwrite=job.overwrite, extra=write_spectra, budgets=plans,
                    tensors=elastic.extra_factors(model, plans, done.first_pass[0]) if plans else None)
    speed: dict = {}
    row = row_maker(tok, job, speed, bits=cfg.quantized)
    label = cfg.rule.label + (f" @ {next(iter(plans))}" if plans else "")
    ours = row(label, plan, model, done.prep_seconds + done.apply_seconds)
    del model
    done.model = loaded.model = None  # only `dense` stays in memory for the baselines
    gc.collect()
    rows = [ours] if dense is None else comparison_rows(dense, tok, done, ours, job, row)
    del dense
    for k in list(plans or [])[1:]:  # each further budget as it loads: sliced from the directory just written
        rows.append(row(f"{cfg.rule.label} @ {k}", plans[k], load_compressed(output, budget=float(k)).model, 0.0))
    result = CompressResult(output, plan, rows, settings, path, per_token=speed.get(ours["model"]))
    memory = {**process_memory(), "model_bytes": (output / "model.safetensors").stat().st_size}
    with atomic_file(output / "results.json") as f:
        f.write_text(json.dumps({"rows": rows, "load_seconds": load_s, "memory": memory,
                                 "eval_seconds_per_token": speed}, indent=1))
    with atomic_file(output / "report.md") as f:
        f.write_text(f"# welore compress: {loaded.name}\n\n{plan.summary()}\n\n"
                     f"Settings: `{json.dumps(settings)}`\n\n{markdown_table(rows)}\n\n"
                     f"Memory: {', '.join(f'{k} {v:.2f}' for k, v in memory.items() if k.endswith('gib'))} "
                     f"(the whole job, comparison included); the compressed model takes "
                     f"{memory['model_bytes'] / 2**30:.2f} GiB on disk.\n\n"
                     f"{result.explain()}\n\n![spectra](spectra.png)\n\n![reduction](reduction.png)\n\n"
                     f"{type_summary(spectra, plan, loaded.name).split(chr(10), 2)[2]}")
    return result


def type_summary(spectra: Spectra, plan: RankPlan, name: str) -> str:
    """Mean WeLore reduction per matrix type: which kinds of matrix are low-rank."""
    by_type: dict[str, list] = {}
    for t, m in zip(spectra.targets, plan.matrices):
        by_type.setdefault(t.type, []).append(m)
    rows = [{"matrix type": typ, "shape": f"{ms[0].out_features}x{ms[0].in_features}", "count": len(ms),
             "mean reduction": sum(m.reduction for m in ms) / len(ms),
             "min": min(m.reduction for m in ms), "max": max(m.reduction for m in ms),
             "LRCs": sum(m.lrc for m in ms),
             **({"bits/weight": 8 * sum(m.nbytes for m in ms) / sum(m.params_before for m in ms)}
                if plan.bits_per_weight is not None else {})} for typ, ms in by_type.items()]
    return (f"# {name}: spectra\n\n{len(spectra.targets)} target matrices, SVD in {spectra.seconds:.1f} s.\n\n"
            f"WeLore plan at the requested ratio: {plan.summary()}\n\n{markdown_table(rows)}\n")


# The recovery recipe (FinetuneConfig.recovery(500)) trains 500 x 2 x 128 tokens and evaluates 6 x
# (4,096 C4 + 4,096 WikiText-2) tokens. A training token costs RECOVERY_COST evaluation tokens: on the
# default's 50% model, LRC-only training ran at 187.6 tokens/s (docs/results/recovery.md, "Speed and
# memory per mode") and the main job evaluated it at 670 tokens/s (results.json's
# eval_seconds_per_token, 1.49 ms), so this run's evaluation speed predicts ~12.7 min for it there.
RECOVERY_TOKENS, RECOVERY_EVAL_TOKENS, RECOVERY_COST = 500 * 2 * 128, 6 * 2 * 4096, 3.6


def next_steps(out: Path, plan: RankPlan, settings: dict, rows: list[dict], per_token: float | None,
               recovering: bool = False) -> str:
    """What the table's columns mean and what to try next, with times measured on the model that
    ran; `recovering`: the recovery recipe runs next anyway, so it is not suggested."""
    ev, lines = settings.get("eval") or {}, []
    prompt = ev.get("prompt", "The capital of France is")
    if ev:
        lines.append(f"{ev['corpus']} ppl: perplexity on the first {ev['tokens']:,} tokens of {ev['corpus']} "
                     f"(lower is better; dense is the uncompressed model). continuation: greedy, "
                     f"{ev.get('new_tokens', 12)} tokens after {prompt!r}.")
    lines += ["", "Next:"]
    if plan.param_reduction > 0 and settings.get("allocation") != "bits" and not (
            settings.get("allocation") == "loss" and settings.get("method") == "whiten-fisher"):
        took = next((r for r in rows if r["model"].startswith("loss + whiten-fisher")), None)
        when = f" (its row above took {took['compress s']:.0f} s at a smaller calibration)" if took else ""
        lines.append(f"  better quality at this size, calibrated{when}: welore compress --param-ratio "
                     f"{plan.param_reduction:.3f} --allocation loss --method whiten-fisher")
    if is_quantised(settings) and not recovering:  # FinetuneConfig.recovery(300, quantised=True), as flags
        lines.append(f"  recover what quantisation cost, in the same bytes, by training its scales on C4 text; or add "
                     f"--recover 300 to this command: welore finetune {out} -o {out}/recovered --train scales "
                     "--lr 4e-4 --warmup 30 --batch-size 4 --seqlen 256 --steps 300 --eval-every 60")
    elif plan.lrcs and not recovering:  # FinetuneConfig.recovery(500), as flags
        when = f" (~{per_token * (RECOVERY_TOKENS * RECOVERY_COST + RECOVERY_EVAL_TOKENS) / 60:.0f} min here, from " \
               "this run's evaluation speed)" if per_token else ""
        lines.append(f"  recover quality by training the low-rank factors on C4 text{when}; or add --recover 500 to "
                     f"this command: welore finetune {out} -o {out}/recovered --lr 3e-4 --warmup 10 --batch-size 2 "
                     "--seqlen 128 --steps 500 --eval-every 100")
    lines.append(f"  read what it writes: welore generate {out} {json.dumps(prompt)} --raw --max-new-tokens 64")  # --raw takes a value when one follows
    return "\n".join(lines)
