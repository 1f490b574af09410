"""The comparison rows of `welore compress`: what the plan buys against the dense model, against
uniform truncation at the same reduction, and against the calibrated recipe at the same parameter
count. Every row is one `compress()` call with its own `CompressConfig`; the uniform row reuses
the first pass's factors (`compress(..., reuse=)`), so it costs no second SVD or calibration.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from .allocate import RankPlan
from .compress import Compressed, compress
from .config import CompressConfig
from .evaluate import perplexity
from .generate import continuation
from .jobs import CompressJob
from .quantize import bits_report, quantize_model
from .quantizers import BITS
from .targets import count_parameters

Row = Callable[[str, RankPlan | None, nn.Module, float], dict]


def row_maker(tokenizer, job: CompressJob, timings: dict | None = None, bits: bool = False) -> Row:
    """`row(label, plan, model, seconds)`: one table row, evaluated as `job` says. `timings`, when
    given, collects each row's evaluation speed (seconds per token) by label; `bits`: a column of
    the bits each row stores per block weight (a quantised run)."""

    def row(label: str, plan: RankPlan | None, model: nn.Module, seconds: float) -> dict:
        r = {"model": label,
             "eff. rank red.": f"{plan.effective_rank_reduction:.1%}" if plan else "0.0%",
             "param red. (targets)": f"{plan.param_reduction:.1%}" if plan else "0.0%",
             "params": count_parameters(model), "LRCs": len(plan.lrcs) if plan else 0, "compress s": seconds}
        if bits:
            r["bits/weight"] = bits_report(model)["bits_per_weight"]
        if job.eval:
            res = perplexity(model, tokenizer, job.corpus, seqlen=job.seqlen, max_tokens=job.eval_tokens,
                             progress=job.progress)
            r[f"{job.corpus} ppl"] = res.ppl
            if timings is not None:
                timings[label] = res.seconds / max(res.tokens, 1)
            if job.new_tokens:
                r["continuation"] = continuation(model, tokenizer, prompt=job.prompt, max_new_tokens=job.new_tokens)
        return r

    return row


def uniform_config(cfg: CompressConfig, plan: RankPlan) -> CompressConfig:
    """Uniform truncation at the reduction `plan` reached, measured as the user asked (parameters for
    a parameter or latency target, else effective rank), with no cost model: the plain baseline."""
    reached = plan.param_reduction if cfg.uniform_target == "params" else plan.effective_rank_reduction
    return replace(cfg, allocation="uniform", ratio=_open_ratio(reached), target=cfg.uniform_target,
                   threshold=None, min_ratio=None, calib_passes=1, speed=False)


def recipe_config(cfg: CompressConfig, plan: RankPlan, samples: int) -> CompressConfig:
    """The calibrated recipe (loss allocation + whiten-fisher, `samples` calibration sequences) at
    the parameter reduction `plan` reached."""
    return CompressConfig(ratio=_open_ratio(plan.param_reduction), target="params", allocation="loss",
                          method="whiten-fisher", min_ratio=0.0, calib_samples=samples,
                          calib_seqlen=cfg.calib_seqlen, seed=cfg.seed, targets=cfg.targets, ignore=cfg.ignore,
                          bits=cfg.bits, group_size=cfg.group_size, quantizer=cfg.quantizer)


def comparison_rows(dense: nn.Module, tokenizer, done: Compressed, ours: dict, job: CompressJob, row: Row
                    ) -> list[dict]:
    """The rows in order: dense, uniform, ours, and the recipe (`job.recipe`, for a data-free run).
    `dense` is used up: the uniform plan is applied to it in place, last, so at most two models are
    in memory at any time."""
    rows = [row("dense", None, dense, 0.0)]
    if done.config.target == "bits":
        return rows + plain_rows(dense, done, row, job) + [ours]
    recipe = None
    if job.recipe and not done.config.calibrated:  # a calibrated run has no need to be shown calibration
        t = time.perf_counter()
        rc = recipe_config(done.config, done.plan, job.recipe_samples)
        res = compress(copy.deepcopy(dense), tokenizer, rc, spectra=done.spectra, progress=job.progress)
        recipe = row(f"loss + whiten-fisher ({rc.calib_samples}x{rc.calib_seqlen} calib.)", res.plan, res.model,
                     time.perf_counter() - t)
        del res
        gc.collect()
    uni = compress(dense, tokenizer, uniform_config(done.config, done.plan), reuse=done, progress=job.progress)
    label = "uniform" if done.config.calib_passes == 1 else "uniform (1 pass)"
    rows.append(row(label, uni.plan, dense, uni.prep_seconds + uni.apply_seconds))
    return rows + [ours] + ([recipe] if recipe is not None else [])


def plain_widths(done: Compressed) -> list[int]:
    """The two widths of plain quantisation around a bits-per-weight run's budget: the most bits
    under it (if any) and the fewest over it (if any), from the storage choices the rule read."""
    choices = done.first_pass[1].choices
    weights = sum(t.out_features * t.in_features for t in done.targets)

    def bpw(b: int) -> float:
        return 8 * sum(int(c["nbytes"][(c["bits"] == b) & (c["rank"] == min(t.shape))][0])
                       for t, c in ((t, choices[t.name]) for t in done.targets)) / weights

    fit = [b for b in BITS if bpw(b) <= done.config.bits_per_weight]
    over = [b for b in BITS if bpw(b) > done.config.bits_per_weight]
    return ([max(fit)] if fit else []) + ([min(over)] if over else [])


def plain_rows(dense: nn.Module, done: Compressed, row: Row, job: CompressJob) -> list[dict]:
    """Plain quantisation (the same quantiser and groups, no low rank; GPTQ on the same calibration) at
    `plain_widths`; `dense` is quantised in place for the last."""
    cfg, rows, widths = done.config, [], plain_widths(done)
    for i, b in enumerate(widths):
        model = dense if i == len(widths) - 1 else copy.deepcopy(dense)
        t = time.perf_counter()
        # a calibrated quantiser reads the dense model's own statistics: the first pass's
        quantize_model(model, b, cfg.group_size, cfg.quantizer, ignore=cfg.ignore, stats=done.first_pass[2],
                       progress=job.progress)
        rows.append(row(f"plain {cfg.quantizer} {b}-bit", None, model, time.perf_counter() - t))
        del model
    return rows


def _open_ratio(r: float) -> float:
    """A reached reduction as a search target, which must lie in (0, 1)."""
    return min(max(r, 1e-6), 1 - 1e-6)
