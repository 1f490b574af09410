"""Sequential calibration: the data-aware methods, refit and the loss allocation, block by block.

`welore compress MODEL_DIR --stream --method whiten-fisher --allocation loss` computes what the
in-memory `compress` computes, without the model in memory (welore.blockwise runs it):

* **Forward sweep.** The calibration sequences enter block 0; each block in turn is read from the
  shards, its targets' input statistics (Gram matrices, mean |x|) are summed by the same hooks as
  `collect_stats`, and its outputs, the next block's inputs, are stored in the checkpoint's dtype
  (`acts/{i}`), which is the dtype the whole model would carry them in.
* **Backward sweep** (whiten-fisher and the loss allocation need loss gradients): the LM loss at
  the head gives the gradient of the last hidden states; from the top block down, each block is
  recomputed from its stored inputs, the gradient is pushed through it (`grads/{i}`), and its
  targets' squared output gradients are summed on the way. Blockwise chain rule, same sums.
* Once a block's statistics are complete, its targets are factorised at once (the method's SVD up
  to the largest useful rank) and spilled as `stream` spills the plain SVD: singular values, loss
  tails, factors in the checkpoint's dtype, and for refit the two small products that replace the
  Gram matrix (`refit_terms`). So memory holds one block's statistics, never the model's.
* With `calib_passes` = 2, the plan of pass 1 compresses each block as it is read in pass 2, so
  statistics flow through the *compressed* blocks: each block is factorised for the inputs (and
  gradients) it will really see. This is the in-memory second pass, block by block.

Resume: a block is done when its spill and its output activations (or input gradients) are on
disk, a pass when its `done` marker is; a resumed job reads them back and continues.

Several processes (`torchrun`, `accelerate launch`): the blocks must be visited in order, so the
split is inside each block. Every process runs the sweeps (the same activations, the same
statistics); process r factorises its share of each block's targets (r, r + N, ...), the shares
are merged into the block's spill, and process 0 writes the activations. The factorisations are
the same calls on the same statistics, so the output is the one process' bytes (with the same
threads per process: LAPACK's rounding depends on the thread count).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .allocate import RankPlan
from .blockwise import Blockwise
from .calibrate import StatsHooks, calibration_batches
from .config import CompressConfig
from .errors import WeloreError
from .factorize import loss_tail, refit_terms
from .io import build_skeleton
from .layers import LowRankLinear
from .progress import bar
from .shards import ShardReader, write_shard
from .spectrum import fingerprint, max_useful_rank, singular_values, truncated_svd
from .targets import Target


def spill_calibrated(reader: ShardReader, config, blocks: dict, keys: dict, cfg: CompressConfig, work: Path,
                     tokenizer, plan_of, block_state, progress: bool = True, state=None) -> Path:
    """Run every calibration pass; returns the spill directory of the last one. `plan_of(spill_dir)`
    allocates from a pass' spill, `block_state(...)` builds a compressed block's tensors (both from
    welore.stream, which writes the output the same way). `state`: the processes sharing the work
    (accelerate's; one process when None)."""
    state = state or _OneProcess()
    if None in blocks:
        raise WeloreError("calibrated streaming compresses targets inside the transformer blocks only; "
                          "narrow --targets to block layers")
    ids = calibration_batches(tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.calib_data, seed=cfg.seed)
    plan: RankPlan | None = None
    prev: Path | None = None
    for p in range(1, cfg.calib_passes + 1):
        d = work / f"pass{p}"
        if not (d / "done").is_file():
            for sub in ("acts", "grads", "spill"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            bw = Blockwise(build_skeleton(config, plan), reader)
            if any(b >= bw.depth for b in blocks):
                raise WeloreError(f"target block indices go beyond the model's {bw.depth} blocks")

            def tensors_of(i: int, bw=bw, plan=plan, prev=prev) -> dict[str, torch.Tensor]:
                if plan is None:
                    return bw.block_tensors(reader, i)
                full = block_state(reader, {m.name: m for m in plan.lrcs}, blocks.get(i, []), keys.get(i, []),
                                   load_file(str(prev / f"{i}.safetensors")) if i in blocks else {})
                return bw.block_tensors(full, i)

            sweep = _Sweep(bw, tensors_of, reader, blocks, cfg, d, ids, f"pass {p}/{cfg.calib_passes}", progress,
                           state)
            sweep.forward()
            if cfg.gradients:
                sweep.backward()
            if state.is_main_process:
                (d / "done").write_text("")
        state.wait_for_everyone()
        if state.is_main_process:
            for sub in ("acts", "grads"):
                shutil.rmtree(d / sub, ignore_errors=True)
            if prev is not None:
                shutil.rmtree(prev.parent, ignore_errors=True)  # the previous pass' spill served its purpose
        plan, prev = plan_of(d / "spill"), d / "spill"
        state.wait_for_everyone()
    return prev


class _Sweep:
    """One calibration pass over the blocks (see module docstring)."""

    def __init__(self, bw: Blockwise, tensors_of, reader: ShardReader, blocks: dict, cfg: CompressConfig,
                 d: Path, ids: torch.Tensor, what: str, progress: bool, state):
        self.bw, self.tensors_of, self.reader, self.blocks, self.cfg = bw, tensors_of, reader, blocks, cfg
        self.d, self.ids, self.what, self.state = d, ids, what, state
        self.progress = progress and state.is_main_process
        self.hidden, self.extras = bw.capture(ids)

    def _finish_block(self, kind: str, i: int, stats: dict | None, block: int, out: list[torch.Tensor]) -> None:
        """Spill `block` from its statistics (each process its share of the targets, merged), then
        write `kind`/{i}: in that order, so a block whose output is on disk has its spill too. Process 0
        writes only once every process has arrived, so each has already checked `_done` for this block:
        none can skip the block (and its barriers) on seeing a file process 0 has just written."""
        spill, n = self._file("spill", block), self.state.num_processes
        if stats is not None:
            r = self.state.process_index
            spill_block(self.reader, self.blocks[block][r::n], stats, self.cfg, spill if n == 1 else _part(spill, r))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            if stats is not None and n > 1:
                _merge([_part(spill, k) for k in range(n)], spill)
            _save(self._file(kind, i), out)
        self.state.wait_for_everyone()

    def _file(self, kind: str, i: int) -> Path:
        return self.d / kind / f"{i}.safetensors"

    def _done(self, kind: str, i: int, block: int) -> bool:
        """Whether `block` is finished: its output `kind`/{i} is on disk, and its spill (if it has targets)."""
        return self._file(kind, i).is_file() and (block not in self.blocks or self._file("spill", block).is_file())

    def _hooks(self, block, i: int, gradients: bool) -> StatsHooks | None:
        if i not in self.blocks:
            return None
        cut = len(self.bw.block_prefix(i))
        return StatsHooks({t.name: block.get_submodule(t.name[cut:]) for t in self.blocks[i]}, gradients)

    def forward(self) -> None:
        """acts/{i}: the inputs of block i; without gradients, the statistics and the spill too."""
        if not self._file("acts", 0).is_file() and self.state.is_main_process:
            _save(self._file("acts", 0), self.hidden)
        self.state.wait_for_everyone()
        grads = self.cfg.gradients
        for i in bar(range(self.bw.depth), desc=f"Calibration {self.what}: forward", unit="block",
                     progress=self.progress):
            if self._file("acts", i + 1).is_file() if grads else self._done("acts", i + 1, i):
                continue  # finished by an earlier run (--resume)
            hidden = _load(self._file("acts", i))
            with self.bw.block(i, self.tensors_of(i)) as block, torch.no_grad():
                hooks = None if grads else self._hooks(block, i, False)
                out = []
                for s, h in enumerate(hidden):
                    out.append(self.bw.run(block, h, self.extras[i][s]))
                    if hooks:
                        hooks.next_sequence()
            if hooks:
                hooks.remove()
            self._finish_block("acts", i + 1, hooks.stats() if hooks else None, i, out)

    def backward(self) -> None:
        """grads/{i}: the loss gradient of block i's inputs; the statistics (with gradients) and the spill."""
        top = self.bw.depth
        if not self._file("grads", top).is_file():
            grads = []
            if self.state.is_main_process:
                for s, h in enumerate(_load(self._file("acts", top))):
                    with torch.enable_grad():
                        h = h.requires_grad_()
                        grads.append(torch.autograd.grad(self.bw.head(h, self.ids[s], labels=True).loss, h)[0])
            self._finish_block("grads", top, None, top, grads)
        for i in bar(reversed(range(top)), total=top, desc=f"Calibration {self.what}: backward", unit="block",
                     progress=self.progress):
            if self._done("grads", i, i):
                continue
            hidden, g_out = _load(self._file("acts", i)), _load(self._file("grads", i + 1))
            g_in = []
            with self.bw.block(i, self.tensors_of(i)) as block:
                hooks = self._hooks(block, i, True)
                for s, h in enumerate(hidden):
                    with torch.enable_grad():
                        h = h.requires_grad_()
                        g_in.append(torch.autograd.grad(self.bw.run(block, h, self.extras[i][s]), h, g_out[s])[0])
                    if hooks:
                        hooks.next_sequence()
            if hooks:
                hooks.remove()
            self._finish_block("grads", i, hooks.stats() if hooks else None, i, g_in)


class _OneProcess:
    """The part of accelerate's PartialState the sweeps use, for a job in one process."""
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def _part(spill: Path, r: int) -> Path:
    return spill.with_name(f"{spill.stem}.part{r}.safetensors")


def _merge(parts: list[Path], path: Path) -> None:
    """The processes' shares of one block's spill as one file (what one process would have written)."""
    tensors, fps, seconds = {}, {}, 0.0
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            meta = f.metadata()
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
        fps.update(json.loads(meta["fingerprints"]))
        seconds += float(meta["svd_seconds"])
    write_shard(path, tensors, {"fingerprints": json.dumps(fps), "svd_seconds": str(seconds)})
    for part in parts:
        part.unlink()


def _save(path: Path, tensors: list[torch.Tensor]) -> None:
    write_shard(path, {str(s): t.detach().cpu() for s, t in enumerate(tensors)})


def _load(path: Path) -> list[torch.Tensor]:
    d = load_file(str(path))
    return [d[str(s)] for s in range(len(d))]


def target_weight(reader: ShardReader, t: Target, fingerprints: dict) -> torch.Tensor:
    """Target `t`'s weight as stored (out x in), checked finite; its fingerprint goes to `fingerprints`."""
    stored = reader.get(f"{t.name}.weight")
    w = stored.t() if t.kind == "conv1d" else stored
    if not torch.isfinite(w).all():
        raise WeloreError(f"weights of {t.name} contain NaN or Inf")
    fingerprints[t.name] = fingerprint(stored)
    return w


@torch.no_grad()
def spill_block(reader: ShardReader, targets: list[Target], stats: dict, cfg: CompressConfig, path: Path) -> None:
    """Factorise one block's targets with `cfg.method` and write what the plan and the output need:
    `.values` (the spectrum the rule reads), `.tails` (the loss allocation), `.down` / `.up` (the
    factors at the largest useful rank, as `LowRankLinear.from_svd` builds them, so any rank is a
    slice) and, for refit, `.wgat` / `.agat` (`refit_terms` at that rank)."""
    fac, tensors, fps, seconds = cfg.factorizer, {}, {}, 0.0
    for t in targets:
        w = target_weight(reader, t, fps)
        st, rank = stats[t.name], max_useful_rank(*t.shape)
        start = time.perf_counter()
        if fac.is_weight_svd:  # as `analyze(keep_factors=True)`
            U, values, Vh = truncated_svd(w, rank)
            factors = (U, values[: U.shape[1]], Vh)
        else:  # as `analyze_data_aware`
            U, s, Vh, _ = fac.decompose(w, st, rank)
            factors, values = (U.float().cpu(), s[: U.shape[1]].float().cpu(), Vh.float().cpu()), s.float().cpu()
        # the rule reads the data-aware spectrum when asked to, and always with loss tails (as `compress`)
        own = fac.is_weight_svd or cfg.alloc_spectrum == "data" or cfg.rule.needs_tails
        tensors[f"{t.name}.values"] = values if own else singular_values(w.float())
        seconds += time.perf_counter() - start
        if cfg.rule.needs_tails:
            tensors[f"{t.name}.tails"] = torch.from_numpy(loss_tail(fac, w, factors, values, st))
        if U.shape[1]:
            top = LowRankLinear.from_svd(*factors, U.shape[1], None, dtype=w.dtype)
            tensors[f"{t.name}.down"], tensors[f"{t.name}.up"] = top.down.weight, top.up.weight
            if cfg.refit:
                tensors[f"{t.name}.wgat"], tensors[f"{t.name}.agat"] = refit_terms(w, top.down.weight, st.gram)
    write_shard(path, tensors, {"fingerprints": json.dumps(fps), "svd_seconds": str(seconds)})
