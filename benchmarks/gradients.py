"""Benchmark `welore gradients`: recording overhead and the gradient/weight correlation found on
(a) the embedded default fine-tuned on C4 training text and (b) a LLaMA preset pretrained from scratch.

    python benchmarks/gradients.py        # ~30 min on 2 CPU cores (run it alone: it reports tokens/s)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from welore import run_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--pretrain", nargs="+", default=["llama-tiny:2000:100", "llama-small:800:50"],
                    help="PRESET:STEPS:EVERY for each from-scratch run")
    ap.add_argument("--out", default="bench-out/gradients")
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    runs = [("finetune SmolLM2-135M", "finetune", dict(steps=a.finetune_steps, every=10, batch_size=4, seqlen=128))]
    for spec in a.pretrain:
        preset, steps, every = spec.split(":")
        runs.append((f"pretrain {preset}", preset, dict(preset=preset, steps=int(steps), every=int(every),
                                                         batch_size=8, seqlen=128)))
    for label, folder, kw in runs:
        path, corr, rec = run_gradients(None, out / folder, overwrite=True, progress=False, **kw)
        i = rec.info
        results[label] = {"tokens_per_s_training": i["tokens_per_s_training"],
                          "tokens_per_s_with_records": i["tokens_per_s_with_records"],
                          "record_seconds": i["record_seconds"], "train_seconds": i["train_seconds"],
                          "loss_start": rec.losses[0], "loss_end": rec.losses[-1], "overall": corr["overall"],
                          "by_type": corr["by_type"], "by_layer": corr["by_layer"]}
        print(f"\n## {label}\n{(path / 'report.md').read_text().split('![')[0].split(chr(10), 1)[1]}", flush=True)
        (out / "gradients.json").write_text(json.dumps(results, indent=1))  # after each run: partial results survive


if __name__ == "__main__":
    main()
