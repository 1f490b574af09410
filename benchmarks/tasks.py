"""Downstream tasks that can be learnt: train on a task's train split, score >= 300 held-out examples,
and say which differences are real (outside the 95% binomial intervals).

Models: the dense default (written by `welore compress --threshold 0`: every matrix kept dense, so it
fine-tunes through the same code) trained in full, and the paper's setting (WeLore svd, 50% effective
rank reduction, min_ratio 0.5) and the 20% recipe after its 20 minutes of recovery (`recipe20r`), each
in every mode: lrc / full / lora (rank matched) / galore. Same examples, steps, lr (full fine-tuning's
own with --full-lr) and seed for every run, each in its own process (`welore.compare_modes`). Accuracy: the option
with the highest summed log-probability (welore.evaluate.task_accuracy), before and after training,
with its Wilson 95% interval. No keep-best guard by default; `--keep-best` turns it on, judged every
fifth of the run on validation examples set aside from the train split (`--val-examples`, at most a
fifth of it), never on the held-out examples reported.

    python benchmarks/tasks.py                       # coin flip + date, 100 steps (~10 min a run on 2 cores)
    python benchmarks/tasks.py --tasks coinflip --runs paper50-full paper50-lora
    python benchmarks/tasks.py --tasks boolq --runs dense-full recipe20r-lrc
    python benchmarks/tasks.py --tasks coinflip --seed 1 --report    # the finished runs again, no training
    python benchmarks/tasks.py --tasks coinflip --runs recipe20r-lrc --keep-best   # returns its best validated step
    python benchmarks/tasks.py --tasks coinflip --keep-best --steps 300 --full-lr 5e-5 --seed 1   # full at its own lr

Each run is kept in `WORK/tasks/TASK/RUN/` and reused while its settings are the same, so the runs can
be done a few at a time; `tasks.json` gathers every finished run of each task.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from recovery import MODELS, OLD_GALORE_SCALE, compressed

from welore import FinetuneConfig
from welore.compare_modes import compare, mode_configs
from welore.errors import WeloreError
from welore.files import atomic_file
from welore.report import returned_eval
from welore.trainer import task_data

MODELS["dense"] = ["--threshold", "0"]  # nothing dropped: the dense model as a welore directory
# The 20% recipe after its 20 minutes of LRC-only recovery on C4: a compressed model with its language
# back (WikiText-2 1.47x dense), where paper50 has none left. Made by benchmarks/recovery.py.
RECOVERED = {"recipe20r": ("runs/recipe20-lrc-lm-20min", "python benchmarks/recovery.py --runs recipe20-lrc-lm "
                                                          "--minutes 20")}
MODES = ("lrc", "full", "lora", "galore")
LR = 2e-4  # one learning rate for every mode, unless --lr says otherwise
STEPS = 100
RUNS = [("dense", "full")] + [(m, mode) for m in ("paper50", "recipe20r") for mode in MODES]
NAMES = [f"{m}-{mode}" for m, mode in RUNS]


def model_dir(work: Path, model: str) -> Path:
    """The welore directory a run starts from: compressed here, or a recovered one benchmarks/recovery.py made."""
    if model not in RECOVERED:
        return compressed(work, model)
    path, command = RECOVERED[model]
    if not (work / path / "welore.json").is_file():
        raise SystemExit(f"{model} is not in {work / path}: make it first with `{command} --work {work}`")
    return work / path


def variant(cfg: FinetuneConfig) -> str:
    """How a run's settings differ from the defaults, as a name suffix: '', '-seed1', '-lr5e-05',
    '-steps300', '-keepbest50', '-gscale1' (a GaLore run at a --galore-scale other than 0.25, the scale of the runs
    made before the flag existed, which keep their names), ..."""
    return ((f"-seed{cfg.seed}" if cfg.seed else "") + (f"-lr{cfg.lr:g}" if cfg.lr != LR else "")
            + (f"-steps{cfg.steps}" if cfg.steps != STEPS else "")  # never overwrite the 100-step runs
            + (f"-keepbest{cfg.val_examples}" if cfg.keep_best else "")
            + (f"-gscale{cfg.galore_scale:g}" if cfg.mode == "galore" and cfg.galore_scale != OLD_GALORE_SCALE else ""))


def run_dir(work: Path, task: str, model: str, cfg: FinetuneConfig) -> Path:
    """Where the run of `model` in mode `cfg.mode` is kept."""
    return work / "tasks" / task / f"{model}-{cfg.mode}{variant(cfg)}"


def finished(work: Path, task: str, model: str, cfg: FinetuneConfig) -> dict | None:
    """The run's finetune.json if it was made with the settings it reads (so --galore-scale never hides
    another mode's run)."""
    done = run_dir(work, task, model, cfg) / cfg.mode / "finetune.json"
    rec = json.loads(done.read_text()) if done.is_file() else None
    return rec if rec and cfg.same_settings(rec["config"]) else None


def run_once(work: Path, task: str, model: str, cfg: FinetuneConfig) -> None:
    """Train the run (in its own process, through welore.compare_modes) unless it is finished already."""
    if finished(work, task, model, cfg) is None:
        t = time.perf_counter()
        compare(model_dir(work, model), run_dir(work, task, model, cfg), cfg, [cfg.mode], overwrite=True, progress=False)
        print(f"{task} {model}-{cfg.mode}: {time.perf_counter() - t:.0f} s", flush=True)


def baselines(ev: list) -> dict:
    """What needs no training, on the held-out examples `ev`: chance (a uniform guess over each
    example's options) and the best constant answer (always the same option text, e.g. always " yes")."""
    answer, count = Counter(ex.options[ex.answer] for ex in ev).most_common(1)[0]
    return {"chance": sum(1 / len(ex.options) for ex in ev) / len(ev), "constant": count / len(ev),
            "constant_answer": answer}


def verdicts(rows: list[dict], base: dict) -> list[str]:
    """Which accuracies are outside chance and the best constant answer, and which pairs differ
    (disjoint intervals)."""
    def side(lo: float, hi: float, x: float) -> str:
        return "above" if lo > x else "below" if hi < x else "not distinguishable from"

    out = []
    for r in rows:
        lo, hi = r["ci95"]
        out.append(f"{r['run']}: {r['after']:.3f} [{lo:.3f}, {hi:.3f}] is {side(lo, hi, base['chance'])} chance "
                   f"({base['chance']:.3f}) and {side(lo, hi, base['constant'])} always answering "
                   f"{base['constant_answer']!r} ({base['constant']:.3f})")
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["ci95"][0] > b["ci95"][1] or b["ci95"][0] > a["ci95"][1]:
                better, worse = (a, b) if a["after"] > b["after"] else (b, a)
                out.append(f"{better['run']} > {worse['run']} (intervals disjoint)")
    return out


def run_configs(a: argparse.Namespace, task: str) -> dict[str, FinetuneConfig]:
    """Each mode's settings on `task`: the shared ones, with full fine-tuning at its own learning rate when
    --full-lr is given (moving all weights at the rate that suits low-rank factors or adapters can undo
    what full fine-tuning learns: docs/results/tasks.md, coin flip at 300 steps), as `welore compare --mode-lr` does."""
    cfg = FinetuneConfig(data=task, steps=a.steps, batch_size=a.batch_size, seqlen=256, lr=a.lr,
                         warmup=max(1, a.steps // 10), eval_examples=a.eval_examples, save_every=0,
                         keep_best=a.keep_best, val_examples=a.val_examples,
                         eval_every=max(1, a.steps // 5) if a.keep_best else 0, seed=a.seed,
                         galore_scale=a.galore_scale)
    return mode_configs(cfg, MODES, None if a.full_lr is None else {"full": a.full_lr})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/recovery")
    ap.add_argument("--tasks", nargs="+", default=["coinflip", "date"])
    ap.add_argument("--runs", nargs="+", default=NAMES, choices=NAMES)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--full-lr", type=float, default=None,
                    help="full fine-tuning's learning rate (default: --lr, the rate every mode shares)")
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0,
                    help="the train/held-out split and the training order (a replicate: a new split, not new examples)")
    ap.add_argument("--keep-best", action="store_true",
                    help="return the weights of the best of 6 evaluations (every fifth of the run) on validation examples set aside from the "
                         "train split (never on the held-out examples reported)")
    ap.add_argument("--val-examples", type=int, default=50, help="with --keep-best (at most a fifth of the train split)")
    ap.add_argument("--galore-scale", type=float, default=FinetuneConfig.galore_scale,
                    help="GaLore's update scale: its matrices move lr x scale per step (1: the other modes' step)")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: print (and gather into tasks.json) the runs already finished with these settings")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    try:  # a bad setting (--lr, --full-lr, a task name, ...) is one line, before any task's run starts
        configs = {task: run_configs(a, task) for task in a.tasks}
    except WeloreError as e:
        ap.error(str(e))
    for task, cfgs in configs.items():
        train, val, ev = task_data(cfgs["lrc"])  # the same split for every mode
        for name in [] if a.report else a.runs:
            model, mode = RUNS[NAMES.index(name)]
            run_once(work, task, model, cfgs[mode])
        rows = []
        for name, (model, mode) in zip(NAMES, RUNS):  # every finished run of this task, not only this call's
            if (rec := finished(work, task, model, cfgs[mode])) is None:
                continue
            first, m = rec["evals"][0], rec["metrics"]
            last = returned_eval(rec["evals"], m["returned_step"])  # the weights the run returned
            rows.append({"run": name, "before": first["accuracy"], "after": last["accuracy"],
                         "ci95_before": first["ci95"], "ci95": last["ci95"], "examples": last["examples"],
                         "returned_step": m["returned_step"], "last_step": rec["evals"][-1].get("accuracy"),
                         "trainable": m["trainable_params"], "tokens_per_s": m["tokens_per_s"],
                         "train_s": m["train_seconds"]})
        # the table's GaLore row is at --galore-scale and its full rows at --full-lr: say which
        key = task + variant(cfgs["galore"]) + (f"-fulllr{a.full_lr:g}" if a.full_lr is not None else "")
        if not rows:  # --report before any run of these settings finished: nothing to gather
            print(f"{key}: no finished runs in {work / 'tasks' / task} with these settings")
            continue
        base = baselines(ev)
        entry = {"train_examples": len(train), "val_examples": len(val), "eval_examples": len(ev), **base, "rows": rows,
                 "verdicts": verdicts(rows, base)}
        print(f"\n## {key}: {len(train)} train / {len(val)} validation / {len(ev)} held-out examples, "
              f"{a.steps} steps x {a.batch_size}, lr {a.lr:g}" + (f" (full {a.full_lr:g})" if a.full_lr is not None else ""))
        for r in rows:
            print(f"{r['run']:16s} before {r['before']:.3f} after {r['after']:.3f} "
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (step {r['returned_step']}; last step "
                  f"{r['last_step']:.3f})  trainable {r['trainable']:>11,}")
        print("\n".join(entry["verdicts"]), flush=True)
        # re-read just before writing, so another task or seed run at the same time keeps its results
        results = json.loads((work / "tasks.json").read_text()) if (work / "tasks.json").is_file() else {}
        results["args"], results[key] = vars(a), entry
        with atomic_file(work / "tasks.json") as tmp:
            tmp.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
