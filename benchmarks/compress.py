"""Benchmark `welore compress` on the embedded default (SmolLM2-135M-Instruct, CPU or GPU).

Prints: load / analyze / compress wall times, the single-SVD vs naive two-SVD flow, peak RSS, and a
table of WikiText-2 and held-out C4 perplexity for dense, uniform and WeLore (min_ratio 0, the
paper's compression-only setting, and min_ratio 0.5, its fine-tuning setting) at effective rank
reductions 10..70%, with parameter counts; then generation speed, dense vs the main job's model (50%
effective rank reduction, min_ratio 0.5): prefill and decode tokens/s of greedy `generate`, batch 1,
fp32, median of --speed-runs runs, measured side by side. Writes JSON, markdown and a PNG to --out.

    python benchmarks/compress.py                      # ~20 min on 2 CPU cores
    python benchmarks/compress.py --ratios 0.5 --wiki-tokens 4096 --c4-tokens 2048   # quick look
    python benchmarks/compress.py --speed-only         # generation speed alone (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import time
from pathlib import Path

import torch

from welore import allocate, analyze, apply_plan, count_parameters, find_targets, load_model, perplexity
from welore.generate import generation_speed as welore_speed
from welore.report import markdown_table


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--wiki-tokens", type=int, default=16384)
    ap.add_argument("--c4-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--min-ratios", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--device", default=None)
    ap.add_argument("--speed-runs", type=int, default=7, help="runs per generation-speed figure (median)")
    ap.add_argument("--speed-tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--speed-only", action="store_true", help="only the generation-speed comparison")
    ap.add_argument("--out", default="bench-out/compress")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    t = time.perf_counter()
    loaded = load_model(None, device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    load_s = time.perf_counter() - t
    targets = find_targets(model)
    print(f"model {loaded.name}: {count_parameters(model):,} params, {len(targets)} target matrices, "
          f"device {next(model.parameters()).device}, load {load_s:.1f} s")
    if a.speed_only:
        speed = generation_speed(model, tok, analyze(model, targets, keep_factors=True, progress=False), a)
        (out / "speed.json").write_text(json.dumps(speed, indent=1))
        return

    # ---- single SVD (analyze keeps the factors) vs naive (svdvals, then a second SVD per LRC) ----
    t = time.perf_counter()
    spectra = analyze(model, targets, keep_factors=True, progress=False)
    analyze_s = time.perf_counter() - t
    rss_after_analyze = peak_rss_gib()
    plan50 = allocate(spectra, ratio=0.5, min_ratio=0.0)
    t = time.perf_counter()
    apply_plan(copy.deepcopy(model), plan50, spectra, progress=False)
    apply_s = time.perf_counter() - t
    t = time.perf_counter()
    values_only = analyze(model, targets, keep_factors=False, progress=False)
    naive_analyze_s = time.perf_counter() - t
    t = time.perf_counter()
    apply_plan(copy.deepcopy(model), allocate(values_only, ratio=0.5, min_ratio=0.0), None, progress=False)
    naive_apply_s = time.perf_counter() - t
    gc.collect()
    timing = {"load_s": load_s, "analyze_keep_factors_s": analyze_s, "apply_with_factors_s": apply_s,
              "single_svd_total_s": analyze_s + apply_s, "naive_svdvals_s": naive_analyze_s,
              "naive_second_svd_s": naive_apply_s, "naive_total_s": naive_analyze_s + naive_apply_s,
              "lrcs_at_50": len(plan50.lrcs), "peak_rss_after_analyze_gib": rss_after_analyze}
    print(json.dumps(timing, indent=1))

    def evaluate(m) -> dict:
        w = perplexity(m, tok, "wikitext2", seqlen=a.seqlen, max_tokens=a.wiki_tokens, progress=False)
        c = perplexity(m, tok, "c4", seqlen=a.seqlen, max_tokens=a.c4_tokens, progress=False)
        return {"wikitext2 ppl": w.ppl, "c4 ppl": c.ppl, "wiki tokens": w.tokens, "c4 tokens": c.tokens}

    dense_params = count_parameters(model)
    rows = [{"method": "dense", "target": "-", "eff. rank red.": 0.0, "param red. (targets)": 0.0,
             "params": dense_params, "LRCs": 0, **evaluate(model)}]
    print(rows[-1])
    for r in a.ratios:
        variants = [("uniform", allocate(spectra, ratio=r, allocation="uniform"))]
        variants += [(f"WeLore (min_ratio {mr:g})", allocate(spectra, ratio=r, min_ratio=mr)) for mr in a.min_ratios]
        for name, plan in variants:
            m = apply_plan(copy.deepcopy(model), plan, spectra, progress=False)
            rows.append({"method": name, "target": f"{r:.0%}", "eff. rank red.": plan.effective_rank_reduction,
                         "param red. (targets)": plan.param_reduction, "params": count_parameters(m),
                         "LRCs": len(plan.lrcs), **evaluate(m)})
            print(rows[-1], flush=True)
            del m
            gc.collect()
    timing["peak_rss_end_gib"] = peak_rss_gib()
    timing["generation_speed"] = generation_speed(model, tok, spectra, a)

    for row in rows:
        for k in ("eff. rank red.", "param red. (targets)"):
            row[k] = f"{row[k]:.1%}"
    table = markdown_table(rows, ["method", "target", "eff. rank red.", "param red. (targets)", "params", "LRCs",
                                  "wikitext2 ppl", "c4 ppl"])
    header = (f"SmolLM2-135M-Instruct, device {next(model.parameters()).device}, seqlen {a.seqlen}, "
              f"WikiText-2 test first {rows[0]['wiki tokens']} tokens, held-out C4 first {rows[0]['c4 tokens']} tokens")
    print("\n" + header + "\n\n" + table)
    print(f"\nanalyze (SVD keeping factors) {analyze_s:.1f} s + compress {apply_s:.2f} s = "
          f"{analyze_s + apply_s:.1f} s;  naive: svdvals {naive_analyze_s:.1f} s + second SVD of "
          f"{len(plan50.lrcs)} LRCs {naive_apply_s:.1f} s = {naive_analyze_s + naive_apply_s:.1f} s; "
          f"peak RSS {timing['peak_rss_end_gib']:.2f} GiB")
    (out / "compress.json").write_text(json.dumps({"timing": timing, "rows": rows, "header": header}, indent=1))
    (out / "compress.md").write_text(header + "\n\n" + table + "\n")
    plot(rows, out / "compress.png")


def generation_speed(dense, tok, spectra, a) -> dict:
    """Prefill and decode tokens/s of greedy generate, batch 1, dense vs the main job's model (50%
    effective rank reduction, min_ratio 0.5): welore.generate.generation_speed (the two models
    alternating run by run, medians; decode excludes prefill: time(n new) - time(1 new))."""
    plan = allocate(spectra, ratio=0.5, min_ratio=0.5)
    compressed = apply_plan(copy.deepcopy(dense), plan, spectra, progress=False)
    device = next(dense.parameters()).device
    n = a.speed_tokens
    with torch.no_grad():
        speed = welore_speed({"dense": dense, "compressed": compressed}, tok, new_tokens=n, runs=a.speed_runs)
    res = {"threads": torch.get_num_threads(), "device": str(device), "dtype": str(next(dense.parameters()).dtype),
           "new_tokens": n, "runs": a.speed_runs, "params_dense": count_parameters(dense),
           "params_compressed": count_parameters(compressed)}
    res["param_ratio"] = res["params_dense"] / res["params_compressed"]
    for kind in ("decode", "prefill"):
        d, c = speed["dense"][kind], speed["compressed"][kind]
        res[f"{kind}_tok_s_dense"], res[f"{kind}_tok_s_compressed"], res[f"{kind}_speedup"] = d, c, c / d
    print(f"generation speed ({res['device']}, {res['dtype']}, {res['threads']} threads, median of {a.speed_runs}): "
          f"decode {res['decode_tok_s_dense']:.1f} -> {res['decode_tok_s_compressed']:.1f} tok/s "
          f"({res['decode_speedup']:.3f}x), prefill (512 tokens) {res['prefill_tok_s_dense']:.0f} -> "
          f"{res['prefill_tok_s_compressed']:.0f} tok/s ({res['prefill_speedup']:.3f}x); parameter ratio "
          f"{res['param_ratio']:.3f}x, decode / parameter ratio {res['decode_speedup'] / res['param_ratio']:.2f}")
    return res


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, metric in zip(axes, ["wikitext2 ppl", "c4 ppl"]):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            pts = [(float(r["eff. rank red."][:-1]), r[metric]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(rows[0][metric], color="k", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("effective rank reduction (%)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: perplexity after compression (no fine-tuning)")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
