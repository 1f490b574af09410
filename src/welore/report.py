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
        return f"{v:,.2f}" if abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path
