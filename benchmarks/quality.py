"""Compression quality beyond the paper: allocation x factorisation at equal parameter budgets.

On the embedded default (SmolLM2-135M-Instruct): for parameter reductions of the target matrices of
10/20/30/40%, every combination of
  allocation: WeLore threshold on the weight spectra (data-free), the same rule on the data-aware
              spectra, uniform, and loss (Lagrangian on a calibrated loss-increase estimate);
  method:     svd (plain truncation), asvd (activation-aware scaling), whiten (SVD-LLM),
              whiten-fisher (whitened inputs, loss-gradient-weighted outputs);
  plus the closed-form least-squares refit of the up factor on top of the WeLore-weight rows,
with WikiText-2 and held-out C4 perplexity and the compression wall time. Calibration: C4 training
documents only (never evaluation text). Every matrix whose truncation saves parameters is truncated
(min_ratio 0, the paper's compression-only setting). Writes JSON, markdown and a PNG to --out.

    python benchmarks/quality.py            # ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import torch

from welore import allocate, analyze, apply_plan, count_parameters, find_targets, load_model, perplexity
from welore.calibrate import calibration_batches, collect_stats
from welore.factorize import analyze_data_aware, attach_loss_tails
from welore.report import markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param-ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per corpus")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--min-ratio", type=float, default=0.0)
    ap.add_argument("--out", default="bench-out/quality")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    targets = find_targets(model)

    t = time.perf_counter()
    weight = analyze(model, targets, keep_factors=True, progress=False)  # svd factors + weight spectra
    svd_s = time.perf_counter() - t
    batches = calibration_batches(tok, a.calib_samples, a.calib_seqlen)
    t = time.perf_counter()
    collect_stats(model, targets, batches, progress=False)  # timed alone: what methods without gradients pay
    calib_s = time.perf_counter() - t
    t = time.perf_counter()
    stats = collect_stats(model, targets, batches, gradients=True, progress=False)  # same Grams + loss gradients
    grad_calib_s = time.perf_counter() - t
    factors, method_s = {"svd": weight}, {"svd": svd_s}
    for m in ("asvd", "whiten", "whiten-fisher"):
        t = time.perf_counter()
        factors[m] = analyze_data_aware(model, targets, stats, m, progress=False)
        method_s[m] = time.perf_counter() - t  # the factorisation alone; calibration is added per row
    tails_s = {}
    for m, sp in factors.items():
        t = time.perf_counter()
        attach_loss_tails(model, sp, stats, m)
        tails_s[m] = time.perf_counter() - t
    how = {}
    for h in factors["whiten"].how.values():
        how[h] = how.get(h, 0) + 1
    print(f"calibration {calib_s:.1f} s ({a.calib_samples} x {a.calib_seqlen} tokens of C4 train), "
          f"{grad_calib_s:.1f} s with loss gradients; "
          f"factorisation s: {({k: round(v, 1) for k, v in method_s.items()})}; "
          f"whitening square roots: {how}", flush=True)

    def evaluate(m) -> dict:
        w = perplexity(m, tok, "wikitext2", seqlen=a.seqlen, max_tokens=a.tokens, progress=False)
        c = perplexity(m, tok, "c4", seqlen=a.seqlen, max_tokens=a.tokens, progress=False)
        return {"wikitext2 ppl": w.ppl, "c4 ppl": c.ppl}

    rows = [{"combination": "dense", "param red. target": "-", "param red.": 0.0, "eff. rank red.": 0.0,
             "params": count_parameters(model), "LRCs": 0, "compress s": 0.0, **evaluate(model)}]
    print(rows[-1], flush=True)
    combos = [("welore-weight", "svd", False), ("welore-weight", "asvd", False), ("welore-weight", "whiten", False),
              ("welore-data", "asvd", False), ("welore-data", "whiten", False),
              ("uniform", "svd", False), ("uniform", "asvd", False), ("uniform", "whiten", False),
              ("welore-weight", "svd", True), ("welore-weight", "asvd", True), ("welore-weight", "whiten", True),
              ("welore-weight", "whiten-fisher", False), ("welore-data", "whiten-fisher", False),
              ("uniform", "whiten-fisher", False),
              ("loss", "svd", False), ("loss", "asvd", False), ("loss", "whiten", False),
              ("loss", "whiten-fisher", False)]
    for p in a.param_ratios:
        for alloc, method, refit in combos:
            spectra = factors[method] if alloc in ("welore-data", "loss") else weight
            t = time.perf_counter()
            plan = allocate(spectra, ratio=p, target="params", min_ratio=a.min_ratio,
                            allocation={"uniform": "uniform", "loss": "loss"}.get(alloc, "welore"))
            m = apply_plan(copy.deepcopy(model), plan, factors[method], refit=stats if refit else None, progress=False)
            # wall time of this combination alone: the calibration pass it needs + factorisation + plan + apply
            if alloc == "loss" or method == "whiten-fisher":
                calib = grad_calib_s
            else:
                calib = calib_s if method != "svd" or refit else 0.0
            seconds = calib + method_s[method] + (tails_s[method] if alloc == "loss" else 0.0) + time.perf_counter() - t
            rows.append({"combination": f"{alloc} + {method}{' + refit' if refit else ''}",
                         "param red. target": f"{p:.0%}", "param red.": plan.param_reduction,
                         "eff. rank red.": plan.effective_rank_reduction, "params": count_parameters(m),
                         "LRCs": len(plan.lrcs), "compress s": seconds, **evaluate(m)})
            print(rows[-1], flush=True)
            del m
            gc.collect()

    for r in rows:
        r["param red."], r["eff. rank red."] = f"{r['param red.']:.1%}", f"{r['eff. rank red.']:.1%}"
    table = markdown_table(rows)
    header = (f"SmolLM2-135M-Instruct, CPU, seqlen {a.seqlen}, first {a.tokens} tokens of WikiText-2 test and of "
              f"held-out C4; calibration {a.calib_samples} x {a.calib_seqlen} tokens of C4 train; min_ratio "
              f"{a.min_ratio:g}; parameter reduction is of the target matrices")
    print("\n" + header + "\n\n" + table)
    (out / "quality.json").write_text(json.dumps({"args": vars(a), "rows": rows, "whiten_roots": how,
                                                  "seconds": {"svd": svd_s, "calibration": calib_s,
                                                              "calibration+gradients": grad_calib_s,
                                                              "methods": method_s, "loss_tails": tails_s}},
                                                 indent=1))
    (out / "quality.md").write_text(header + "\n\n" + table + "\n")
    plot(rows, out / "quality.png")


def plot(rows: list[dict], path: Path) -> None:
    """WikiText-2 (top) and C4 (bottom) perplexity vs parameter reduction: one panel per allocation,
    one line per method (refit dashed), dense and 2 x dense as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allocs = list(dict.fromkeys(r["combination"].split(" + ")[0] for r in rows[1:]))
    methods = ["svd", "asvd", "whiten", "whiten-fisher"]
    fig, axes = plt.subplots(2, len(allocs), figsize=(4 * len(allocs), 7.5), sharey="row", squeeze=False,
                             layout="constrained")
    for row, metric in enumerate(["wikitext2 ppl", "c4 ppl"]):
        for col, alloc in enumerate(allocs):
            ax = axes[row, col]
            for combo in dict.fromkeys(r["combination"] for r in rows[1:] if r["combination"].startswith(alloc + " ")):
                method = combo.split(" + ")[1]
                pts = [(float(r["param red."][:-1]), r[metric]) for r in rows if r["combination"] == combo]
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=f"C{methods.index(method)}",
                        ls="--" if combo.endswith("refit") else "-", label=combo.removeprefix(alloc + " + "))
            ax.axhline(rows[0][metric], color="k", lw=1)
            ax.axhline(2 * rows[0][metric], color="k", lw=0.6, ls=":")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"allocation: {alloc}", fontsize=10)
                ax.legend(fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{metric} (black: dense, dotted: 2x)")
            if row == 1:
                ax.set_xlabel("parameter reduction of the targets (%)")
    fig.suptitle("SmolLM2-135M: allocation x factorisation at equal parameter budgets (no fine-tuning)")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
