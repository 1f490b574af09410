"""Block-wise reconstruction of a compressed model's LRC factors against the dense blocks: does it
give recovery a better start than the compressed model itself?

For each transformer block in order, with the calibration windows' hidden states X_c (what the
compressed model feeds the block, earlier blocks already reconstructed) and X_d (the dense model's):
target Y = dense_block(X_d); AdamW on the block's LRC factors only, minimising
||block_c(X_c) - Y||^2 / ||Y - X_d||^2 (the error relative to what the dense block adds to the
residual stream); then X_c <- block_c(X_c), X_d <- Y. The block's relative error before and after,
in-sample, is printed per block; WikiText-2 perplexity of the model before and after on
`--eval-tokens`. Memory holds both models and four activation tensors (seqs x seqlen x hidden).

    python benchmarks/reconstruct.py bench-out/recovery/recipe20 -o bench-out/bwr/recipe20-bwr

Then recover it like any compressed directory (`welore finetune OUT --train lrc ...`) and compare
(docs/results/recovery.md, "Block-wise reconstruction before recovery").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from welore.allocate import RankPlan
from welore.blockwise import Blockwise, find_blocks
from welore.data import encode_corpus, random_windows
from welore.evaluate import perplexity
from welore.io import load_compressed, save_compressed
from welore.layers import LowRankLinear
from welore.models import load_model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, found as streaming finds them (no architecture's attribute names)."""
    return find_blocks(model)[1]


def block_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window, and the keyword arguments the model's own
    forward hands its blocks (masks, rotary embeddings): streaming's capture, on the model in memory."""
    hidden, extras = Blockwise(model, model.state_dict()).capture(windows)
    args, kwargs = extras[0][0]  # the same for every window and block (seqlen is fixed)
    assert not args, "blocks called with positional arguments beyond the hidden states"
    return torch.cat(hidden), {**kwargs, "use_cache": False}


def run_block(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    y = block(x, **kw)
    return y[0] if isinstance(y, tuple) else y


def reconstruct_block(bd: nn.Module, bc: nn.Module, xd: torch.Tensor, xc: torch.Tensor, kw: dict, a,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Train block `bc`'s LRC factors towards dense block `bd`'s outputs. Returns both blocks'
    outputs (the next block's inputs) and the relative error before and after."""
    chunks = range(0, len(xc), a.batch)
    steps = int(a.epochs * len(chunks))
    with torch.no_grad():
        y = torch.cat([run_block(bd, xd[j:j + a.batch], kw) for j in chunks])
    scale = ((y - xd) ** 2).mean()

    def error(j: int) -> torch.Tensor:
        return ((run_block(bc, xc[j:j + a.batch], kw) - y[j:j + a.batch]) ** 2).mean() / scale

    with torch.no_grad():
        before = sum(error(j).item() for j in chunks) / len(chunks)
    params = [p for m in bc.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if params:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            error(int(torch.randint(0, len(xc) - a.batch + 1, (1,), generator=g))).backward()  # any offset
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        after = sum(error(j).item() for j in chunks) / len(chunks)
        out = torch.cat([run_block(bc, xc[j:j + a.batch], kw) for j in chunks])
    return y, out, before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a welore-compressed directory whose base model is the embedded default")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--seqs", type=int, default=32, help="calibration windows of C4 train")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2, help="passes over the windows per block")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW, 5 warmup steps, cosine (3e-3 diverged)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 before and after (0: none)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dense = load_model(None).model
    comp = load_compressed(a.model)
    model, tok = comp.model, comp.tokenizer
    windows = random_windows(encode_corpus(tok, "c4-train"), a.seqs, a.seqlen, torch.Generator().manual_seed(12345))
    xd, kw = block_inputs(dense, windows)
    xc, _ = block_inputs(model, windows)

    def ppl() -> float:
        return perplexity(model, tok, "wikitext2", seqlen=512, max_tokens=a.eval_tokens, progress=False).ppl

    res = {"args": {k: str(v) for k, v in vars(a).items()}, "start_wt2": ppl() if a.eval_tokens else None, "blocks": []}
    model.requires_grad_(False)
    t0 = time.perf_counter()
    for i, (bd, bc) in enumerate(zip(blocks(dense), blocks(model))):
        xd, xc, before, after = reconstruct_block(bd, bc, xd, xc, kw, a, seed=i)
        res["blocks"].append({"block": i, "before": before, "after": after})
        print(f"block {i:2d}: relative error {before:.4f} -> {after:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["seconds"] = time.perf_counter() - t0
    res["end_wt2"] = ppl() if a.eval_tokens else None
    save_compressed(model, a.output, RankPlan.from_dict(comp.meta["plan"]), tokenizer=tok, overwrite=True,
                    base_model=comp.meta.get("base_model"),
                    settings={**comp.meta.get("settings", {}), "reconstruct": res["args"]},
                    extra=lambda tmp: (tmp / "reconstruct.json").write_text(json.dumps(res, indent=1)))
    print(json.dumps({k: res[k] for k in ("seconds", "start_wt2", "end_wt2")}))


if __name__ == "__main__":
    main()
