"""Benchmark `welore finetune` on the embedded default compressed at 50% effective rank reduction.

Same data, steps and seed for every mode (lrc = WeLore, full, lora with rank matched to lrc's
trainable parameters, galore), each mode in its own process (so peak memory is its own): continual
language modelling on the C4 training documents (held-out C4 + WikiText-2 perplexity) and two
downstream tasks (accuracy on a held-out split). Prints one table per data setting and the ratios
that matter: lrc vs full peak memory and tokens/s, lrc quality vs full and vs lora.

    python benchmarks/finetune.py               # ~25 min on 2 CPU cores
    python benchmarks/finetune.py --steps 5 --tasks coinflip   # a quick look
    # over a quantised rest (qlrc) against QLoRA (qlora) and plain lrc, the recovery recipe's schedule
    python benchmarks/finetune.py --modes lrc qlrc qlora --tasks --steps 500 --batch-size 2 --lr 3e-4 \
        --base recipe20
    # the same, each LRC over a quantised copy of its complement (LQ-LoRA's shape), against QLoRA
    python benchmarks/finetune.py --modes qlrc-complement qlora --tasks --steps 500 --batch-size 2 --lr 3e-4 \
        --base recipe20
    # QLoRA over the whole (uncompressed) model, rank 77: lrc's 23.44M parameters on recipe20
    python benchmarks/finetune.py --modes qlora --tasks --steps 500 --batch-size 2 --lr 3e-4 --base dense \
        --lora-rank 77
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from welore import CompressConfig, CompressJob, FinetuneConfig, compare, run_compress

# the comparisons that matter: WeLore against full fine-tuning and LoRA; over a quantised rest,
# against QLoRA, and against itself over a full-precision rest
# r50: WeLore at 50% effective rank reduction, data-free; recipe20: the calibrated recipe at 20% fewer
# parameters (issue 37's table: WikiText-2 71.3 where dense is 36.1)
# dense: the uncompressed model as a welore directory (no matrix reduces enough to turn low-rank), for
# QLoRA over the whole model (give --lora-rank: with no LRC, the matched rank is meaningless)
BASES = {"r50": CompressConfig(ratio=0.5),
         "recipe20": CompressConfig(ratio=0.2, target="params", allocation="loss", method="whiten-fisher"),
         "dense": CompressConfig(ratio=0.01, min_ratio=0.999)}
PAIRS = [("lrc", "full"), ("lrc", "lora"), ("qlrc", "qlora"), ("qlrc", "lrc"), ("qlrc-complement", "qlora")]


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
    ap.add_argument("--base", choices=list(BASES), default="r50", help="the compressed model every mode starts from")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA's rank (default: matched to lrc's parameters)")
    ap.add_argument("--frozen-scales", action="store_true",
                    help="qlrc / qlrc-complement: the frozen matrices' group scales train too")
    ap.add_argument("--seed", type=int, default=0, help="the data order's (and LoRA's initialisation's) seed")
    ap.add_argument("--out", default="bench-out/finetune")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"smollm2-welore-{a.base}"
    if not (base / "welore.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        run_compress(None, BASES[a.base], CompressJob(output=str(base), eval=False, quiet=True))
    results = {}
    for data in ["c4", *a.tasks]:
        cfg = FinetuneConfig(data=data, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seqlen=a.seqlen,
                             warmup=max(1, a.steps // 10), eval_tokens=a.eval_tokens, eval_examples=a.eval_examples,
                             save_every=0, seed=a.seed, lora_rank=a.lora_rank,
                             frozen_scales=a.frozen_scales)
        t = time.perf_counter()
        rows = compare(base, out / data, cfg, a.modes, overwrite=True, progress=False)
        results[data] = rows
        print(f"\n## {data} ({time.perf_counter() - t:.0f} s)\n")
        print((out / data / "compare.md").read_text().split("\n", 2)[2])
    print("\n## ratios (a / b: peak memory, tokens/s, quality after)")
    ratios = {}
    for data, rows in results.items():
        by = {r["mode"]: r for r in rows}
        quality = "c4_ppl after" if data == "c4" else "accuracy after"
        ratios[data] = {}
        for x, y in PAIRS:
            if x in by and y in by:
                ratios[data].update({f"peak memory {x}/{y}": by[x]["peak memory GiB"] / by[y]["peak memory GiB"],
                                     f"tokens/s {x}/{y}": by[x]["tokens/s"] / by[y]["tokens/s"],
                                     f"{quality} {x}/{y}": by[x][quality] / by[y][quality]})
        print(data, json.dumps({k: round(v, 3) for k, v in ratios[data].items()}))
    (out / "finetune.json").write_text(json.dumps({"args": vars(a), "results": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
