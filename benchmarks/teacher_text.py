"""Teacher-sampled training text: can the dense model's own samples stand in for C4 train?

On a GPU the recovery recipe runs out of text: the project's C4 training split is 881,139 tokens,
and the 20% recipe's held-out C4 got worse after half a pass over it (docs/results/recovery.md, "On a GPU").
The dense model can write more: continue the first `--prefix` tokens of each C4 training document
(documents 0-1799, never evaluation text) with `--new` tokens sampled at temperature 1 from its full
distribution by default (no top-k / top-p, so in expectation training on them is distillation from
the teacher, on the teacher's own continuations: sequence-level distillation), or from its nucleus
(`--top-p`: likelier text, without the tails). Written as JSON lines with a `text` field, one record
per sample, so `welore finetune --data FILE` trains on it:

    python benchmarks/teacher_text.py bench-out/teacher-text/samples.jsonl --tokens 150000 --batch-size 48
    python benchmarks/teacher_text.py bench-out/teacher-text/samples-p09.jsonl --tokens 150000 --batch-size 48 --top-p 0.9

Then recover the same compressed model on C4 and on the samples with the same steps and compare
(docs/results/recovery.md, "More text from the teacher itself"). Prints the sampling rate (new tokens/s), the
figure that decides where this can pay: it must beat the rate training consumes tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice
from pathlib import Path

import torch

from welore.data import c4_documents
from welore.files import atomic_file
from welore.models import load_model
from welore.progress import bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the .jsonl file to write")
    ap.add_argument("--tokens", type=int, default=150_000, help="new tokens to sample in all")
    ap.add_argument("--prefix", type=int, default=32, help="tokens of each C4 train document to continue")
    ap.add_argument("--new", type=int, default=480, help="tokens sampled per document")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="nucleus sampling: below 1 keeps to the teacher's likelier text, at the cost of its tails")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    loaded = load_model()  # the embedded default, the teacher of the recovery runs
    model, tok = loaded.model, loaded.tokenizer
    need = -(-a.tokens // a.new)
    # only as many documents are tokenised as there are samples to write
    ids = (tok(d).input_ids for d in c4_documents("c4-train"))
    prefixes = list(islice((x[: a.prefix] for x in ids if len(x) >= a.prefix), need))
    if need > len(prefixes):
        raise SystemExit(f"{need} samples wanted, {len(prefixes)} documents have {a.prefix} tokens")
    torch.manual_seed(a.seed)
    records, sampled, t0 = [], 0, time.perf_counter()
    with bar(total=need * a.new, desc="Sampling", unit="tok") as pbar:
        for start in range(0, need, a.batch_size):
            ids = torch.tensor(prefixes[start: min(start + a.batch_size, need)], device=model.device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=a.top_p, min_new_tokens=a.new, max_new_tokens=a.new,
                                     pad_token_id=tok.eos_token_id)
            records += [{"text": tok.decode(row, skip_special_tokens=True)} for row in out]
            sampled += (out.shape[1] - ids.shape[1]) * len(out)
            pbar.update((out.shape[1] - ids.shape[1]) * len(out))
    seconds = time.perf_counter() - t0
    with atomic_file(a.out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    meta = {"samples": len(records), "prefix_tokens": a.prefix, "new_tokens": sampled, "seconds": seconds,
            "new_tokens_per_s": sampled / seconds, "batch_size": a.batch_size, "seed": a.seed,
            "teacher": loaded.name, "temperature": 1.0, "top_p": a.top_p}
    with atomic_file(a.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    print(f"{len(records)} samples, {sampled:,} new tokens in {seconds:.0f} s: {sampled / seconds:.1f} new tokens/s "
          f"(batch {a.batch_size}) -> {a.out}")


if __name__ == "__main__":
    main()
