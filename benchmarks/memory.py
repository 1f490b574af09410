"""What one training step allocates at its peak, by mode and memory saver: the tensors themselves, as
torch's profiler tracks them (its memory timeline), not the process' RSS, which also counts memory the
allocator holds after tensors are freed.

One optimizer step (after a first one, so Adam's states exist) of `welore finetune`'s step, written
out: the LM loss (the model's own, or `chunked_lm_loss`), backward, gradient clipping, AdamW
(torch's, as Trainer's `adamw_torch`), zero_grad. With `--teacher`, distillation instead (KL at T = 2
from the base model in the loop, whole logits or `chunked_kd_loss`; the teacher's weights are in every
figure and printed apart). Each configuration in its own process. The numbers
come from torch's private `MemoryProfileTimeline`, the class behind `profile.export_memory_timeline`
(which draws them; torch is pinned, so the private name holds).

    python benchmarks/memory.py bench-out/recovery/paper50 --batch-size 8 --seqlen 512 [--teacher]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from welore.distill import chunked_kd_loss, kd_loss
from welore.finetune_config import FinetuneConfig
from welore.io import load_compressed
from welore.losses import chunked_lm_loss
from welore.modes import prepare_mode
from welore.teacher import Teacher
from welore.trainer import CHECKPOINTING, Batches

CONFIGS = [(mode, saved) for mode in ("lrc", "full") for saved in (False, True)]


def one(model_dir: str, mode: str, saved: bool, batch_size: int, seqlen: int, chunk: int, distil: bool) -> dict:
    loaded = load_compressed(model_dir, device="cpu")
    teacher = Teacher(loaded.meta["base_model"], loaded.tokenizer, "cpu") if distil else None
    model, _, _ = prepare_mode(loaded.model, FinetuneConfig(mode=mode))
    model.config.use_cache = False
    model.train()
    if saved:  # what Trainer does with welore's training arguments
        getattr(model, f"{CHECKPOINTING}_enable")(**{f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batches = Batches(loaded.tokenizer, FinetuneConfig(seqlen=seqlen, batch_size=batch_size))

    def loss_of(b: dict) -> torch.Tensor:
        if teacher is None:
            return chunked_lm_loss(model, b, chunk) if saved else model(**b).loss
        if saved:
            return chunked_kd_loss(model, b, chunk, teacher, 1.0, 2.0)
        return kd_loss(model(**b).logits, teacher.logits(b), b["labels"], 2.0)

    def step(t: int) -> None:
        b = batches.get(t, 0)
        loss = loss_of(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(1)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    total = np.asarray(sizes).sum(1)
    return {"mode": mode, "saved": saved, "peak_allocated_gib": float(total.max()) / 2**30,
            "parameters_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "teacher_gib": teacher.memory_bytes / 2**30 if teacher else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a welore-compressed directory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--loss-chunk", type=int, default=1024, help="the saved runs' --loss-chunk")
    ap.add_argument("--teacher", action="store_true", help="distil from the base model (in the loop) instead")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "SAVED"), help=argparse.SUPPRESS)  # a child's configuration
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one[0], a.one[1] == "1", a.batch_size, a.seqlen, a.loss_chunk, a.teacher)))
        return
    rows = {}
    for mode, saved in CONFIGS:
        out = subprocess.run([sys.executable, __file__, a.model, "--batch-size", str(a.batch_size), "--seqlen",
                              str(a.seqlen), "--loss-chunk", str(a.loss_chunk), "--one", mode, str(int(saved)),
                              *["--teacher"] * a.teacher],
                             capture_output=True, text=True, check=True).stdout
        rows[(mode, saved)] = r = json.loads(out.strip().splitlines()[-1])
        print(f"{mode:5s} {'saved' if saved else 'own':5s} peak allocated {r['peak_allocated_gib']:.2f} GiB "
              f"(parameters {r['parameters_gib']:.2f}, teacher {r['teacher_gib']:.2f})", flush=True)
    for saved in (False, True):
        lrc, full = (rows[(m, saved)]["peak_allocated_gib"] for m in ("lrc", "full"))
        teacher = rows[("lrc", saved)]["teacher_gib"]
        print(f"lrc/full {'with both savers' if saved else 'without savers'}: {lrc / full:.2f}x"
              + f" ({(lrc - teacher) / (full - teacher):.2f}x less the teacher's weights)" * bool(teacher))


if __name__ == "__main__":
    main()
