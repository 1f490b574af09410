"""Pictures and tables: spectra per matrix type, the layer x type reduction heatmap, markdown."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .allocate import RankPlan, normalized_spectrum
from .spectrum import Spectra


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(spectra: Spectra, path: str | Path, title: str = "") -> Path:
    """Normalised singular values vs normalised index, one panel per matrix type, one line per layer
    (colour = depth). Heavy tails show as curves that collapse early."""
    plt = _plt()
    by_type: dict[str, list] = defaultdict(list)
    for t in spectra.targets:
        by_type[t.type].append(t)
    types = list(by_type)
    cols = min(4, len(types))
    rows = (len(types) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    layers = [t.layer for t in spectra.targets if t.layer is not None]
    top = max(layers) if layers else 1
    cmap = plt.get_cmap("viridis")
    for ax, typ in zip(axes.flat, types):
        for t in by_type[typ]:
            s = normalized_spectrum(spectra.values[t.name].numpy())
            x = np.linspace(0, 1, len(s))
            ax.plot(x, np.maximum(s, 1e-4), color=cmap((t.layer or 0) / max(top, 1)), lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{typ}  ({by_type[typ][0].out_features}x{by_type[typ][0].in_features})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="layer", shrink=0.8)
    fig.supxlabel("singular value index / rank")
    fig.supylabel("min-max normalised singular value")
    fig.suptitle(title or "Normalised singular value spectra per matrix type")
    return _save(fig, path)


def plot_reduction_heatmap(plan: RankPlan, spectra: Spectra, path: str | Path, title: str = "") -> Path:
    """Layer x matrix type heatmap of each matrix's rank reduction under `plan` (x = N-LRC, kept dense)."""
    plt = _plt()
    tgt = {t.name: t for t in spectra.targets}
    types = list(dict.fromkeys(tgt[m.name].type for m in plan.matrices))
    layers = sorted({tgt[m.name].layer for m in plan.matrices if tgt[m.name].layer is not None})
    grid = np.full((len(layers), len(types)), np.nan)
    lrc = np.zeros_like(grid, dtype=bool)
    for m in plan.matrices:
        t = tgt[m.name]
        if t.layer is None:
            continue
        i, j = layers.index(t.layer), types.index(t.type)
        grid[i, j], lrc[i, j] = m.reduction, m.lrc
    fig, ax = plt.subplots(figsize=(1.3 * len(types) + 2.5, 0.22 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    for i, j in zip(*np.where(~lrc & ~np.isnan(grid))):
        ax.text(j, i, "x", ha="center", va="center", fontsize=7, color="tab:blue")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="rank reduction ratio")
    ax.set_title(title or f"{plan.summary()}\n(x = N-LRC, kept dense)", fontsize=8)
    return _save(fig, path)


def plot_loss_curves(logs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Training loss per step, one line per run (raw, faint) with a moving average (solid)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for i, (label, log) in enumerate(logs.items()):
        steps = np.array([e["step"] for e in log])
        loss = np.array([e["loss"] for e in log])
        color = f"C{i}"
        ax.plot(steps, loss, color=color, alpha=0.25, lw=0.8)
        w = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "training loss")
    return _save(fig, path)


def plot_gradients(rec, summary: list[dict], corr: dict, out: Path, title: str) -> list[Path]:
    """welore gradients' four PNGs from a `GradientRecord`, its per-matrix summary and correlations:
    gradient stable rank and subspace overlap over training per matrix type, the weight spectra at the
    start and end, and the gradient measures against the WeLore reduction and the update's rank."""
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




def gradients_markdown(rec, summary: list[dict], corr: dict, title: str, ratio: float) -> str:
    """welore gradients' report.md: the run, the overall correlations, a table per matrix type, the PNGs."""
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
    return md


def returned_eval(evals: list[dict], step: int) -> dict:
    """The evaluation of the weights a fine-tuning run returned (`step`: its metrics' returned_step):
    the last step's, or with the keep-the-best guard perhaps an earlier one."""
    return next(e for e in reversed(evals) if e["step"] == step)


def finetune_row(mode: str, rec: dict) -> dict:
    """One row of `welore compare`'s table from a run's finetune.json: before training, and the
    weights the run returned."""
    met, first = rec["metrics"], rec["evals"][0]
    last = returned_eval(rec["evals"], met.get("returned_step", rec["evals"][-1]["step"]))
    row = {"mode": mode, "trainable params": met["trainable_params"],
           "trainable %": 100 * met["trainable_params"] / met["total_params"],
           "peak memory GiB": met["peak_memory_gib"], "tokens/s": met["tokens_per_s"],
           "train s": met["train_seconds"], "final loss": rec["log"][-1]["loss"]}
    for k in last:
        if k not in ("step", "ci95", "correct", "examples"):
            row[f"{k} before"], row[f"{k} after"] = first[k], last[k]
    if "ci95" in last:  # a task's accuracy: its interval in one readable column
        row["accuracy 95% CI after"] = "[{:.3f}, {:.3f}] of {}".format(*last["ci95"], last["examples"])
    return row


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def text_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table: numbers right-aligned, text (names, continuations) left-aligned."""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(_NUMBER.fullmatch(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda vals: "  ".join(v.rjust(w) if num else v.ljust(w)  # noqa: E731
                                  for v, w, num in zip(vals, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?|nan|inf|-inf|")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        return f"{v:,.2f}" if 0.01 <= abs(v) < 1e6 or v == 0 else f"{v:.3g}"  # a learning rate is not 0.00
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path
