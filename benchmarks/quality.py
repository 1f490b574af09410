"""Compression quality beyond the paper: allocation x factorisation at equal parameter budgets.

On the embedded default (SmolLM2-135M-Instruct): for parameter reductions of the target matrices of
10/20/30/40%, every combination of
  allocation: WeLore threshold on the weight spectra (data-free), the same rule on the data-aware
              spectra, uniform;
  method:     svd (plain truncation), asvd (activation-aware scaling), whiten (SVD-LLM);
  plus the closed-form least-squares refit of the up factor on top of the WeLore-weight rows,
with WikiText-2 and held-out C4 perplexity and the compression wall time. Calibration: C4 training
documents only (never evaluation text). Every matrix whose truncation saves parameters is truncated
(min_ratio 0, the paper's compression-only setting). Writes JSON, markdown and a PNG to --out.

    python benchmarks/quality.py            # ~15 min on 2 CPU cores
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
from welore.calibrate import analyze_data_aware, calibration_batches, collect_stats
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
    t = time.perf_counter()
    stats = collect_stats(model, targets, calibration_batches(tok, a.calib_samples, a.calib_seqlen), progress=False)
    calib_s = time.perf_counter() - t
    factors, method_s = {"svd": weight}, {"svd": svd_s}
    for m in ("asvd", "whiten"):
        t = time.perf_counter()
        factors[m] = analyze_data_aware(model, targets, stats, m, progress=False)
        method_s[m] = calib_s + time.perf_counter() - t
    how = {}
    for h in getattr(factors["whiten"], "how", {}).values():
        how[h] = how.get(h, 0) + 1
    print(f"calibration {calib_s:.1f} s ({a.calib_samples} x {a.calib_seqlen} tokens of C4 train); "
          f"SVD {svd_s:.1f} s; asvd {method_s['asvd']:.1f} s; whiten {method_s['whiten']:.1f} s; "
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
              ("welore-weight", "svd", True), ("welore-weight", "asvd", True), ("welore-weight", "whiten", True)]
    for p in a.param_ratios:
        for alloc, method, refit in combos:
            spectra = factors[method] if alloc == "welore-data" else weight
            t = time.perf_counter()
            plan = allocate(spectra, ratio=p, target="params", min_ratio=a.min_ratio,
                            allocation="uniform" if alloc == "uniform" else "welore")
            m = apply_plan(copy.deepcopy(model), plan, factors[method], refit=stats if refit else None, progress=False)
            seconds = method_s[method] + (calib_s if refit and method == "svd" else 0) + time.perf_counter() - t
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
    (out / "quality.json").write_text(json.dumps({"args": vars(a), "rows": rows, "whiten_roots": how}, indent=1))
    (out / "quality.md").write_text(header + "\n\n" + table + "\n")
    plot(rows, out / "quality.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    styles = {"svd": "-", "asvd": "--", "whiten": ":"}
    for ax, metric in zip(axes, ["wikitext2 ppl", "c4 ppl"]):
        for i, combo in enumerate(dict.fromkeys(r["combination"] for r in rows[1:])):
            pts = [(float(r["param red."][:-1]), r[metric]) for r in rows if r["combination"] == combo]
            method = combo.split(" + ")[1]
            ax.plot(*zip(*pts), marker="o", ls=styles[method], color=f"C{i}", label=combo, lw=1.2)
        ax.axhline(rows[0][metric], color="k", lw=1, label="dense")
        ax.axhline(2 * rows[0][metric], color="k", lw=0.6, ls="--", label="2 x dense")
        ax.set_yscale("log")
        ax.set_xlabel("parameter reduction of the target matrices (%)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M: allocation x factorisation at equal parameter budgets (no fine-tuning)")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
