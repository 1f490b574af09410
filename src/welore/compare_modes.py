"""`welore compare`: one fine-tuning run per mode on the same data, steps and seed, each in a fresh
process (so each mode's peak memory is its own), then one table and one plot side by side."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
from dataclasses import asdict, replace
from pathlib import Path

from .errors import WeloreError
from .files import atomic_dir
from .finetune_config import FinetuneConfig
from .io import read_meta
from .modes import MODES
from .progress import set_enabled
from .report import finetune_row, markdown_table, plot_loss_curves
from .train import finetune


def _finetune_in_child(model_dir, output, cfg: FinetuneConfig, device, progress: bool, budget=None) -> None:
    """compare's worker: a fresh process per mode, so each mode's peak memory is its own."""
    logging.basicConfig(level=logging.WARNING, format="welore: %(message)s")  # as the CLI does
    set_enabled(progress)
    try:
        finetune(model_dir, output, cfg, device=device, progress=progress, budget=budget)
    except WeloreError as e:
        print(f"welore: error: {e}", file=sys.stderr)
        sys.exit(2)


def mode_configs(cfg: FinetuneConfig, modes=tuple(MODES), lrs: dict[str, float] | None = None) -> dict[str, FinetuneConfig]:
    """Each mode's settings: `cfg` in that mode, at its own learning rate where `lrs` names one (full
    fine-tuning moves every weight and wants a lower rate than the factors or adapters do: on coin flip
    at 300 steps, 5e-5 where the others train well at 2e-4; docs/results/tasks.md). Built, and so
    checked, before any run starts."""
    lrs = dict(lrs or {})
    for m in (*modes, *lrs):
        if m not in MODES:
            raise WeloreError(f"unknown training mode {m!r}; choose from {', '.join(MODES)}")
    stray = sorted(set(lrs) - set(modes))
    if stray:
        raise WeloreError(f"a learning rate for {', '.join(stray)}, which is not among the modes run")
    return {m: replace(cfg, mode=m, lr=lrs.get(m, cfg.lr)) for m in modes}


def compare(model_dir: str | Path, output: str | Path, cfg: FinetuneConfig, modes=tuple(MODES), *,
            lrs: dict[str, float] | None = None, overwrite: bool = False, device=None,
            progress: bool = True, budget: float | None = None) -> list[dict]:
    """Fine-tune `model_dir` once per mode on the same data, steps and seed, each in a fresh process
    (so peak memory is each mode's own), and write one table and one plot side by side. `lrs`: a
    learning rate per mode, for the modes that should not train at `cfg.lr`; `budget`: of an elastic directory."""
    cfgs = mode_configs(cfg, modes, lrs)
    read_meta(Path(model_dir))
    rows, logs = [], {}
    spawn = multiprocessing.get_context("spawn")  # a clean interpreter: no memory or threads inherited
    with atomic_dir(output, overwrite) as tmp:
        for mode in modes:
            child = spawn.Process(target=_finetune_in_child,
                                  args=(str(model_dir), str(tmp / mode), cfgs[mode], device, progress, budget))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise WeloreError(f"the {mode} run failed (see its output above)")
            rec = json.loads((tmp / mode / "finetune.json").read_text())
            logs[mode] = rec["log"]
            rows.append({"mode": mode, "lr": cfgs[mode].lr, **finetune_row(mode, rec)})
        own = ", ".join(f"{m} {c.lr:g}" for m, c in cfgs.items() if c.lr != cfg.lr)
        savers = ", ".join(["activation checkpointing"] * cfg.activation_checkpointing
                           + [f"the loss in chunks of {cfg.loss_chunk}"] * bool(cfg.loss_chunk))
        savers = f" (savers: {savers})" if savers else ""
        header = (f"data {cfg.data}, {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum} sequences of <= {cfg.seqlen} "
                  f"tokens, lr {cfg.lr:g}{f' ({own})' if own else ''}, seed {cfg.seed}, "
                  f"memory: {rec['metrics']['memory_kind']}{savers}")
        (tmp / "compare.md").write_text(f"# welore compare: {model_dir}\n\n{header}\n\n{markdown_table(rows)}\n\n"
                                        "![loss](compare.png)\n")
        (tmp / "compare.json").write_text(json.dumps({"config": asdict(cfg), "lrs": {m: c.lr for m, c in cfgs.items()},
                                                      "rows": rows}, indent=1))
        plot_loss_curves(logs, tmp / "compare.png", title=f"{cfg.data}: training loss by mode")
    return rows
