"""The end-to-end jobs behind `welore analyze` and `welore compress` (the CLI only parses arguments).

`compress` is the main job: load -> one SVD per target -> WeLore plan -> compress -> save, and, with
`compare=True`, evaluate dense vs uniform vs WeLore at the same reduction (effective rank, or parameters
for a parameter target), so every run shows what the non-uniform allocation buys. With `recipe=True`
(the default job) it adds the calibrated recipe, loss allocation + whiten-fisher, at the WeLore row's
parameter count, and every row shows its greedy continuation of one prompt.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .allocate import RankPlan, allocate, check_allocation_args
from .calibrate import calibration_batches, collect_stats
from .compress import Compressed, apply_plan, compress, count_parameters
from .config import CompressConfig
from .device import process_memory
from .errors import WeloreError
from .evaluate import perplexity
from .factorize import analyze_data_aware, attach_loss_tails
from .generate import PROMPT, continuation
from .io import atomic_dir, atomic_file, check_output, save_compressed
from .models import load_model
from .report import markdown_table, plot_reduction_heatmap, plot_spectra, text_table
from .spectrum import Spectra, analyze
from .targets import find_targets

RECIPE_SAMPLES = 16  # the main job's recipe row: 16 x 512 tokens keeps the whole job near 2 minutes


@dataclass
class CompressResult:
    output: Path
    plan: RankPlan
    rows: list[dict] = field(default_factory=list)  # one per model variant (dense / uniform / welore / recipe)
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        return text_table(self.rows)

    def explain(self, recovering: bool = False) -> str:
        """What the table's columns mean and what to try next (printed under the table); `recovering`:
        the recovery recipe runs next anyway, so it is not suggested."""
        ev = self.settings.get("eval") or {}
        lines = []
        if ev:
            lines.append(f"{ev['corpus']} ppl: perplexity on the first {ev['tokens']:,} tokens of {ev['corpus']} "
                         f"(lower is better; dense is the uncompressed model). continuation: greedy, "
                         f"{ev.get('new_tokens', 12)} tokens after {PROMPT!r}.")
        ratio, out = self.plan.param_reduction, self.output
        lines += ["", "Next:"]
        recipe = self.settings.get("allocation") == "loss" and self.settings.get("method") == "whiten-fisher"
        if ratio > 0 and not recipe:
            lines.append(f"  better quality at this size (calibrated, ~2 min): welore compress --param-ratio {ratio:.3f} "
                         "--allocation loss --method whiten-fisher")
        if self.plan.lrcs and not recovering:  # FinetuneConfig.recovery(500), as flags
            lines.append(f"  recover quality by training the low-rank factors on C4 text (the 135M default: ~12 "
                         f"min on 2 CPU cores; or add --recover 500 to this command): welore finetune {out} -o "
                         f"{out}/recovered --lr 3e-4 --warmup 10 --batch-size 2 --seqlen 128 --steps 500 "
                         "--eval-every 100")
        lines.append(f"  read what it writes: welore generate {out} \"Tell me about Paris.\"")
        return "\n".join(lines)


def default_output(name: str, allocation: str, target: str, ratio: float | None, threshold: float | None) -> Path:
    tag = f"t{threshold:g}" if threshold is not None else f"{'r' if target == 'rank' else 'p'}{round(ratio * 100)}"
    return Path("compressed") / f"{name}-{allocation}-{tag}"


def run_analyze(source=None, output=None, *, targets=None, ignore=None, ratio: float = 0.5,
                min_ratio: float = 0.5, device=None, dtype=None, overwrite: bool = False,
                progress: bool = True) -> tuple[Path, Spectra, RankPlan]:
    """Spectra of every target, saved with plots and the WeLore plan at `ratio` as an illustration."""
    check_allocation_args(ratio=ratio, min_ratio=min_ratio)
    check_output(output, overwrite)
    loaded = load_model(source, device=device, dtype=dtype, tokenizer=False)
    output = Path(output) if output else Path("analysis") / loaded.name
    with atomic_dir(output, overwrite) as tmp:
        spectra = analyze(loaded.model, find_targets(loaded.model, targets, ignore), progress=progress)
        plan = allocate(spectra, ratio=ratio, min_ratio=min_ratio)
        spectra.save(tmp / "spectra.safetensors")
        plan.save(tmp / "plan.json")
        plot_spectra(spectra, tmp / "spectra.png", title=f"{loaded.name}: normalised singular values")
        plot_reduction_heatmap(plan, spectra, tmp / "reduction.png")
        (tmp / "summary.md").write_text(_type_summary(spectra, plan, loaded.name))
    return output, spectra, plan


def _type_summary(spectra: Spectra, plan: RankPlan, name: str) -> str:
    """Mean WeLore reduction per matrix type: which kinds of matrix are low-rank."""
    by_type: dict[str, list] = {}
    for t, m in zip(spectra.targets, plan.matrices):
        by_type.setdefault(t.type, []).append(m)
    rows = [{"matrix type": typ, "shape": f"{ms[0].out_features}x{ms[0].in_features}", "count": len(ms),
             "mean reduction": sum(m.reduction for m in ms) / len(ms),
             "min": min(m.reduction for m in ms), "max": max(m.reduction for m in ms),
             "LRCs": sum(m.lrc for m in ms)} for typ, ms in by_type.items()]
    return (f"# {name}: spectra\n\n{len(spectra.targets)} target matrices, SVD in {spectra.seconds:.1f} s.\n\n"
            f"WeLore plan at the requested ratio: {plan.summary()}\n\n{markdown_table(rows)}\n")


def run_compress(source=None, output=None, config: CompressConfig | None = None, *, ratio: float | None = 0.5, target: str = "rank",
                 allocation: str = "welore", min_ratio: float | None = None, threshold: float | None = None,
                 method: str = "svd", alloc_spectrum: str = "weight", refit: bool = False,
                 calib_samples: int = 32, calib_seqlen: int = 512, calib_passes: int = 1, seed: int = 0,
                 targets=None, ignore=None, spectra_path=None, compare: bool = True, evaluate: bool = True,
                 corpus: str = "wikitext2", eval_tokens: int | None = 4096, seqlen: int = 512,
                 recipe: bool = False, recipe_samples: int = RECIPE_SAMPLES, new_tokens: int = 12,
                 device=None, dtype=None, overwrite: bool = False, progress: bool = True) -> CompressResult:
    """The main job (see module docstring). Returns the plan and the comparison rows.

    config: the compression settings; without it they are built from the keywords that follow
    (CompressConfig's fields), which document themselves here.

    method: a name in welore.factorize.METHODS: "svd" (WeLore's plain truncation), "asvd", "whiten",
    "whiten-fisher" (data-aware, from `calib_samples` x `calib_seqlen` tokens of the C4 training
    documents), or one registered at run time.
    allocation: a name in welore.allocate.RULES: "welore", "uniform", or "loss" (minimises the
    estimated loss increase; calibrated).
    alloc_spectrum: WeLore/uniform rules on the "weight" spectra (data-free) or the "data"-aware ones.
    refit: least-squares refit of each `up` factor on the calibration inputs.
    min_ratio: default 0.5 (the paper's) for welore/uniform, 0 for loss, which already weighs dense
    against factorised for every matrix.
    calib_passes: > 1 re-collects the statistics on the compressed model (each matrix then sees the
    inputs, and the loss gradients, of the compressed model it will live in), refactorises every
    matrix from its dense weight and re-plans. Costs one more calibration pass and a model copy each;
    on SmolLM2 (loss + whiten-fisher) 2 passes gave 58.1 -> 57.3 at 20% and 189 -> 154 at 40%.
    The uniform comparison row keeps the first pass's factors.
    recipe: with `compare`, add a row for the calibrated recipe (loss allocation + whiten-fisher,
    `recipe_samples` x `calib_seqlen` calibration tokens) at the parameter count this plan reached.
    new_tokens: length of each row's greedy continuation of `welore.generate.PROMPT` (0: none).
    """
    cfg = config or CompressConfig(ratio=ratio, target=target, allocation=allocation, min_ratio=min_ratio,
                         threshold=threshold, method=method, alloc_spectrum=alloc_spectrum, refit=refit,
                         calib_samples=calib_samples, calib_seqlen=calib_seqlen, calib_passes=calib_passes,
                         seed=seed, targets=targets, ignore=ignore)
    if spectra_path and cfg.rule.needs_tails and cfg.factorizer.is_weight_svd:
        raise WeloreError(f"the {cfg.allocation} allocation needs SVD factors, which --spectra files do not hold")
    if eval_tokens is not None and eval_tokens < seqlen:
        raise WeloreError(f"eval tokens ({eval_tokens}) must be at least seqlen ({seqlen})")
    check_output(output, overwrite)
    t0 = time.perf_counter()
    loaded = load_model(source, device=device, dtype=dtype)
    if loaded.meta is not None:
        raise WeloreError(f"{loaded.source} is already compressed; compress its base model instead")
    output = Path(output) if output else default_output(loaded.name, cfg.allocation, cfg.target, cfg.ratio,
                                                                     cfg.threshold)
    check_output(output, overwrite)
    model, tok = loaded.model, loaded.tokenizer
    if evaluate and tok is None:
        raise WeloreError("the model has no tokenizer, so it cannot be evaluated (use --no-eval)")
    load_s = time.perf_counter() - t0
    dense = copy.deepcopy(model) if evaluate and compare else None  # the baselines' starting point

    done = compress(model, tok, cfg, spectra=Spectra.load(spectra_path) if spectra_path else None,
                    progress=progress)
    plan, spectra = done.plan, done.spectra
    settings = {"source": loaded.source, "name": loaded.name, **cfg.to_dict(),
                "eval": {"corpus": corpus, "tokens": eval_tokens, "seqlen": seqlen, "prompt": PROMPT,
                         "new_tokens": new_tokens} if evaluate else None,
                "recipe_row": {"allocation": "loss", "method": "whiten-fisher", "samples": recipe_samples,
                               "seqlen": cfg.calib_seqlen, "seed": cfg.seed} if dense is not None and recipe else None}

    def write_spectra(tmp: Path) -> None:
        spectra.save(tmp / "spectra.safetensors")
        plot_spectra(spectra, tmp / "spectra.png", title=f"{loaded.name}: normalised singular values")
        plot_reduction_heatmap(plan, spectra, tmp / "reduction.png")

    # saved first: the comparison below only reads the compressed model and adds the report
    save_compressed(model, output, plan, tokenizer=tok, base_model=loaded.source, settings=settings,
                    overwrite=overwrite, extra=write_spectra)
    ppl = lambda m: perplexity(m, tok, corpus, seqlen=seqlen, max_tokens=eval_tokens, progress=progress)  # noqa: E731

    def row(label: str, p: RankPlan | None, m, seconds: float) -> dict:
        r = {"model": label,
             "eff. rank red.": f"{p.effective_rank_reduction:.1%}" if p else "0.0%",
             "param red. (targets)": f"{p.param_reduction:.1%}" if p else "0.0%",
             "params": count_parameters(m), "LRCs": len(p.lrcs) if p else 0, "compress s": seconds}
        if evaluate:
            r[f"{corpus} ppl"] = ppl(m).ppl
            if new_tokens:
                r["continuation"] = continuation(m, tok, max_new_tokens=new_tokens)
        return r

    ours = row(cfg.rule.label, plan, model, done.prep_seconds + done.apply_seconds)
    del model
    done.model = loaded.model = None  # only `dense` stays in memory for the baselines
    gc.collect()
    rows = [ours] if dense is None else _baseline_rows(dense, tok, cfg, done, ours, recipe, recipe_samples, row,
                                                       progress)
    result = CompressResult(output, plan, rows, settings)
    memory = {**process_memory(), "model_bytes": (output / "model.safetensors").stat().st_size}
    with atomic_file(output / "results.json") as f:
        f.write_text(json.dumps({"rows": rows, "load_seconds": load_s, "memory": memory}, indent=1))
    with atomic_file(output / "report.md") as f:
        f.write_text(f"# welore compress: {loaded.name}\n\n{plan.summary()}\n\n"
                     f"Settings: `{json.dumps(settings)}`\n\n{markdown_table(rows)}\n\n"
                     f"Memory: {', '.join(f'{k} {v:.2f}' for k, v in memory.items() if k.endswith('gib'))} "
                     f"(the whole job, comparison included); the compressed model takes "
                     f"{memory['model_bytes'] / 2**30:.2f} GiB on disk.\n\n"
                     f"{result.explain()}\n\n![spectra](spectra.png)\n\n![reduction](reduction.png)\n\n"
                     f"{_type_summary(spectra, plan, loaded.name).split(chr(10), 2)[2]}")
    return result


def _baseline_rows(dense, tok, cfg: CompressConfig, done: Compressed, ours: dict, recipe: bool,
                   recipe_samples: int, row, progress: bool) -> list[dict]:
    """The comparison's rows in order: dense, uniform (at the reduction our plan reached, measured as
    the user asked), ours, and the calibrated recipe. `dense` is used up: the uniform baseline is
    applied to it in place, last, so at most two models are in memory at any time."""
    plan = done.plan
    rows = [row("dense", None, dense, 0.0)]
    recipe_row = _recipe_row(dense, tok, done.targets, plan, recipe_samples, cfg.calib_seqlen, cfg.seed, row,
                             progress) if recipe else None
    reached = plan.param_reduction if cfg.uniform_target == "params" else plan.effective_rank_reduction
    uni_factors, uni_spectra, uni_stats = done.first_pass
    uni = allocate(uni_spectra, ratio=_open_ratio(reached), target=cfg.uniform_target, allocation="uniform")
    t = time.perf_counter()
    apply_plan(dense, uni, uni_factors, refit=uni_stats if cfg.refit else None, progress=progress)
    rows.append(row("uniform" if cfg.calib_passes == 1 else "uniform (1 pass)", uni, dense,
                    done.prep_seconds + time.perf_counter() - t))
    return rows + [ours] + ([recipe_row] if recipe_row is not None else [])


def _recipe_row(model, tok, target_list, plan: RankPlan, samples: int, seqlen: int, seed: int, row,
                progress: bool) -> dict:
    """The calibrated recipe (loss allocation + whiten-fisher) at `plan`'s parameter reduction, as a
    comparison row; `model` is the dense model and is left as it is."""
    t = time.perf_counter()
    stats = collect_stats(model, target_list, calibration_batches(tok, samples, seqlen, seed=seed),
                          gradients=True, progress=progress)
    factors = attach_loss_tails(model, analyze_data_aware(model, target_list, stats, "whiten-fisher",
                                                          progress=progress), stats, "whiten-fisher")
    recipe_plan = allocate(factors, ratio=_open_ratio(plan.param_reduction), target="params",
                           allocation="loss", min_ratio=0.0)
    compressed = apply_plan(copy.deepcopy(model), recipe_plan, factors, progress=progress)
    r = row(f"loss + whiten-fisher ({samples}x{seqlen} calib.)", recipe_plan, compressed, time.perf_counter() - t)
    del compressed, stats, factors
    gc.collect()
    return r


def _open_ratio(r: float) -> float:
    """A reached reduction as a search target, which must lie in (0, 1)."""
    return min(max(r, 1e-6), 1 - 1e-6)
