"""Benchmark `welore finetune` on the embedded default compressed at 50% effective rank reduction.

Same data, steps and seed for every mode (lrc = WeLore, full, lora with rank matched to lrc's
trainable parameters, galore), each mode in its own process (so peak memory is its own): continual
language modelling on the C4 training documents (held-out C4 + WikiText-2 perplexity) and two
downstream tasks (accuracy on a held-out split). Prints one table per data setting and the ratios
that matter: lrc vs full peak memory and tokens/s, lrc quality vs full and vs lora.

    python benchmarks/finetune.py               # ~25 min on 2 CPU cores
    python benchmarks/finetune.py --steps 5 --tasks coinflip   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from welore import CompressConfig, CompressJob, FinetuneConfig, compare, run_compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--tasks", nargs="*", default=["coinflip", "date"])
    ap.add_argument("--modes", nargs="+", default=["lrc", "full", "lora", "galore"])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--out", default="bench-out/finetune")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "smollm2-welore-r50"
    if not (base / "welore.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        run_compress(None, CompressConfig(ratio=0.5), CompressJob(output=str(base), eval=False, quiet=True))
    results = {}
    for data in ["c4", *a.tasks]:
        cfg = FinetuneConfig(data=data, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seqlen=a.seqlen,
                             warmup=max(1, a.steps // 10), eval_tokens=a.eval_tokens, eval_examples=a.eval_examples,
                             save_every=0, seed=0)
        t = time.perf_counter()
        rows = compare(base, out / data, cfg, a.modes, overwrite=True, progress=False)
        results[data] = rows
        print(f"\n## {data} ({time.perf_counter() - t:.0f} s)\n")
        print((out / data / "compare.md").read_text().split("\n", 2)[2])
    print("\n## ratios (lrc / full, lrc / lora)")
    ratios = {}
    for data, rows in results.items():
        by = {r["mode"]: r for r in rows}
        if "lrc" not in by or "full" not in by:
            continue
        quality = "c4_ppl after" if data == "c4" else "accuracy after"
        ratios[data] = {"peak memory lrc/full": by["lrc"]["peak memory GiB"] / by["full"]["peak memory GiB"],
                        "tokens/s lrc/full": by["lrc"]["tokens/s"] / by["full"]["tokens/s"],
                        f"{quality} lrc/full": by["lrc"][quality] / by["full"][quality]}
        if "lora" in by:
            ratios[data][f"{quality} lrc/lora"] = by["lrc"][quality] / by["lora"][quality]
        print(data, json.dumps({k: round(v, 3) for k, v in ratios[data].items()}))
    (out / "finetune.json").write_text(json.dumps({"args": vars(a), "results": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
