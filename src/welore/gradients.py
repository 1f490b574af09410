"""The gradient view: how low-rank weights emerge from low-rank gradients.

The paper's claim ("From GaLore to WeLore"): a matrix whose gradient keeps a stable low-rank subspace
through training accumulates updates in few directions and ends with a heavy-tailed, low-rank weight;
a matrix whose gradient saturates (high stable rank, drifting subspace) stays high-rank. This module
measures that on a real run:

* per target matrix, every `every` steps, on a fixed measurement batch: the gradient's top-k singular
  values, its stable rank ||G||_F^2 / ||G||_2^2, the overlap of its top-r left/right singular
  subspaces with the previous record's (mean squared cosine of the principal angles, 1 = same
  subspace, 0 = orthogonal), and the cosine between successive gradients;
* the weight spectrum at the start and the end, and the spectrum of the accumulated update
  W_end - W_start (the direct product of the gradients: the paper's mechanism is that low-rank,
  stable gradients add up to a low-rank update);
* per matrix, the WeLore reduction ratio of the final weight and the low-rankness of the update,
  and the Spearman correlation between gradient low-rankness / stability and each, overall, per
  matrix type and per layer. In a short run the final weight is mostly the starting weight (the
  pretrained one, or a random one whose spectrum is set by its shape), so the update is where a
  short run can show the mechanism; the final weight is where a long run shows its outcome.

Cheap by default (randomized SVD via `torch.svd_lowrank`, a record every N steps); `exact=True`
computes full SVDs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .allocate import allocate, check_allocation_args
from .data import encode_corpus, random_windows
from .errors import WeloreError
from .io import atomic_dir, check_output
from .models import load_model
from .progress import bar
from .report import _plt, _save, markdown_table
from .spectrum import Spectra
from .targets import Target, find_targets, weight_matrix

PRESETS = {
    # LLaMA configs that pretrain on a laptop CPU in minutes (the tokenizer's vocabulary sets the
    # embedding size; the blocks are what is measured)
    "llama-tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4),
    "llama-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4),
}


# ---------------------------------------------------------------------------------------------
# measures


def stable_rank(g: torch.Tensor, top: float | None = None) -> float:
    """||G||_F^2 / ||G||_2^2: 1 for a rank-1 matrix, min(m, n) for an orthogonal one."""
    fro2 = g.double().pow(2).sum().item()
    if top is None:
        top = torch.linalg.matrix_norm(g.double(), ord=2).item()
    return fro2 / top**2 if top > 0 else 0.0


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of orthonormal `a`, `b`:
    ||a^T b||_F^2 / r. 1 for the same subspace, 0 for orthogonal ones."""
    r = min(a.shape[1], b.shape[1])
    return (a.double().T @ b.double()).pow(2).sum().item() / r if r else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    d = a.norm() * b.norm()
    return (a @ b).item() / d.item() if d > 0 else 0.0


def top_svd(g: torch.Tensor, k: int, exact: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading k singular triplets: randomized (4 oversampling columns, 2 power iterations) or exact."""
    g = g.float()
    k = min(k, *g.shape)
    if exact or k + 4 >= min(g.shape):
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    torch.manual_seed(seed)  # svd_lowrank draws a random test matrix
    U, S, V = torch.svd_lowrank(g, q=k + 4, niter=2)
    return U[:, :k], S[:k], V[:, :k]


def spearman(x, y) -> float:
    """Spearman rank correlation (scipy's; average ranks for ties), leaving out pairs with a NaN;
    NaN when fewer than 3 pairs remain or either side is constant."""
    from scipy.stats import spearmanr  # scipy is heavy and only the report needs it

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------------
# recording


@dataclass
class GradientRecord:
    targets: list[Target]
    steps: list[int] = field(default_factory=list)
    series: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> metric -> values per record
    weight_spectra: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {"start", "end"}
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"targets": [[t.name, t.kind, t.out_features, t.in_features] for t in self.targets],
                "steps": self.steps, "series": self.series, "weight_spectra": self.weight_spectra,
                "losses": self.losses, "info": self.info}


def record_gradients(model: nn.Module, train_batches, measure_batch: dict, *, steps: int, every: int,
                     lr: float = 1e-4, top_k: int = 8, rank: int = 4, exact: bool = False,
                     targets: list[Target] | None = None, progress: bool = True) -> GradientRecord:
    """Train `model` for `steps` AdamW steps on `train_batches(step)` and record gradient statistics of
    every target on the fixed `measure_batch` every `every` steps (and at step 0)."""
    if steps <= 0:
        raise WeloreError(f"steps must be > 0, got {steps}")
    if every <= 0 or every > steps:
        raise WeloreError(f"the sampling interval must be in [1, steps={steps}], got {every}")
    if not 1 <= rank <= top_k:
        raise WeloreError(f"rank must be in [1, top_k={top_k}], got {rank}")
    targets = targets if targets is not None else find_targets(model)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    rec = GradientRecord(targets, info={"steps": steps, "every": every, "lr": lr, "top_k": top_k, "rank": rank,
                                        "exact": exact})
    rec.series = {t.name: {"stable_rank": [], "top_sv": [], "overlap_left": [], "overlap_right": [],
                           "cosine_prev": [], "cosine_first": [], "grad_norm": []} for t in targets}
    rec.weight_spectra = {t.name: {"start": _svdvals(modules[t.name])} for t in targets}
    # a CPU copy of the starting weights, for the spectrum of the accumulated update at the end
    start = {t.name: weight_matrix(modules[t.name]).detach().float().cpu().clone() for t in targets}
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    prev: dict[str, tuple] = {}
    first: dict[str, torch.Tensor] = {}
    measure = {k: v.to(device) for k, v in measure_batch.items()}
    t_measure, t_train = 0.0, 0.0

    def measure_now(step: int) -> None:
        model.zero_grad(set_to_none=True)
        model(**measure, use_cache=False).loss.backward()
        rec.steps.append(step)
        for t in targets:
            w = modules[t.name].weight  # gradients live on the stored parameter; Conv1D stores W^T
            g = (w.grad.T if t.kind == "conv1d" else w.grad).detach().float()
            U, S, V = top_svd(g, top_k, exact, seed=step)
            s = rec.series[t.name]
            s["top_sv"].append(S.tolist())
            s["stable_rank"].append(stable_rank(g, S[0].item() if len(S) else None))
            s["grad_norm"].append(g.norm().item())
            if t.name in prev:
                pu, pv, pg = prev[t.name]
                s["overlap_left"].append(subspace_overlap(pu, U[:, :rank]))
                s["overlap_right"].append(subspace_overlap(pv, V[:, :rank]))
                s["cosine_prev"].append(cosine(pg, g))
            else:
                first[t.name] = g.clone()
            s["cosine_first"].append(cosine(first[t.name], g))
            prev[t.name] = (U[:, :rank].clone(), V[:, :rank].clone(), g.clone())
        model.zero_grad(set_to_none=True)

    model.train()
    pbar = bar(range(steps), desc="Training with gradient records", unit="step", progress=progress)
    t0 = time.perf_counter()
    measure_now(0)
    t_measure += time.perf_counter() - t0
    tokens = 0
    for step in pbar:
        batch = {k: v.to(device) for k, v in train_batches(step).items()}
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        rec.losses.append(loss.item())
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % every == 0:
            t0 = time.perf_counter()
            measure_now(step + 1)
            t_measure += time.perf_counter() - t0
    for t in targets:
        rec.weight_spectra[t.name]["end"] = _svdvals(modules[t.name])
        update = weight_matrix(modules[t.name]).detach().float().cpu() - start.pop(t.name)
        rec.weight_spectra[t.name]["update"] = torch.linalg.svdvals(update).tolist()
    rec.info.update(train_seconds=t_train, record_seconds=t_measure, train_tokens=tokens,
                    tokens_per_s_training=tokens / t_train if t_train else None,
                    tokens_per_s_with_records=tokens / (t_train + t_measure) if t_train else None)
    model.eval()
    return rec


def _svdvals(module: nn.Module) -> list[float]:
    return torch.linalg.svdvals(weight_matrix(module).detach().float()).tolist()


# ---------------------------------------------------------------------------------------------
# analysis


def matrix_summary(rec: GradientRecord, ratio: float = 0.5) -> list[dict]:
    """Per matrix: gradient low-rankness and stability, and the WeLore reduction ratio of the final
    weight under the threshold that reduces the final model by `ratio` (min_ratio 0: every matrix's
    own reduction, not whether it would become an LRC)."""

    spectra = Spectra(rec.targets, {t.name: torch.tensor(rec.weight_spectra[t.name]["end"]) for t in rec.targets},
                      {t.name: "" for t in rec.targets})
    plan = allocate(spectra, ratio=ratio, min_ratio=0.0)
    out = []
    for t, m in zip(rec.targets, plan.matrices):
        s = rec.series[t.name]
        later = s["stable_rank"][1:] or s["stable_rank"]
        overlaps = [(a + b) / 2 for a, b in zip(s["overlap_left"], s["overlap_right"])]
        upd = np.asarray(rec.weight_spectra[t.name].get("update", []), dtype=np.float64)
        upd_sr = float((upd ** 2).sum() / upd[0] ** 2) if len(upd) and upd[0] > 0 else float("nan")
        out.append({"name": t.name, "type": t.type, "layer": t.layer, "min_dim": min(t.shape),
                    "grad_stable_rank": float(np.mean(later)),
                    "grad_stable_rank_rel": float(np.mean(later)) / min(t.shape),
                    "grad_subspace_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
                    "grad_cosine_prev": float(np.mean(s["cosine_prev"])) if s["cosine_prev"] else float("nan"),
                    "update_stable_rank_rel": upd_sr / min(t.shape),
                    "weight_reduction": m.reduction})
    return out


def correlations(summary: list[dict]) -> dict:
    """Spearman correlation of gradient low-rankness (low relative stable rank) and stability
    (subspace overlap) with the final weight's WeLore reduction and with the low-rankness of the
    accumulated update (low relative stable rank of W_end - W_start): overall, by type, by layer."""
    def corr(rows):
        red = [r["weight_reduction"] for r in rows]
        upd = [-r["update_stable_rank_rel"] for r in rows]
        low, stab = [-r["grad_stable_rank_rel"] for r in rows], [r["grad_subspace_overlap"] for r in rows]
        return {"n": len(rows),
                "lowrank_vs_reduction": spearman(low, red), "stability_vs_reduction": spearman(stab, red),
                "lowrank_vs_update": spearman(low, upd), "stability_vs_update": spearman(stab, upd)}

    out = {"overall": corr(summary), "by_type": {}, "by_layer": {}}
    for key, field_ in (("by_type", "type"), ("by_layer", "layer")):
        groups: dict = {}
        for r in summary:
            groups.setdefault(r[field_], []).append(r)
        out[key] = {str(k): corr(v) for k, v in groups.items()}
    return out


# ---------------------------------------------------------------------------------------------
# pictures and report


def plot_all(rec: GradientRecord, summary: list[dict], corr: dict, out: Path, title: str) -> list[Path]:
    plt = _plt()
    types = list(dict.fromkeys(t.type for t in rec.targets))
    paths = []
    for metric, ylabel, fname, x0 in (("stable_rank", "gradient stable rank (mean over layers)", "grad_stable_rank.png", 0),
                                      ("overlap", "top-r subspace overlap with previous record", "grad_overlap.png", 1)):
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        for i, typ in enumerate(types):
            names = [t.name for t in rec.targets if t.type == typ]
            if metric == "stable_rank":
                ys = np.mean([rec.series[n]["stable_rank"] for n in names], axis=0)
            else:
                ys = np.mean([[(a + b) / 2 for a, b in zip(rec.series[n]["overlap_left"], rec.series[n]["overlap_right"])]
                              for n in names], axis=0)
            ax.plot(rec.steps[x0:], ys, marker=".", color=f"C{i}", label=typ)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        if metric == "stable_rank":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        paths.append(_save(fig, out / fname))

    fig, axes = plt.subplots(1, len(types), figsize=(3 * len(types), 3), squeeze=False, layout="constrained")
    for ax, typ in zip(axes[0], types):
        for t in [t for t in rec.targets if t.type == typ]:
            for when, style in (("start", ":"), ("end", "-")):
                s = np.array(rec.weight_spectra[t.name][when])
                ax.plot(np.linspace(0, 1, len(s)), s / s.max(), ls=style, lw=0.7,
                        color="tab:gray" if when == "start" else "tab:red", alpha=0.6)
        ax.set_yscale("log")
        ax.set_title(typ, fontsize=8)
        ax.grid(alpha=0.3)
    fig.supxlabel("singular value index / rank")
    fig.supylabel("singular value / largest (dotted: start, solid: end)")
    paths.append(_save(fig, out / "weight_spectra.png"))

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), layout="constrained")
    xs = (("grad_stable_rank_rel", "gradient stable rank / min(m, n)", "lowrank"),
          ("grad_subspace_overlap", "gradient subspace overlap (stability)", "stability"))
    ys = (("weight_reduction", "WeLore reduction ratio of the final weight", "reduction"),
          ("update_stable_rank_rel", "stable rank of W_end - W_start / min(m, n)", "update"))
    for row, (ykey, ylabel, ycorr) in enumerate(ys):
        for col, (xkey, xlabel, xcorr) in enumerate(xs):
            ax = axes[row, col]
            for i, typ in enumerate(types):
                rows = [r for r in summary if r["type"] == typ]
                ax.scatter([r[xkey] for r in rows], [r[ykey] for r in rows], s=14, color=f"C{i}", label=typ)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.set_title(f"Spearman {corr['overall'][f'{xcorr}_vs_{ycorr}']:+.2f} (n={corr['overall']['n']})",
                         fontsize=9)
            if col == 0:
                ax.set_xscale("log")
            if ykey == "update_stable_rank_rel":
                ax.set_yscale("log")
    axes[0, 1].legend(fontsize=7)
    paths.append(_save(fig, out / "grad_vs_reduction.png"))
    return paths


def write_report(rec: GradientRecord, out: str | Path, title: str, ratio: float = 0.5) -> dict:
    """JSON of every series, the PNGs, and report.md putting them together. Returns the correlations."""

    out = Path(out)
    summary = matrix_summary(rec, ratio)
    corr = correlations(summary)
    (out / "gradients.json").write_text(json.dumps({"record": rec.to_dict(), "summary": summary,
                                                    "correlations": corr}, indent=1))
    plot_all(rec, summary, corr, out, title)
    def mean(key, typ):
        return float(np.nanmean([r[key] for r in summary if r["type"] == typ]))

    by_type = [{"matrix type": k, "n": v["n"], "low-rank grad vs reduction": v["lowrank_vs_reduction"],
                "stable grad vs reduction": v["stability_vs_reduction"],
                "low-rank grad vs low-rank update": v["lowrank_vs_update"],
                "stable grad vs low-rank update": v["stability_vs_update"],
                "grad stable rank": mean("grad_stable_rank", k), "grad overlap": mean("grad_subspace_overlap", k),
                "update stable rank / min dim": mean("update_stable_rank_rel", k),
                "weight reduction": mean("weight_reduction", k)}
               for k, v in corr["by_type"].items()]
    o, i = corr["overall"], rec.info
    overhead = (f"training {i['tokens_per_s_training']:.0f} tokens/s without records, "
                f"{i['tokens_per_s_with_records']:.0f} tokens/s with them "
                f"({i['record_seconds']:.1f} s of records in {i['train_seconds'] + i['record_seconds']:.1f} s)")
    md = (f"# welore gradients: {title}\n\n{i['steps']} steps, a record every {i['every']} "
          f"({'exact' if i['exact'] else 'randomized'} SVD, top-{i['top_k']}, subspaces of rank {i['rank']}); "
          f"loss {rec.losses[0]:.3f} -> {rec.losses[-1]:.3f}; {overhead}.\n\n"
          f"Spearman correlation across {o['n']} matrices with the final weight's WeLore reduction ratio "
          f"(threshold at {ratio:.0%} effective rank reduction): gradient low-rankness (negative relative stable "
          f"rank) **{o['lowrank_vs_reduction']:+.3f}**, gradient subspace stability **{o['stability_vs_reduction']:+.3f}**. "
          f"With the low-rankness of the accumulated update W_end - W_start (negative relative stable rank): "
          f"gradient low-rankness **{o['lowrank_vs_update']:+.3f}**, stability **{o['stability_vs_update']:+.3f}**."
          f"\n\nPer matrix type (Spearman within the type, then means):\n\n{markdown_table(by_type)}\n\n![stable rank](grad_stable_rank.png)\n\n![overlap](grad_overlap.png)\n\n"
          f"![weight spectra](weight_spectra.png)\n\n![scatter](grad_vs_reduction.png)\n")
    (out / "report.md").write_text(md)
    return corr


def pretrain_model(preset: str, vocab_size: int, seed: int = 0) -> nn.Module:
    """A randomly initialised LLaMA of a preset size (for watching low-rank weights emerge)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if preset not in PRESETS:
        raise WeloreError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=True,
                      **PRESETS[preset])
    return AutoModelForCausalLM.from_config(cfg)


def text_batches(tokenizer, seqlen: int, batch_size: int, corpus: str = "c4-train", seed: int = 0):
    """(batch_for_step, fixed measurement batch): random windows of the corpus; the measurement batch
    is drawn apart from the training stream (a different generator)."""
    ids = encode_corpus(tokenizer, corpus)
    n = ids.numel() - seqlen - 1
    if n <= 0:
        raise WeloreError(f"{corpus} is shorter than one sequence of {seqlen} tokens")

    def take(gen) -> dict:
        x = random_windows(ids, batch_size, seqlen, gen, high=n)
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    measure = take(torch.Generator().manual_seed(10_000 + seed))
    return (lambda step: take(torch.Generator().manual_seed(seed * 1_000_003 + step))), measure



def run_gradients(source=None, output=None, *, preset: str | None = None, steps: int | None = None, every: int = 10,
                  lr: float | None = None, batch_size: int = 8, seqlen: int = 128, top_k: int = 8, rank: int = 4,
                  exact: bool = False, ratio: float = 0.5, seed: int = 0, targets=None, ignore=None, device=None,
                  overwrite: bool = False, progress: bool = True) -> tuple[Path, dict, GradientRecord]:
    """`welore gradients`: fine-tune `source` (default: the embedded model) or, with `preset`, pretrain a
    fresh LLaMA of that size (tokenizer from `source`), recording gradients; write the report."""

    check_allocation_args(ratio=ratio)
    if preset is not None and preset not in PRESETS:
        raise WeloreError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    steps = steps if steps is not None else (300 if preset else 40)
    lr = lr if lr is not None else (1e-3 if preset else 1e-4)
    if steps <= 0:
        raise WeloreError(f"steps must be > 0, got {steps}")
    if every <= 0 or every > steps:
        raise WeloreError(f"the sampling interval must be in [1, steps={steps}], got {every}")
    check_output(output, overwrite)
    loaded = load_model(source, device=device)
    if loaded.tokenizer is None:
        raise WeloreError("recording gradients on text needs a tokenizer, and this model has none")
    if preset:
        model = pretrain_model(preset, vocab_size=len(loaded.tokenizer), seed=seed).to(loaded.model.device)
        title = f"{preset} pretrained from scratch ({sum(p.numel() for p in model.parameters()):,} params)"
        name = preset
    else:
        model, title, name = loaded.model, f"{loaded.name} fine-tuned", loaded.name
    target_list = find_targets(model, targets, ignore)
    batches, measure = text_batches(loaded.tokenizer, seqlen, batch_size, seed=seed)
    output = Path(output) if output else Path("gradients") / name
    with atomic_dir(output, overwrite) as tmp:
        rec = record_gradients(model, batches, measure, steps=steps, every=every, lr=lr, top_k=top_k, rank=rank,
                               exact=exact, targets=target_list, progress=progress)
        rec.info.update(source=loaded.source, preset=preset, batch_size=batch_size, seqlen=seqlen, seed=seed,
                        corpus="c4-train")
        corr = write_report(rec, tmp, title, ratio)
    return output, corr, rec
