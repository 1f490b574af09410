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

from .allocate import RULES, RankPlan, allocate, check_allocation_args
from .calibrate import calibration_batches, collect_stats
from .compress import apply_plan, count_parameters
from .errors import WeloreError
from .evaluate import perplexity
from .factorize import analyze_data_aware, attach_loss_tails, get_method
from .generate import PROMPT, continuation
from .io import atomic_dir, check_output, save_compressed
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

    def explain(self) -> str:
        """What the table's columns mean and what to try next (printed under the table)."""
        ev = self.settings.get("eval") or {}
        lines = []
        if ev:
            lines.append(f"{ev['corpus']} ppl: perplexity on the first {ev['tokens']:,} tokens of {ev['corpus']} "
                         f"(lower is better; dense is the uncompressed model). continuation: greedy, "
                         f"{ev.get('new_tokens', 12)} tokens after {PROMPT!r}.")
        ratio = self.plan.param_reduction
        lines += ["", "Next:",
                  f"  better quality at this size (calibrated, ~2 min): welore compress --param-ratio {ratio:.3f} "
                  "--allocation loss --method whiten-fisher",
                  f"  recover quality by training only the low-rank factors: welore finetune {self.output} "
                  f"-o {self.output}-ft --train lrc --data c4 --steps 200",
                  f"  read what it writes: welore generate {self.output} \"Tell me about Paris.\""]
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


def run_compress(source=None, output=None, *, ratio: float | None = 0.5, target: str = "rank",
                 allocation: str = "welore", min_ratio: float | None = None, threshold: float | None = None,
                 method: str = "svd", alloc_spectrum: str = "weight", refit: bool = False,
                 calib_samples: int = 32, calib_seqlen: int = 512, calib_passes: int = 1, seed: int = 0,
                 targets=None, ignore=None, spectra_path=None, compare: bool = True, evaluate: bool = True,
                 corpus: str = "wikitext2", eval_tokens: int | None = 4096, seqlen: int = 512,
                 recipe: bool = False, recipe_samples: int = RECIPE_SAMPLES, new_tokens: int = 12,
                 device=None, dtype=None, overwrite: bool = False, progress: bool = True) -> CompressResult:
    """The main job (see module docstring). Returns the plan and the comparison rows.

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
    if min_ratio is None:
        min_ratio = RULES[allocation].default_min_ratio if allocation in RULES else 0.5
    check_allocation_args(ratio=ratio, target=target, allocation=allocation, min_ratio=min_ratio, threshold=threshold)
    rule = RULES[allocation]
    fac = get_method(method)
    if alloc_spectrum not in ("weight", "data"):
        raise WeloreError(f"unknown allocation spectrum {alloc_spectrum!r}; choose weight or data")
    calibrated = fac.needs_stats or refit or rule.needs_tails
    gradients = fac.needs_gradients or rule.needs_tails  # loss-gradient statistics
    if calibrated and calib_samples <= 0:
        what = method if fac.needs_stats else (f"the {allocation} allocation" if rule.needs_tails else "refit")
        raise WeloreError(f"{what} needs calibration data (calib samples > 0)")
    if not (isinstance(calib_passes, int) and calib_passes >= 1):
        raise WeloreError(f"calibration passes must be a positive integer, got {calib_passes}")
    if calib_passes > 1 and not calibrated:
        raise WeloreError("more than one calibration pass needs a calibrated method, refit or the loss allocation")
    if spectra_path and rule.needs_tails and fac.is_weight_svd:
        raise WeloreError(f"the {allocation} allocation needs SVD factors, which --spectra files do not hold")
    if eval_tokens is not None and eval_tokens < seqlen:
        raise WeloreError(f"eval tokens ({eval_tokens}) must be at least seqlen ({seqlen})")
    check_output(output, overwrite)
    t0 = time.perf_counter()
    loaded = load_model(source, device=device, dtype=dtype)
    if loaded.meta is not None:
        raise WeloreError(f"{loaded.source} is already compressed; compress its base model instead")
    output = Path(output) if output else default_output(loaded.name, allocation, target, ratio, threshold)
    check_output(output, overwrite)
    model, tok = loaded.model, loaded.tokenizer
    if evaluate and tok is None:
        raise WeloreError("the model has no tokenizer, so it cannot be evaluated (use --no-eval)")
    load_s = time.perf_counter() - t0

    t = time.perf_counter()
    stats = None
    if spectra_path:
        spectra = Spectra.load(spectra_path)  # weight spectra, values only
        spectra.check_matches(model)
        target_list = spectra.targets
    else:
        target_list = find_targets(model, targets, ignore)
        spectra = analyze(model, target_list, keep_factors=fac.is_weight_svd, progress=progress)

    def plan_from(stats) -> tuple[Spectra, Spectra, RankPlan]:
        """(factors apply_plan uses, spectra the rule reads, plan) for these statistics."""
        factors = spectra if fac.is_weight_svd else analyze_data_aware(model, target_list, stats, method,
                                                                     progress=progress)
        alloc_spectra = factors if alloc_spectrum == "data" else spectra
        if rule.needs_tails:
            alloc_spectra = attach_loss_tails(model, factors, stats, method)
        return factors, alloc_spectra, allocate(alloc_spectra, ratio=ratio, target=target, allocation=allocation,
                                                min_ratio=min_ratio, threshold=threshold)

    if calibrated:
        if tok is None:
            raise WeloreError("calibration needs a tokenizer, and this model has none")
        batches = calibration_batches(tok, calib_samples, calib_seqlen, seed=seed)
        stats = collect_stats(model, target_list, batches, gradients=gradients, progress=progress)
    factors, alloc_spectra, plan = plan_from(stats)
    first_pass = factors, alloc_spectra, stats  # what the uniform comparison row uses
    for _ in range(calib_passes - 1):
        compressed = apply_plan(copy.deepcopy(model), plan, factors, refit=stats if refit else None, progress=progress)
        stats = collect_stats(compressed, target_list, batches, gradients=gradients, progress=progress)
        del compressed
        gc.collect()
        factors, alloc_spectra, plan = plan_from(stats)
    prep_s = time.perf_counter() - t  # analysis + calibration, shared by every variant
    ppl = lambda m: perplexity(m, tok, corpus, seqlen=seqlen, max_tokens=eval_tokens, progress=progress)  # noqa: E731

    rows = []

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

    recipe_row = None
    if evaluate and compare:
        rows.append(row("dense", None, model, 0.0))
        # uniform baseline at the reduction the plan actually reached, measured as the user asked:
        # parameters for a parameter target, effective rank otherwise
        reached = plan.param_reduction if target == "params" and threshold is None else plan.effective_rank_reduction
        uni_factors, uni_spectra, uni_stats = first_pass
        uni = allocate(uni_spectra, ratio=_open_ratio(reached),
                       target="params" if target == "params" and threshold is None else "rank",
                       allocation="uniform")
        t = time.perf_counter()
        baseline = apply_plan(copy.deepcopy(model), uni, uni_factors, refit=uni_stats if refit else None,
                              progress=progress)
        uni_s = prep_s + time.perf_counter() - t
        rows.append(row("uniform" if calib_passes == 1 else "uniform (1 pass)", uni, baseline, uni_s))
        del baseline
        gc.collect()
        if recipe:
            recipe_row = _recipe_row(model, tok, target_list, plan, recipe_samples, calib_seqlen, seed, row,
                                     progress)
    t = time.perf_counter()
    apply_plan(model, plan, factors, refit=stats if refit else None, progress=progress)
    compress_s = prep_s + time.perf_counter() - t
    rows.append(row(rule.label, plan, model, compress_s))
    if recipe_row is not None:
        rows.append(recipe_row)

    settings = {"source": loaded.source, "name": loaded.name, "ratio": ratio, "target": target,
                "allocation": allocation, "min_ratio": min_ratio, "threshold": threshold, "method": method,
                "alloc_spectrum": alloc_spectrum, "refit": refit,
                "calibration": {"corpus": "c4-train", "samples": calib_samples, "seqlen": calib_seqlen, "seed": seed,
                                "loss_gradients": gradients, "passes": calib_passes}
                if stats is not None else None,
                "targets": targets, "ignore": ignore,
                "eval": {"corpus": corpus, "tokens": eval_tokens, "seqlen": seqlen, "prompt": PROMPT,
                         "new_tokens": new_tokens} if evaluate else None,
                "recipe_row": {"allocation": "loss", "method": "whiten-fisher", "samples": recipe_samples,
                               "seqlen": calib_seqlen, "seed": seed} if recipe_row is not None else None}
    result = CompressResult(output, plan, rows, settings)

    def write_report(tmp: Path) -> None:
        spectra.save(tmp / "spectra.safetensors")
        plot_spectra(spectra, tmp / "spectra.png", title=f"{loaded.name}: normalised singular values")
        plot_reduction_heatmap(plan, spectra, tmp / "reduction.png")
        (tmp / "results.json").write_text(json.dumps({"rows": rows, "load_seconds": load_s}, indent=1))
        (tmp / "report.md").write_text(
            f"# welore compress: {loaded.name}\n\n{plan.summary()}\n\n"
            f"Settings: `{json.dumps(settings)}`\n\n{markdown_table(rows)}\n\n"
            f"{result.explain()}\n\n![spectra](spectra.png)\n\n![reduction](reduction.png)\n\n"
            f"{_type_summary(spectra, plan, loaded.name).split(chr(10), 2)[2]}")

    save_compressed(model, output, plan, tokenizer=tok, base_model=loaded.source, settings=settings,
                    overwrite=overwrite, extra=write_report)
    return result


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
