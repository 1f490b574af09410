"""Low rank + quantisation against plain quantisation, per bit, side by side in one run.

On the embedded default (or --model): every row is one model, evaluated on WikiText-2 and held-out
C4 (perplexity, `--tokens` each), with the bits it stores per block weight counted from its
tensors (packed integers, scales, zeros, norms, biases: everything in the blocks; embeddings and
head apart, unquantised in every row):
  plain    HQQ's round-to-nearest, HQQ's half-quadratic fit and GPTQ (welore.quantizers, on the same
           calibration tokens as the calibrated rows), at 8/4/3/2 bits, groups of 128 and 64
  welore   the calibrated recipe (loss allocation + whiten-fisher) at 10% and 20% fewer parameters,
           factors and N-LRCs then quantised the same ways at 4/3/2 bits
  rank+bits  `welore compress --bits-per-weight B` (the `bits` rule: every matrix's rank and bit
           width chosen together on calibrated loss estimates), at each --budgets B: one
           calibration and one table of storage choices, re-planned per budget and quantiser
with the wall time and peak memory (resident memory it adds over the model copy it works on) of
each; and the speed of dense, the best plain and welore rows at 4 bits and every rank+bits row:
batch-1 decode tokens/s eager and compiled, 512-token prefill, and their perplexity with every
product on the int4 kernel (QuantLinear's decode path) against HQQ's path, which the table's
512-token evaluations take.
Writes results.json, results.md and quantize.png to --out.

    python benchmarks/quantize.py           # ~70 min on 2 CPU cores, nothing else running
    python benchmarks/quantize.py --bits 4 3 2 --groups 128 --param-ratios 0.1 --budgets 2.5 3.25 4.25 --decode-tokens 0
    python benchmarks/quantize.py --bits 4 --param-ratios 0.1 --budgets 3.25 4.25 --joint-quantizers hqq  # the speed
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from welore import CompressConfig, load_model, perplexity
from welore.calibrate import calibration_batches, collect_stats
from welore.compress import compress
from welore.quantize import bits_report, choices_estimator, quantize_model
from welore.report import markdown_table
from welore.targets import find_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="any model welore loads (default: the embedded SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens per corpus")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--param-ratios", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-data", default="c4-train", choices=["c4-train", "self"],
                    help="every calibrated row's text: C4 training documents, or the model's own samples (no data)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.25, 3.5, 4.25, 4.5],
                    help="bits per weight for the rank+bits rows")
    ap.add_argument("--quantizers", nargs="+", default=["rtn", "hqq", "gptq"], help="for the plain and welore rows")
    ap.add_argument("--joint-quantizers", nargs="+", default=["gptq", "hqq"])
    ap.add_argument("--decode-tokens", type=int, default=64, help="0: no speed table")
    ap.add_argument("--out", default="bench-out/quantize")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = load_model(a.model)
    dense, tok = loaded.model, loaded.tokenizer
    rows: list[dict] = []

    def row(family: str, label: str, model, seconds: float, peak: float | None = None, quantizer: str = "") -> dict:
        # an unquantised model counts as stored in 16 bits (what a checkpoint of it holds), not as
        # the float32 copy this CPU computes with
        quantised = any(type(m).__name__ == "QuantLinear" for m in model.modules())
        bits = bits_report(model if quantised else copy.deepcopy(model).half())["bits_per_weight"]
        r = {"family": family, "quantizer": quantizer, "model": label, "bits/weight": bits}
        for corpus in ("wikitext2", "c4"):
            r[f"{corpus} ppl"] = perplexity(model, tok, corpus, seqlen=a.seqlen, max_tokens=a.tokens,
                                            progress=False).ppl
        r["quantise s"] = round(seconds, 1)
        r["peak GiB"] = None if peak is None else round(peak, 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    ref = row("dense", "dense (16-bit)", dense, 0.0)
    models = {"dense": dense}
    t = time.perf_counter()  # GPTQ's Hessians: the calibration every calibrated row below also draws
    stats = collect_stats(dense, find_targets(dense), calibration_batches(tok, a.calib_samples, a.seqlen, a.calib_data,
                                                                          model=dense),
                          progress=False) if "gptq" in a.quantizers else None
    calib_s = time.perf_counter() - t
    for bits in a.bits:
        for group in a.groups if bits < 8 else a.groups[:1]:
            for quantizer in a.quantizers:
                m = copy.deepcopy(dense)
                t = time.perf_counter()
                with PeakRSS() as peak:
                    quantize_model(m, bits, group, quantizer, stats=stats, progress=False)
                seconds = time.perf_counter() - t + (calib_s if quantizer == "gptq" else 0.0)
                r = row("plain", f"{quantizer} {bits}-bit g{group}", m, seconds, peak.gib, quantizer)
                models[r["model"]] = m if bits == 4 else None
                del m
                gc.collect()
    del stats
    firsts = {}  # one calibration and one table of choices per estimator (choices_estimator) serve its rows
    for quantizer in a.joint_quantizers:
        first = firsts.get(choices_estimator(quantizer))
        for budget in a.budgets:
            cfg = CompressConfig(bits_per_weight=budget, method="whiten-fisher", quantizer=quantizer,
                                 group_size=a.groups[0], calib_samples=a.calib_samples, calib_data=a.calib_data)
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            with PeakRSS() as peak:
                done = compress(m, tok, cfg, reuse=first, progress=False)
            seconds = time.perf_counter() - t + (first.prep_seconds if first is not None else 0.0)
            r = row("rank+bits", f"rank+bits {budget:g} ({quantizer} g{a.groups[0]})", m, seconds,
                    peak.gib if first is None else None, quantizer)  # a re-plan's peak is not the method's
            first = firsts[choices_estimator(quantizer)] = first or done
            r["storage"] = dict(sorted(Counter(
                f"{mp.bits}-bit" + (" LRC" if mp.lrc else f" + rank {mp.correction}" if mp.correction else "")
                for mp in done.plan.matrices).items()))
            models[r["model"]] = m if quantizer == a.joint_quantizers[0] else None
            del m, done
            gc.collect()
    del first, firsts
    gc.collect()
    for ratio in a.param_ratios:
        cfg = CompressConfig(ratio=ratio, target="params", allocation="loss", method="whiten-fisher",
                             min_ratio=0.0, calib_samples=a.calib_samples, calib_data=a.calib_data)
        lr = copy.deepcopy(dense)
        t = time.perf_counter()
        with PeakRSS() as peak:
            recipe = compress(lr, tok, cfg, progress=False)
        compress_s = time.perf_counter() - t
        row("low rank", f"recipe {ratio:.0%} fewer params, 16-bit factors", lr, compress_s, peak.gib)
        for bits in [b for b in a.bits if b < 8]:
            for quantizer in a.quantizers:
                m = copy.deepcopy(lr)
                t = time.perf_counter()
                with PeakRSS() as q_peak:  # GPTQ: on the recipe's own calibration
                    quantize_model(m, bits, a.groups[0], quantizer, stats=recipe.stats, progress=False)
                r = row("welore", f"recipe {ratio:.0%} + {quantizer} {bits}-bit g{a.groups[0]}", m,
                        compress_s + time.perf_counter() - t, max(peak.gib, q_peak.gib), quantizer)
                models[r["model"]] = m if bits == 4 else None
                del m
                gc.collect()
        del lr, recipe
        gc.collect()

    speed = decode_speeds(rows, models, tok, a.decode_tokens, a) if a.decode_tokens > 0 else {}
    (out / "results.json").write_text(json.dumps({"rows": rows, "decode": speed, "args": vars(a)}, indent=1))
    table = markdown_table([{**{k: v for k, v in r.items() if k != "storage"},
                             "wikitext2 x dense": r["wikitext2 ppl"] / ref["wikitext2 ppl"],
                             "c4 x dense": r["c4 ppl"] / ref["c4 ppl"]} for r in rows])
    storage = "\n".join(f"- {r['model']}: " + ", ".join(f"{n} {k}" for k, n in r["storage"].items())
                        for r in rows if "storage" in r)
    speed_rows = [{"model": k, **v} for k, v in speed.items()]
    speed_table = (markdown_table(speed_rows, list(dict.fromkeys(k for r in speed_rows for k in r))) if speed_rows
                   else "(not measured: --decode-tokens 0)")
    (out / "results.md").write_text(f"{table}\n\nSpeed (batch 1, {a.decode_tokens} new tokens; prefill 512 tokens; "
                                    f"median of 3; eager: models alternating, compiled: one at a time):\n\n{speed_table}"
                                    f"\n\nMatrices per storage choice:\n{storage}\n")
    plot(rows, out / "quantize.png")
    print(table)
    print(speed_table)


def rss_gib() -> float:
    """Resident memory now (GiB), from /proc (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


class PeakRSS:
    """`with PeakRSS() as p:` ... then p.gib: the most resident memory above the start, sampled every 20 ms
    in a thread (the process-wide ru_maxrss cannot tell one method's peak from an earlier one's)."""

    def __enter__(self) -> PeakRSS:
        self.base, self.top, self.done = rss_gib(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.02):
            self.top = max(self.top, rss_gib())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.gib = max(self.top, rss_gib()) - self.base


def decode_speeds(rows: list[dict], models: dict, tok, new_tokens: int, a) -> dict[str, dict]:
    """Greedy batch-1 decode tokens/s (eager and compiled decoding) and 512-token prefill of dense,
    the best plain and welore rows kept (4-bit) and every rank+bits row (welore.generate.
    generation_speed: eager, the models alternating; compiled, one at a time); and each quantised model's perplexity with the int4 kernel
    on every forward (the table's rows evaluate 512-token sequences, past QuantLinear.int4_rows:
    HQQ's fp32 path), to show what its bfloat16 activations cost."""
    from welore.generate import generation_speed
    from welore.qlinear import QuantLinear

    picks = ["dense"]
    for family in ("plain", "welore"):
        kept = [r for r in rows if r["family"] == family and models.get(r["model"]) is not None]
        if kept:
            picks.append(min(kept, key=lambda r: r["wikitext2 ppl"])["model"])
    picks += [r["model"] for r in rows if r["family"] == "rank+bits" and models.get(r["model"]) is not None]
    chosen = {name: models[name] for name in picks}
    eager = generation_speed(chosen, tok, new_tokens=new_tokens, runs=3)
    compiled = generation_speed(chosen, tok, new_tokens=new_tokens, runs=3, compile=True)
    by_name = {r["model"]: r for r in rows}
    speed = {}
    for name in picks:
        s = speed[name] = {"decode tok/s": eager[name]["decode"], "compiled decode tok/s": compiled[name]["decode"],
                           "prefill tok/s": eager[name]["prefill"]}
        for k in list(s):
            s[k.replace("tok/s", "x dense")] = s[k] / speed["dense"][k]
        if name == "dense":
            continue
        rows_before = QuantLinear.int4_rows
        QuantLinear.int4_rows = 1 << 30
        try:
            for corpus in ("wikitext2", "c4"):
                ppl = perplexity(chosen[name], tok, corpus, seqlen=a.seqlen, max_tokens=a.tokens, progress=False).ppl
                s[f"{corpus} ppl, int4 kernel / HQQ path"] = ppl / by_name[name][f"{corpus} ppl"]
        finally:
            QuantLinear.int4_rows = rows_before
    return speed


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, corpus in zip(axes, ("wikitext2", "c4")):
        markers = {"plain": "o", "welore": "s", "rank+bits": "D", "low rank": "^", "dense": "*"}
        for family, quantizer in dict.fromkeys((r["family"], r["quantizer"]) for r in rows):
            pts = sorted((r["bits/weight"], r[f"{corpus} ppl"]) for r in rows
                         if (r["family"], r["quantizer"]) == (family, quantizer))
            ax.plot(*zip(*pts), marker=markers[family], label=f"{family} {quantizer}".strip(),
                    linestyle=":" if family in ("plain", "rank+bits") else "")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per block weight (stored)")
        ax.set_ylabel(f"{corpus} perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
