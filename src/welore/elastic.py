"""Elastic checkpoints: one directory that serves several budgets.

    welore compress --target params --budgets 0.1,0.2,0.3,0.4 -o out/     # one directory
    welore evaluate out/ --budget 0.3                                    # the 0.3 model, sliced at load
    load_compressed("out/", budget=0.3)
    AutoModelForCausalLM.from_pretrained("out/", trust_remote_code=True, welore_budget=0.3)

Raising the allocation level only drops singular values (WeLore's threshold, the uniform fraction and
the loss rule's price are all monotone), so the plans of larger reductions nest in smaller ones: an
LRC of one budget is an LRC of every larger budget at a rank no higher, and its factors there are a
prefix of the same factorisation (one SVD per matrix, of the scaled matrix for the whitened methods),
built component by component (`LowRankLinear.from_svd`), so a prefix is bit for bit what a separate
compression at that budget builds.

The directory is the model at the first (least-compressed) budget, which loads as is anywhere, plus
two things: every budget's plan (welore.json `budgets`, config.json `welore_budgets`), and, for a
matrix dense at the first budget but low-rank at a later one, its factors at the largest rank any
budget gives it (`<name>.elastic.down.weight` / `.up.weight`): both are kept, the dense matrix for the
budgets that keep it dense. Loading at a budget cuts every LRC to its rank there
(`welore.layers.apply_budget`).

What does not nest, refused in one line: a refit (each rank's least-squares `up` is its own fit),
several calibration passes (a pass's statistics come from the plan before it), and quantised
storage (--bits, --bits-per-weight: quantised factors do not slice; the bits rule trades ranks
against widths, not monotonically). A given threshold has one plan: --budgets replaces it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .allocate import RankPlan, allocate
from .errors import WeloreError
from .layers import LowRankLinear
from .spectrum import Spectra, svd_for
from .targets import module_kind, weight_matrix

PREFIX = "elastic"  # `<name>.elastic.down.weight`: a matrix's factors beside its dense weight


def key(budget: float) -> str:
    """How a budget names its plan in welore.json and config.json: 0.3 -> "0.3"."""
    return f"{float(budget):g}"


def parse_budgets(values: Iterable) -> list[float]:
    """[0.1, 0.2] from [0.1, 0.2], ["0.1,0.2"] or ["0.1", "0.2"] (the CLI's forms); one-line errors."""
    try:
        budgets = [float(x) for v in values for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise WeloreError(f"--budgets: expected numbers such as 0.1,0.2,0.3, got {' '.join(map(str, values))}") from None
    if not budgets:
        raise WeloreError("--budgets: give at least one budget")
    if any(b2 <= b1 for b1, b2 in zip(budgets, budgets[1:])):
        raise WeloreError(f"--budgets must increase, got {', '.join(map(key, budgets))}")
    return budgets


def check_elastic(cfg) -> None:
    """One-line errors for settings whose plans or factors do not nest (see the module doc)."""
    clash = ("--threshold" if cfg.threshold is not None else "--refit" if cfg.refit else
             "--calib-passes" if cfg.calib_passes > 1 else "--bits" if cfg.bits is not None else
             "--bits-per-weight" if cfg.bits_per_weight is not None else None)
    if clash:
        raise WeloreError(f"--budgets makes one checkpoint for several budgets, which {clash} does not allow "
                          "(its models do not nest)")


def check_nested(plans: dict[str, RankPlan]) -> None:
    """Each plan's LRCs are LRCs of every later plan, at a rank no higher (else the budgets do not nest)."""
    items = list(plans.items())
    for (k1, p1), (k2, p2) in zip(items, items[1:]):
        later = ranks(p2)
        for m in p1.lrcs:
            if later.get(m.name, m.alloc_rank + 1) > m.alloc_rank:
                there = f"rank {later[m.name]}" if m.name in later else "dense"
                raise WeloreError(f"the plans do not nest: {m.name} has rank {m.alloc_rank} at budget {k1} but is "
                                  f"{there} at {k2}")


def budget_plans(cfg, done) -> dict[str, RankPlan]:
    """Every budget's plan ({key: plan}), allocated from the spectra the compression `done` (a
    welore.compress.Compressed at the first budget) read, the first its own; checked to nest."""
    plans = {key(cfg.budgets[0]): done.plan}
    for b in cfg.budgets[1:]:
        plans[key(b)] = allocate(done.first_pass[1], ratio=b, target=cfg.target, allocation=cfg.allocation,
                                 min_ratio=cfg.min_ratio, costs=done.costs)
    check_nested(plans)
    return plans


def extra_factors(model: nn.Module, plans: dict[str, RankPlan], factors: Spectra | None) -> dict[str, torch.Tensor]:
    """For every matrix dense in the first plan and low-rank in a later one, its factors at the largest
    rank a plan gives it, built as `apply_plan` builds an LRC (`model` holds the dense matrix)."""
    first = {m.name for m in next(iter(plans.values())).lrcs}
    ranks: dict[str, int] = {}
    for plan in plans.values():
        for m in plan.lrcs:
            if m.name not in first:
                ranks[m.name] = max(ranks.get(m.name, 0), m.alloc_rank)
    out = {}
    for name, rank in ranks.items():
        w = weight_matrix(model.get_submodule(name)).detach()
        U, S, Vh = svd_for(w, rank, (factors.factors if factors is not None else {}).get(name))
        out.update(beside(name, LowRankLinear.from_svd(U, S, Vh, rank, None, dtype=w.dtype, device=w.device)))
    return out


def beside(name: str, lrc: LowRankLinear) -> dict[str, torch.Tensor]:
    """The tensors that store `lrc`'s factors beside the dense matrix `name`."""
    return {f"{name}.{PREFIX}.{f}.weight": getattr(lrc, f).weight.detach().contiguous() for f in ("down", "up")}


def ranks(plan: RankPlan) -> dict[str, int]:
    """{LRC name: rank} of `plan`: what a budget cuts the stored factors to."""
    return {m.name: m.alloc_rank for m in plan.lrcs}


def config_entry(plans: dict[str, RankPlan]) -> dict[str, dict[str, int]]:
    """config.json's `welore_budgets`: {budget: {LRC name: rank}}, what plain transformers slices by."""
    return {k: ranks(p) for k, p in plans.items()}


def split_extra(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(the first budget's tensors, {name: (down, up)} of the factors stored beside dense matrices)."""
    extra: dict[str, list] = {}
    plain = {}
    for k, v in state.items():
        name, sep, part = k.partition(f".{PREFIX}.")
        if sep:
            extra.setdefault(name, [None, None])[part != "down.weight"] = v
        else:
            plain[k] = v
    return plain, {n: (d, u) for n, (d, u) in extra.items()}


# ---------------------------------------------------------------------------------------------
# nested recovery: every budget trains at once


class NestedLinear(nn.Module):
    """One matrix of an elastic model in training: its factors (`lrc`, at the largest rank any budget
    gives it) used to the current budget's rank, or, where that budget keeps it dense, its frozen
    `dense` module (None where no budget does). Components beyond the rank get no gradient that step:
    nested dropout over the budgets' ranks, so each prefix learns to stand alone."""

    def __init__(self, lrc: LowRankLinear, dense: nn.Module | None = None):
        super().__init__()
        self.lrc, self.dense, self.rank = lrc, dense, lrc.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return self.dense(x)
        down, up = self.lrc.down.weight[: self.rank], self.lrc.up.weight[:, : self.rank]
        return F.linear(F.linear(x, down), up, self.lrc.up.bias)


class Nest:
    """An elastic model's matrices as NestedLinear, switched between budgets with `use(key)`."""

    def __init__(self, model: nn.Module, plans: dict[str, RankPlan], extra: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.plans = model, plans
        self.ranks = config_entry(plans)
        self.layers: dict[str, NestedLinear] = {}
        for name in {n for r in self.ranks.values() for n in r}:
            m = model.get_submodule(name)
            if isinstance(m, LowRankLinear):
                layer = NestedLinear(m)
            else:  # dense at the first budget: its own factors, stored beside it
                layer = NestedLinear(LowRankLinear.from_factors(*extra[name], getattr(m, "bias", None), module_kind(m)), m)
            model.set_submodule(name, layer)
            self.layers[name] = layer
        self.current = next(iter(plans))
        self.use(self.current)

    def use(self, key: str) -> None:
        for name, layer in self.layers.items():
            layer.rank = self.ranks[key].get(name)
        self.current = key

    def unnest(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model at its first budget again (factors at full stored rank), and the factors stored
        beside its dense matrices, as `save_compressed` writes an elastic directory."""
        extra = {}
        for name, layer in self.layers.items():
            if layer.dense is None:
                self.model.set_submodule(name, layer.lrc)
            else:
                self.model.set_submodule(name, layer.dense)
                extra.update(beside(name, layer.lrc))
        return self.model, extra


def budget_of_step(keys: list[str], seed: int, step: int) -> str:
    """The budget step `step` trains: uniform over `keys`, a pure function of (seed, step) so that a
    resumed run trains the budgets an uninterrupted one would."""
    return keys[random.Random(seed * 1_000_003 + step).randrange(len(keys))]


def nested_evaluation(nest: Nest, evaluate):
    """`evaluate(model, *args)` of every budget: each budget's scores under `budgets`, and for each
    perplexity their geometric mean (what the keep-the-best guard judges all budgets by)."""
    def run(model, *args, **kwargs) -> dict:
        was, per = nest.current, {}
        for k in nest.plans:
            nest.use(k)
            per[k] = evaluate(model, *args, **kwargs)
        nest.use(was)
        ppl = [m for m in per[was] if m.endswith("_ppl")]
        return {**{m: math.exp(sum(math.log(r[m]) for r in per.values()) / len(per)) for m in ppl}, "budgets": per}
    return run

