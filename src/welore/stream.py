"""Compression block by block, straight from a checkpoint's safetensors shards: for models larger
than memory.

    welore compress MODEL_DIR --stream [--resume]

Nothing holds the whole model. WeLore's threshold is global, so the plan needs every spectrum
before any factor is final; this path decides it in two passes over the blocks:

1. **Spectra and spilled factors.** Per block (a transformer layer: the targets sharing a layer
   index), read each target weight with `safe_open`, take its one fp32 SVD, keep its singular values
   (kilobytes), and spill its factors to disk at the largest rank that could ever be an LRC
   (k(m+n) < mn), already scaled and cast to the checkpoint's dtype, which is what
   `LowRankLinear.from_svd` does for any rank: truncating the spilled factors later gives, bit for
   bit, the factors the in-memory path builds. The spill is never larger than the weights.
2. **Plan, then shards.** The rule allocates ranks from all the spectra (the same `allocate`). Per
   block again, each LRC's spilled factors are cut to its rank, every other tensor is copied, and
   the block is written as one output shard; then the non-block tensors (embeddings, final norm,
   head) as the last shard, and the index.

Memory: one block's weights in fp32, its SVD work and its factors, whatever the depth. Time: one SVD
per matrix (the floor) plus reading and writing the checkpoint twice. Work happens in
`.{output}.partial/`; a spill file or a shard appears whole or not at all, so `--resume` continues
a killed job from its last finished block and gives the same bytes. Under `torchrun` or
`accelerate launch` with N processes, process r takes blocks r, r+N, ... in both passes (the spill and
shard files are the handoff) and process 0 writes the index and the metadata: the same output.

Calibrated settings (asvd, whiten, whiten-fisher, refit, the loss allocation, several passes) replace
pass 1 by welore.sequential: the calibration sequences flow through the blocks one at a time and
each block is factorised from its own statistics, then spilled the same way; pass 2 is unchanged.
Activations flow from block to block, so under a launcher every process runs the sweeps and each
factorises its share of every block's targets.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

from .allocate import RankPlan, allocate
from .config import CompressConfig
from .costs import CostModel, for_shapes
from .device import PeakMemory, pick_device, process_memory
from .errors import WeloreError, one_line
from .factorize import refit_solve
from .files import check_output
from .io import build_skeleton, read_tokenizer, versions, write_metadata
from .layers import LowRankLinear
from .progress import bar
from .sequential import spill_calibrated, target_weight
from .shards import ShardReader, shard_name, write_index, write_shard
from .spectrum import Spectra, max_useful_rank, truncated_svd, truncated_svds
from .targets import Target, find_targets, layer_of


@dataclass
class StreamResult:
    output: Path
    plan: RankPlan
    metrics: dict
    rank: int = 0  # this process' index when several share the job

    def summary(self) -> str:
        m = self.metrics
        return (f"{self.plan.summary()}\n\n{m['blocks']} blocks in {m['seconds']:.1f} s ({m['svd_seconds']:.1f} s "
                f"of SVD); peak RSS {m['peak_memory_gib']:.2f} GiB; checkpoint {m['source_bytes'] / 2**30:.2f} GiB "
                f"-> {m['output_bytes'] / 2**30:.2f} GiB in {m['shards']} shards\nwrote {self.output}/ "
                "(model-*.safetensors + index, welore.json, modeling_welore.py, stream.json)")


def compress_streaming(source: str | Path, output: str | Path, cfg: CompressConfig, *, resume: bool = False,
                       overwrite: bool = False, device=None, progress: bool = True) -> StreamResult:
    """Compress the model directory `source` into `output` block by block (see module docstring).
    `device`: where the data-free SVDs run (default: this process' accelerator under a launcher, CUDA
    when present, else the CPU); calibrated settings run on the CPU."""
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise WeloreError(f"streaming compression reads a model directory with safetensors weights; {source} is not one")
    check_output(output, overwrite)
    tokenizer = read_tokenizer(source) if cfg.calibrated else None
    if cfg.calibrated and tokenizer is None:
        raise WeloreError(f"calibration needs a tokenizer, and {source} has none")
    reader = ShardReader(source)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception as e:
        raise WeloreError(f"{source}: cannot read config.json: {one_line(e)}") from e
    skeleton = build_skeleton(config)  # meta weights: the names and shapes of the targets
    reader.name_as(skeleton)
    missing = reader.missing(skeleton)
    if missing:
        raise WeloreError(f"{source} has no tensor {missing[0]} (a shard left out of the index, or checkpoint "
                          f"names that do not match the model's)")
    targets = find_targets(skeleton, cfg.targets, cfg.ignore)
    blocks: dict[int | None, list[Target]] = defaultdict(list)
    for t in targets:
        blocks[t.layer].append(t)
    order = sorted(k for k in blocks if k is not None) + ([None] if None in blocks else [])
    keys: dict[int | None, list[str]] = defaultdict(list)
    for k in reader.keys():
        keys[layer_of(k) if layer_of(k) in blocks else None].append(k)
    shards = order + ([] if None in blocks else [None])  # the non-block tensors go last

    work = output.with_name(f".{output.name}.partial")
    job = {"source": str(source.resolve()), "config": cfg.to_dict(), "versions": versions()}
    # under torchrun / accelerate launch, process r takes blocks r, r+N, ...; the files are the handoff
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    _check(work, job, resume, overwrite)
    state.wait_for_everyone()
    if rank == 0:
        _prepare(work, job, resume)
    state.wait_for_everyone()
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        costs = _costs(cfg, targets, reader, work, state, device, progress)

        def allocate_from(spectra: Spectra) -> RankPlan:
            return allocate(spectra, ratio=cfg.ratio, target=cfg.target, allocation=cfg.allocation,
                            min_ratio=cfg.min_ratio, threshold=cfg.threshold, costs=costs)

        def plan_of(spill: Path) -> RankPlan:
            return allocate_from(_read_spectra(targets, blocks, order, spill))

        if cfg.calibrated:
            spill = spill_calibrated(reader, config, blocks, keys, cfg, work, tokenizer, plan_of,
                                     block_state, progress, state)
        else:
            spill = work / "spill"
            _spill_blocks(reader, blocks, order[rank::world], spill, progress and rank == 0,
                          state.device if device is None else pick_device(device))
        state.wait_for_everyone()
        spectra = _read_spectra(targets, blocks, order, spill)
        plan, svd_s = allocate_from(spectra), spectra.seconds
        mine = [(i, b) for i, b in enumerate(shards) if i % world == rank]
        _write_pass(reader, plan, blocks, keys, mine, len(shards), spill, work, progress and rank == 0)
        state.wait_for_everyone()
    written = [work / shard_name(i, len(shards)) for i in range(len(shards))]
    metrics = {"seconds": time.perf_counter() - t0, "svd_seconds": svd_s, **mem.report(), "processes": world,
               "source_bytes": sum(p.stat().st_size for p in reader.files()),
               "output_bytes": sum(p.stat().st_size for p in written), "blocks": len(order),
               "shards": len(shards), "memory_kind": "peak RSS during compression (process 0)",
               **{k: v for k, v in process_memory().items() if k.startswith("cuda")}}  # SVDs on a GPU
    state.wait_for_everyone()  # every process has read `work` before process 0 renames it
    if rank == 0:
        _finish(source, output, work, config, plan, cfg, len(shards), metrics)
    state.wait_for_everyone()
    return StreamResult(output, plan, metrics, rank)


def _costs(cfg: CompressConfig, targets: list[Target], reader: ShardReader, work: Path, state, device,
           progress: bool) -> CostModel | None:
    """With cfg.speed, the cost model: timed by process 0 where it computes, in the checkpoint's dtype
    (one matrix read to learn it), and handed to the others through `work`, so every process plans
    with the same costs (several timing at once would disturb each other, and could disagree)."""
    if not cfg.speed:
        return None
    where = work / "costs.json"
    if state.process_index == 0:
        costs = for_shapes([t.shape for t in targets], state.device if device is None else pick_device(device),
                           reader.get(f"{targets[0].name}.weight").dtype, progress=progress)
        where.write_text(json.dumps(costs.to_dict()))
    state.wait_for_everyone()
    return CostModel.from_dict(json.loads(where.read_text()))


def _finish(source: Path, output: Path, work: Path, config, plan: RankPlan, cfg: CompressConfig, total: int,
            metrics: dict) -> None:
    """The index, the metadata, and the rename that makes the output appear."""
    write_index(work, total)
    tok = read_tokenizer(source)
    settings = {"source": str(source), "name": source.name, **cfg.to_dict(), "stream": True}
    write_metadata(build_skeleton(config, plan), work, plan, tokenizer=tok, base_model=str(source), settings=settings)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", work)
    for scratch in work.iterdir():
        if scratch.is_dir():
            shutil.rmtree(scratch)  # spills, activations, gradients
    (work / "job.json").unlink()
    (work / "costs.json").unlink(missing_ok=True)  # plan.speed in welore.json records what was used
    (work / "stream.json").write_text(json.dumps(metrics, indent=1))
    if output.exists():
        shutil.rmtree(output)  # check_output allowed it: --overwrite
    work.rename(output)


def _check(work: Path, job: dict, resume: bool, overwrite: bool) -> None:
    if work.exists():
        saved = json.loads((work / "job.json").read_text()) if (work / "job.json").is_file() else None
        if resume and saved != job:
            raise WeloreError(f"{work} holds another job (other source, settings or versions); cannot resume it")
        if not resume and not overwrite:
            raise WeloreError(f"{work} holds an unfinished job: --resume to continue it, --overwrite to restart")
    elif resume:
        raise WeloreError(f"nothing to resume: no {work}")


def _prepare(work: Path, job: dict, resume: bool) -> None:
    if work.exists() and not resume:
        shutil.rmtree(work)  # --overwrite
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job, indent=1))


def _spill_blocks(reader: ShardReader, blocks, mine, spill: Path, progress: bool, device) -> None:
    """Pass 1: singular values, fingerprints and spilled factors of this process' blocks. On the CPU one
    matrix at a time, so one matrix's fp32 factors are alive, not the block's (7B shape: ~1.2 GB); on
    CUDA the block's matrices of one shape go through one batched SVD."""
    spill.mkdir(exist_ok=True)
    for b in bar(mine, desc="Pass 1/2: SVD per block", unit="block", progress=progress):
        path = spill / f"{b}.safetensors"
        if path.is_file():
            continue  # finished by an earlier run (--resume)
        tensors, fingerprints, block_s = {}, {}, 0.0
        ranks = [max_useful_rank(*t.shape) for t in blocks[b]]
        if device.type == "cuda":
            ws = [target_weight(reader, t, fingerprints) for t in blocks[b]]
            start = time.perf_counter()
            svds = truncated_svds(ws, ranks, device)
            block_s = time.perf_counter() - start
        for j, t in enumerate(blocks[b]):
            if device.type == "cuda":
                w, (U, S, Vh) = ws[j], svds[j]
            else:
                w = target_weight(reader, t, fingerprints)
                start = time.perf_counter()
                U, S, Vh = truncated_svd(w, ranks[j])  # the in-memory path's call: the same bits
                block_s += time.perf_counter() - start
            tensors[f"{t.name}.values"] = S
            if U.shape[1]:  # scaled and cast as from_svd does, so any rank is a slice of these
                top = LowRankLinear.from_svd(U, S, Vh, U.shape[1], None, dtype=w.dtype)
                tensors[f"{t.name}.down"], tensors[f"{t.name}.up"] = top.down.weight, top.up.weight
            del U, Vh, w  # before the next matrix's SVD
        write_shard(path, tensors, {"fingerprints": json.dumps(fingerprints), "svd_seconds": str(block_s)})


def _read_spectra(targets: list[Target], blocks, order, spill: Path) -> Spectra:
    """Every block's spilled spectra (with loss tails when spilled) and fingerprints; the seconds are
    the SVD time summed over blocks."""
    values, fps, tails, seconds = {}, {}, {}, 0.0
    for b in order:
        with safe_open(str(spill / f"{b}.safetensors"), framework="pt") as f:
            meta, names = f.metadata(), set(f.keys())
            for t in blocks[b]:
                values[t.name] = f.get_tensor(f"{t.name}.values")
                if f"{t.name}.tails" in names:
                    tails[t.name] = f.get_tensor(f"{t.name}.tails").numpy()
        fps.update(json.loads(meta["fingerprints"]))
        seconds += float(meta["svd_seconds"])
    return Spectra(targets, values, fps, {}, seconds, tails=tails)


def _write_pass(reader: ShardReader, plan: RankPlan, blocks, keys, mine, total: int, spill: Path, work: Path,
                progress: bool) -> None:
    """Pass 2: one output shard per block (LRCs cut from the spill, the rest copied), then the rest."""
    lrc = {m.name: m for m in plan.lrcs}
    for i, b in bar(mine, desc="Pass 2/2: writing shards", unit="shard", progress=progress):
        path = work / shard_name(i, total)
        if not path.is_file():  # else written by an earlier run (--resume)
            state = load_file(str(spill / f"{b}.safetensors")) if b in blocks else {}
            # metadata {"format": "pt"} only: safetensors orders several keys at random
            write_shard(path, block_state(reader, lrc, blocks.get(b, []), keys[b], state))


def block_state(reader: ShardReader, lrc: dict, targets: list[Target], keys: list[str], spill: dict) -> dict:
    """The compressed tensors of one block: each LRC's factors cut from its spill to the planned rank
    (`up` refitted when the spill has refit terms), every other tensor as stored."""
    out = {}
    factored = {t.name for t in targets if t.name in lrc}
    for k in keys:
        name, _, what = k.rpartition(".")
        if name not in factored:
            out[k] = reader.get(k)
        elif what == "weight":
            r = lrc[name].alloc_rank
            out[f"{name}.down.weight"] = down = spill[f"{name}.down"][:r]
            out[f"{name}.up.weight"] = spill[f"{name}.up"][:, :r] if f"{name}.wgat" not in spill else \
                refit_solve(spill[f"{name}.wgat"][:, :r], spill[f"{name}.agat"][:r, :r]).to(down.dtype)
        else:  # an LRC's bias lives on its up factor
            out[f"{name}.up.{what}"] = reader.get(k)
    return out
