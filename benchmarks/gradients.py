"""Benchmark `welore gradients`: recording overhead and the gradient/weight correlation found on
(a) the embedded default fine-tuned on C4 training text and (b) a LLaMA preset pretrained from scratch.

    python benchmarks/gradients.py        # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from welore import run_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune-steps", type=int, default=30)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--out", default="bench-out/gradients")
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    for label, kw in (("finetune SmolLM2-135M", dict(steps=a.finetune_steps, every=10, batch_size=4, seqlen=128)),
                      (f"pretrain {a.preset}", dict(preset=a.preset, steps=a.pretrain_steps, every=20, batch_size=8,
                                                     seqlen=128))):
        path, corr, rec = run_gradients(None, out / label.split()[0], overwrite=True, progress=False, **kw)
        i = rec.info
        results[label] = {"tokens_per_s_training": i["tokens_per_s_training"],
                          "tokens_per_s_with_records": i["tokens_per_s_with_records"],
                          "record_seconds": i["record_seconds"], "train_seconds": i["train_seconds"],
                          "loss_start": rec.losses[0], "loss_end": rec.losses[-1], "overall": corr["overall"],
                          "by_type": corr["by_type"]}
        print(f"\n## {label}\n{(path / 'report.md').read_text().split('![')[0]}", flush=True)
    (out / "gradients.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
