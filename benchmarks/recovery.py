"""Recovery after compression: does training only the LRC factors, with or without distillation from
the dense teacher, make the compressed default usable again, and how do the modes rank?

Two compressed SmolLM2-135M models (the embedded default), each written once:
  paper50   WeLore as published: svd, 50% effective rank reduction, min_ratio 0.5
  recipe30  the calibrated recipe: loss allocation + whiten-fisher at 30% parameter reduction
  recipe20  the same at 20%
Runs, each `welore finetune` in its own process, nothing else on the CPU, on the same C4 training
tokens (the batch of step s depends on (seed, s) only), with the same schedule:
  (a) paper50: lrc / full / lora (rank matched to lrc's trainable parameters) / galore, each with
      the LM loss and with distillation (`--teacher`, KL at temperature 2)
  (b) recipe30 (and recipe20): lrc with distillation and without, and with half of each (`--kd-weight
      0.5`, "mix"); `--kd-temperature` other than 2 is kept apart (`-T1` in the run key and cache name)
  (c) {paper50,recipe30,recipe20}-lorafactors-lm: LoRA on the LRC factors only (`--lora-targets`), rank matched again
  (d) recipe20 / recipe30-lrc-wiki: the recovery recipe on Wikipedia text instead of C4 (`--data FILE`):
      the passages of BoolQ's training split, written by `wiki_passages` (see there for the checks)
Held-out WikiText-2 and C4 perplexity every `--eval-every` steps (windows of the training seqlen,
`--eval-tokens` each; the dense model is measured on the same windows), as curves in one PNG, and per
run: trainable parameters, peak RSS (the process' own), tokens/s of the training steps, wall time.

Distillation runs share one teacher cache (`--teacher-cache`, built by the first of them) unless
`--no-cache`: every run trains on the same batches, so the teacher's answers are computed once.

    python benchmarks/recovery.py --sweep                    # lr x warmup on a short budget (~15 min)
    python benchmarks/recovery.py --mode-sweep lrc lora      # each mode's own lr on paper50, LM loss, 100 steps
    python benchmarks/recovery.py --speed                    # tokens/s and peak RSS per mode, teacher in the
                                                             # loop vs cached (30 steps each, ~15 min)
    python benchmarks/recovery.py --speed 100 --speed-modes lrc full lora --batch-size 8 --seqlen 512
                                          # some modes only, LM loss (on a GPU: CUDA peak memory too)
    python benchmarks/recovery.py --speed 4 --speed-modes lrc full --speed-savers --batch-size 8 --seqlen 512
                                          # each also with activation checkpointing and the chunked loss
                                          # (add kd to --speed-modes: distillation too)
    python benchmarks/recovery.py                            # (a) + (b) at 500 steps (see docs/results/recovery.md)
    python benchmarks/recovery.py --runs recipe30-lrc-kd     # some runs only
    python benchmarks/recovery.py --runs recipe20-lrc-lm recipe30-lrc-lm --minutes 20
                                          # the recipe for 20 minutes of training each
    python benchmarks/recovery.py --runs recipe20-lrc-wiki recipe30-lrc-wiki --minutes 20
                                          # the same on Wikipedia text
    python benchmarks/recovery.py --runs recipe20-lorafactors-lm recipe20-lrc-lm --minutes 20 --seqlen 512 --batch-size 1
                                          # LoRA on the factors vs the factors, 20 minutes at 1 x 512 each
    python benchmarks/recovery.py --runs recipe20-lrc-kd --steps 264 --seqlen 512 --batch-size 1 --eval-every 52 \
        --kd-temperature 1                # distillation at T = 1 on the tokens of the 20-minute lrc run above
    python benchmarks/recovery.py --runs paper50-galore-lm --galore-scale 0.25
                                          # GaLore at a quarter of the other modes' step (welore's default until stop 28)
    python benchmarks/recovery.py --runs recipe30-lrc-lm --minutes 1.2 --batch-size 8 --seqlen 512 --eval-tokens 32768
                                          # on a GPU (docs/results/recovery.md, stop 32): judged on the --full-eval sample below
    python benchmarks/recovery.py --full-eval recipe20-lrc-lm-20min recipe30-lrc-lm-20min
                                          # finished runs (and dense, and their compressed starts) on
                                          # 32,768 tokens of WikiText-2 test and held-out C4, seqlen 512
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from scale import run as welore  # (wall s, peak RSS GiB) of `welore ARGS` in a fresh process

from welore.files import atomic_file
from welore.finetune_config import FinetuneConfig

MODELS = {
    "paper50": ["--ratio", "0.5", "--min-ratio", "0.5"],
    "recipe30": ["--param-ratio", "0.3", "--allocation", "loss", "--method", "whiten-fisher"],
    "recipe20": ["--param-ratio", "0.2", "--allocation", "loss", "--method", "whiten-fisher"],
}
KD = {"lm": 0.0, "kd": 1.0, "mix": 0.5}  # the loss: --kd-weight of the distillation term (0: no teacher)
RUNS = {f"paper50-{mode}-{loss}": ("paper50", mode, KD[loss])
        for mode in ("lrc", "full", "lora", "galore") for loss in ("lm", "kd")}
RUNS.update({f"{model}-lrc-{loss}": (model, "lrc", KD[loss]) for model in ("paper50", "recipe30", "recipe20") for loss in KD})
# LoRA on the LRC factors only (no dense N-LRC), rank matched again: does LoRA beat lrc by adapting
# the matrices lrc leaves frozen, or by how it parametrises the update?
RUNS.update({f"{model}-lorafactors-lm": (model, "lora", 0.0) for model in ("paper50", "recipe30", "recipe20")})
EXTRA = {name: ["--lora-targets", r"\.(down|up)$"] for name in RUNS if "-lorafactors-" in name}
# the recipe on Wikipedia text: is the WikiText-2 gap C4's domain, or the compression?
RUNS.update({f"{model}-lrc-wiki": (model, "lrc", 0.0) for model in ("recipe20", "recipe30")})
# welore's GaLore scale until stop 28 (now 1): the GaLore runs made at it keep their keys, others get
# a suffix (-gscale1)
OLD_GALORE_SCALE = 0.25
BOOLQ_HELD_OUT = 300  # the BoolQ examples benchmarks/tasks.py scores (seed 0): their passages are never trained on


def wiki_passages(work: Path) -> Path:
    """Wikipedia text for recovery: the passages of BoolQ's training split, the shared data's only
    Wikipedia text besides WikiText-2 test (the evaluation text). Left out: every passage of the
    examples benchmarks/tasks.py holds out for BoolQ (the split of welore.tasks.task_splits, seed 0).
    Refused: any passage from an article that WikiText-2 test also holds (by title; there are none)."""
    out = work / "boolq-train-passages.txt"
    if out.is_file():
        return out
    from welore.data import corpus_path, data_dir
    from welore.tasks import task_splits

    rows = [json.loads(line) for line in (data_dir() / "tasks" / "boolq" / "boolq_dev.jsonl").open()]
    # a held-out prompt starts with its passage (cut to a length), then "\nQuestion: "
    held_out = [e.prompt.rsplit("\nQuestion: ", 1)[0] for e in task_splits("boolq", 0, BOOLQ_HELD_OUT)[1]]
    held_out = {r["passage"] for r in rows if any(r["passage"].startswith(p) for p in held_out)}
    wt2 = corpus_path("wikitext2").read_text(encoding="utf-8")
    wt2_titles = {t.strip().lower() for t in re.findall(r"^ = ([^=].*?) = \s*$", wt2, re.M)}
    passages = list(dict.fromkeys(r["passage"] for r in rows if r["passage"] not in held_out))
    shared = {r["title"] for r in rows if r["title"].lower() in wt2_titles}
    if shared:
        raise SystemExit(f"BoolQ passages from WikiText-2 test articles: {sorted(shared)}")
    tmp = out.with_suffix(".partial")
    tmp.write_text("\n\n".join(passages), encoding="utf-8")
    tmp.rename(out)
    print(f"wrote {out}: {len(passages):,} passages of {len(rows) - BOOLQ_HELD_OUT:,} BoolQ training examples, "
          f"{sum(len(p.split()) for p in passages):,} words; WikiText-2 test has {len(wt2_titles)} articles, none "
          "of them among the passages' titles", flush=True)
    return out


FULL_EVAL_TOKENS = 32768  # 16x the runs' own evaluations; all of WikiText-2 test would take ~7 min a model


def full_eval(work: Path, keys: list[str], results: dict) -> dict:
    """The returned models of finished runs, their compressed starts and the dense model on the first
    32,768 tokens of WikiText-2 test and of held-out C4 at seqlen 512: the runs' own evaluations see
    2,048 tokens at seqlen 128, and WikiText-2's first 2,048 are a single article."""
    done = results.setdefault("full_eval", {})
    todo = {"dense": None}
    for key in keys:
        if key not in results.get("runs", {}):
            raise SystemExit(f"no finished run {key} in {work / 'recovery.json'}")
        model = results["runs"][key]["model"]
        todo[model], todo[key] = compressed(work, model), work / "runs" / key
    for name, path in todo.items():
        if name in done:
            continue
        ppl, wall = evaluated(work / "full-eval" / f"{name}.json", path, 512, FULL_EVAL_TOKENS)
        done[name] = {**ppl, "wall_s": wall}
        print(f"{name:28s} wikitext2 {ppl['wikitext2_ppl']:8.2f} ({ppl['wikitext2_ppl'] / done['dense']['wikitext2_ppl']:.2f}x)"
              f"  c4 {ppl['c4_ppl']:7.2f} ({ppl['c4_ppl'] / done['dense']['c4_ppl']:.2f}x)", flush=True)
        save(work, results)
    return done


def save(work: Path, results: dict) -> None:
    """recovery.json, written whole or not at all (partial results survive a killed run)."""
    with atomic_file(work / "recovery.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def extra_args(work: Path, name: str, galore_scale: float | None = None) -> list[str]:
    """A run's flags beyond the common ones (`galore_scale`: a GaLore run's, None for the others)."""
    gscale = [] if galore_scale is None else ["--galore-scale", f"{galore_scale:g}"]
    return EXTRA.get(name, []) + (["--data", str(wiki_passages(work))] if name.endswith("-wiki") else []) + gscale


def compressed(work: Path, name: str) -> Path:
    out = work / name
    if not (out / "welore.json").is_file():
        welore(["compress", *MODELS[name], "-o", str(out), "--no-compare", "--no-eval", "--overwrite", "-q"])
    return out


def evaluated(out: Path, model: Path | None, seqlen: int, tokens: int) -> tuple[dict, float | None]:
    """WikiText-2 and held-out C4 perplexity of `model` (None: the dense default) by `welore evaluate`
    in its own process, written to `out`; an `out` left by an earlier call is read back, not redone.
    Returns ({corpus}_ppl, wall seconds, or None when read back)."""
    wall = None
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        wall, _ = welore(["evaluate", *([str(model)] if model else []), "--corpus", "wikitext2", "c4",
                          "--seqlen", str(seqlen), "--max-tokens", str(tokens), "-q", "-o", str(out)])
    return {f"{r['corpus']}_ppl": r["ppl"] for r in json.loads(out.read_text())["results"]}, wall


def dense_ppl(work: Path, seqlen: int, tokens: int) -> dict:
    return evaluated(work / f"dense-ppl-{seqlen}-{tokens}.json", None, seqlen, tokens)[0]


def finetune(work: Path, name: str, model: str, mode: str, kd: float, a, lr: float, warmup: int, steps: int,
             cache: Path | None = None, extra: tuple[str, ...] = ()) -> dict:
    out = work / "runs" / name
    args = ["finetune", str(compressed(work, model)), "-o", str(out), "--train", mode, "--steps", str(steps),
            "--batch-size", str(a.batch_size), "--seqlen", str(a.seqlen), "--lr", str(lr), "--warmup", str(warmup),
            "--eval-every", str(a.eval_every), "--eval-tokens", str(a.eval_tokens), "--save-every", "0",
            "--overwrite", "-q", *(["--teacher", "--kd-weight", str(kd), "--kd-temperature", str(a.kd_temperature)] if kd else []),
            *(["--teacher-cache", str(cache)] if cache else []), *extra]
    wall, rss = welore(args)
    rec = json.loads((out / "finetune.json").read_text())
    m = rec["metrics"]
    return {"run": name, "model": model, "mode": mode, "loss": next(k for k, w in KD.items() if w == kd), "lr": lr, "warmup": warmup,
            "steps": steps, "batch_size": a.batch_size, "seqlen": a.seqlen, "tokens": m["train_tokens"], "trainable": m["trainable_params"],
            "tokens_per_s": m["tokens_per_s"], "train_s": m["train_seconds"], "wall_s": wall, "peak_rss_gib": rss,
            "device": m.get("device"), "train_peak_gib": m.get("peak_memory_gib"), "train_memory_kind": m.get("memory_kind"),
            "teacher_gib": m.get("teacher_memory_gib"), "returned_step": m["returned_step"],
            "cache": m.get("teacher_cache"), "cache_build_s": m.get("teacher_cache_build_s"),
            "data": (rec.get("data") or {}).get("corpus", "c4"), "evals": rec["evals"], "final": rec["evals"][-1],
            "activation_checkpointing": rec["config"].get("activation_checkpointing", False),
            "loss_chunk": rec["config"].get("loss_chunk", 0),
            "best": min(rec["evals"], key=lambda e: e["c4_ppl"]),
            # the rate after the first 5 steps (on a GPU the first ones pay for CUDA's start-up)
            "steady_tokens_per_s": statistics.median(e["tokens_per_s"] for e in rec["log"][5:] or rec["log"])}


# a colour per mode (or per variant, the run name's second part), solid: distillation
COLORS = {"lrc": "C0", "full": "C1", "lora": "C2", "galore": "C3", "lorafactors": "C4", "wiki": "C5"}


def plot(rows: list[dict], dense: dict, path: Path, title: str) -> None:
    """Held-out perplexity curves: one row of panels per compressed model, WikiText-2 and C4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for model, panel in zip(models, axes):
        for ax, key in zip(panel, ("wikitext2_ppl", "c4_ppl")):
            for r in (r for r in rows if r["model"] == model):
                ax.plot([e["step"] for e in r["evals"]], [e[key] for e in r["evals"]], marker=".",
                        ls={"kd": "-", "lm": "--"}.get(r["loss"], ":"), color=COLORS.get("wiki" if "-wiki" in r["run"] else r["run"].split("-")[1], COLORS[r["mode"]]), label=r["run"])
            ax.axhline(dense[key], color="k", lw=0.8, label="dense")
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(key.replace("_ppl", " perplexity"))
            ax.set_title(model, fontsize=9)
            ax.grid(alpha=0.3)
        panel[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SPEED_RUNS = ("lrc", "full", "lora", "galore", "kd")  # --speed-modes: the LM-loss modes, and "kd" (the teacher rows)
# --speed-savers [VARIANT ...]: each LM-loss mode (and lrc's distillation) again with memory savers, a
# row per variant (named "-saved" for both savers, "-ckpt" / "-chunk" for one)
SAVERS = ("saved", "ckpt", "chunk")


def saver_flags(variant: str, chunk: int) -> tuple[str, ...]:
    """The finetune flags of a --speed-savers variant ('' or another run-name suffix: none)."""
    ckpt, loss = ("--activation-checkpointing",), ("--loss-chunk", str(chunk))
    return {"saved": ckpt + loss, "ckpt": ckpt, "chunk": loss}.get(variant, ())


def speed(work: Path, a, lr: float, warmup: int, steps: int, which: tuple[str, ...] = SPEED_RUNS) -> dict:
    """Each mode for `steps` steps in its own process, back to back: the one clean comparison of
    tokens/s and peak memory (the long runs' figures are not, when something else shared the CPU).
    `which`: the modes run with the LM loss, and "kd" for the distillation rows (teacher in the loop,
    building its cache, reading it). lrc and full are always run: the ratios need them."""
    a.eval_every = 0
    cache = work / f"teacher-speed-{steps}x{a.batch_size}x{a.seqlen}.safetensors"
    cache.unlink(missing_ok=True)
    plan = [(f"{m}-lm", "paper50", m, 0.0, None) for m in SPEED_RUNS[:4] if m in {"lrc", "full", *which}]
    if a.speed_savers:
        plan = [row for lm in plan for row in (lm, *((f"{lm[0]}-{v}", *lm[1:]) for v in a.speed_savers))]
    if "kd" in which:
        plan += [("lrc-kd-in-loop", "paper50", "lrc", 1.0, None), ("lrc-kd-cache-build", "paper50", "lrc", 1.0, cache),
                 ("lrc-kd-cached", "paper50", "lrc", 1.0, cache), ("full-kd-cached", "paper50", "full", 1.0, cache)]
        plan += [(f"lrc-kd-{how}-{v}", "paper50", "lrc", 1.0, c) for v in a.speed_savers or ()
                 for how, c in (("in-loop", None), ("cached", cache))]
    rows = {}
    for name, model, mode, kd, c in plan:
        r = finetune(work, f"speed-{name}", model, mode, kd, a, lr, warmup, steps, c,
                     saver_flags(name.rsplit("-", 1)[-1], a.loss_chunk))
        rows[name] = {k: r[k] for k in ("trainable", "tokens", "tokens_per_s", "train_s", "wall_s", "peak_rss_gib",
                                        "teacher_gib", "cache_build_s", "device", "train_peak_gib", "train_memory_kind",
                                        "activation_checkpointing", "loss_chunk")}
        print(name, json.dumps(rows[name]), flush=True)
    ratio = {"peak RSS lrc/full": rows["lrc-lm"]["peak_rss_gib"] / rows["full-lm"]["peak_rss_gib"],
             "tokens/s lrc/full": rows["lrc-lm"]["tokens_per_s"] / rows["full-lm"]["tokens_per_s"]}
    # the memory of the training steps (on a GPU the device's; on the CPU the process' RSS while training)
    ratio["training peak lrc/full"] = rows["lrc-lm"]["train_peak_gib"] / rows["full-lm"]["train_peak_gib"]
    for v in a.speed_savers or ():
        ratio[f"training peak lrc/full, {v}"] = rows[f"lrc-lm-{v}"]["train_peak_gib"] / rows[f"full-lm-{v}"]["train_peak_gib"]
        ratio[f"tokens/s lrc/full, {v}"] = rows[f"lrc-lm-{v}"]["tokens_per_s"] / rows[f"full-lm-{v}"]["tokens_per_s"]
    for name, row in rows.items():  # each saver variant against the same run without savers
        own, _, v = name.rpartition("-")
        if v in SAVERS:
            label = own.removesuffix("-lm").replace("-kd-", " kd ")  # "lrc", "full", "lrc kd in-loop", "lrc kd cached"
            for key, what in (("train_peak_gib", "training peak"), ("tokens_per_s", "tokens/s")):
                ratio[f"{what} {label} {v}/own"] = row[key] / rows[own][key]
    if "kd" in which:
        ratio["tokens/s kd cached/in loop"] = rows["lrc-kd-cached"]["tokens_per_s"] / rows["lrc-kd-in-loop"]["tokens_per_s"]
        ratio["tokens/s kd in loop/lm"] = rows["lrc-kd-in-loop"]["tokens_per_s"] / rows["lrc-lm"]["tokens_per_s"]
    print(json.dumps({k: round(v, 3) for k, v in ratio.items()}))
    return {"steps": steps, "rows": rows, "ratios": ratio}


def mode_sweep(work: Path, a, warmup: int, results: dict, lrs=(1e-4, 3e-4, 1e-3), steps: int = 100) -> dict:
    """Each mode's learning rate on paper50 with the LM loss (the lr of the 500-step comparison was
    chosen for lrc on recipe30; this asks whether another lr would reorder the modes). Chosen on
    held-out C4 after `steps` steps, never on WikiText-2. Runs already in `results` are kept, and
    each new one is written to recovery.json as it finishes, so an interrupted sweep resumes."""
    rows = results.setdefault("mode_sweep", {}).setdefault("rows", {})
    a.eval_every = steps // 2
    for mode in a.mode_sweep:
        for lr in lrs:
            name = f"modesweep-{mode}-lr{lr:g}"
            if name not in rows:
                rows[name] = finetune(work, name, "paper50", mode, 0.0, a, lr, warmup, steps)
                print(json.dumps({k: rows[name][k] for k in ("run", "final", "tokens_per_s")}), flush=True)
                save(work, results)
    modes = list(dict.fromkeys(r["mode"] for r in rows.values()))
    choice = {m: min((r for r in rows.values() if r["mode"] == m), key=lambda r: r["final"]["c4_ppl"])["lr"]
              for m in modes}
    for r in rows.values():
        f = r["final"]
        print(f"{r['run']:26s} C4 {f['c4_ppl']:9.2f}  WikiText-2 {f['wikitext2_ppl']:9.2f}", flush=True)
    print("choice (held-out C4):", choice, flush=True)
    return {"steps": steps, "rows": rows, "choice": choice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/recovery")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default: the sweep's choice (recovery.json), else the recorded one, 3e-4")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=None,
                    help="instead of --steps: the steps that fit this much training time (a 20-step probe first)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--sweep", action="store_true", help="lr x warmup for recipe30-lrc-kd on a short budget")
    ap.add_argument("--mode-sweep", nargs="+", default=None, choices=("lrc", "full", "lora", "galore"), metavar="MODE",
                    help="lr of each MODE on paper50 with the LM loss, 100 steps per lr (chosen on held-out C4)")
    ap.add_argument("--speed", type=int, nargs="?", const=30, default=None, metavar="STEPS",
                    help="tokens/s and peak RSS of every mode and of the teacher in the loop vs cached")
    ap.add_argument("--speed-modes", nargs="+", default=list(SPEED_RUNS), choices=SPEED_RUNS, metavar="MODE",
                    help="with --speed: the modes run with the LM loss (lrc and full always), and kd for the teacher rows")
    ap.add_argument("--speed-savers", nargs="*", default=None, choices=list(SAVERS), metavar="VARIANT",
                    help="with --speed: each LM-loss mode (and with kd, lrc's distillation in the loop and cached) also "
                         "with memory savers: saved (activation checkpointing and --loss-chunk, the default), ckpt or "
                         "chunk (one of them)")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="with --speed-savers: the chunk of the chunked loss")
    ap.add_argument("--galore-scale", type=float, default=FinetuneConfig.galore_scale,
                    help="GaLore runs: the update scale (its matrices move lr x scale a step)")
    ap.add_argument("--no-cache", action="store_true", help="distillation runs run the teacher in the loop")
    ap.add_argument("--kd-temperature", type=float, default=2.0, help="distillation runs: the softmax temperature")
    ap.add_argument("--full-eval", nargs="+", default=None, metavar="RUN",
                    help="finished runs (keys of recovery.json) on 32,768 tokens of WikiText-2 and held-out C4, seqlen 512")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dense = dense_ppl(work, a.seqlen, a.eval_tokens)
    results = json.loads((work / "recovery.json").read_text()) if (work / "recovery.json").is_file() else {}
    results["dense"] = dense
    # without a sweep in this work dir: the recorded sweep's choice (docs/results/recovery.md)
    choice = results.get("sweep", {}).get("choice", {"lr": 3e-4, "warmup": 10})
    lr = a.lr if a.lr is not None else choice["lr"]
    warmup = a.warmup if a.warmup is not None else choice["warmup"]
    if a.full_eval:
        full_eval(work, a.full_eval, results)
    elif a.speed:
        if a.speed_savers == []:  # the flag alone: both savers
            a.speed_savers = ["saved"]
        results["speed"] = speed(work, a, lr, warmup, a.speed, tuple(a.speed_modes))
    elif a.mode_sweep:
        results["mode_sweep"] = mode_sweep(work, a, warmup, results)
    elif a.sweep:
        rows = []
        for lr in (3e-5, 1e-4, 3e-4, 1e-3):
            for warmup in (0, 10):
                r = finetune(work, f"sweep-lr{lr}-w{warmup}", "recipe30", "lrc", 1.0, a, lr, warmup, 50)
                rows.append(r)
                print(json.dumps({k: r[k] for k in ("run", "final", "best", "returned_step")}), flush=True)
        best = min(rows, key=lambda r: r["final"]["c4_ppl"])  # held-out C4, never WikiText-2 (the test text)
        results["sweep"] = {"rows": rows, "choice": {"lr": best["lr"], "warmup": best["warmup"]}}
        plot(rows, dense, work / "sweep.png", "recipe30, lrc + distillation, 50 steps: lr x warmup")
    else:
        runs = results.setdefault("runs", {})
        temp = "" if a.kd_temperature == 2.0 else f"-T{a.kd_temperature:g}"  # in cache names and run keys
        cache = None if a.no_cache else work / f"teacher-{a.steps}x{a.batch_size}x{a.seqlen}{temp}.safetensors"
        shape = "" if (a.batch_size, a.seqlen) == (2, 128) else f"-{a.batch_size}x{a.seqlen}"  # in run keys and PNGs
        for name in a.runs:
            steps = a.steps
            if a.minutes:  # as many steps as fit the training time, at the tokens/s of a probe run just before
                probe = finetune(work, f"probe-{name}{shape}", *RUNS[name], argparse.Namespace(**{**vars(a), "eval_every": 0}),
                                 lr, warmup, 20, None, extra_args(work, name))
                steps = int(a.minutes * 60 * probe["steady_tokens_per_s"] / (a.batch_size * a.seqlen))
                a.eval_every = max(1, steps // 5)
                print(f"{name}: {probe['steady_tokens_per_s']:.0f} tokens/s in a 20-step probe (median of steps 6-20) "
                      f"-> {steps} steps", flush=True)
            key = f"{name}-{a.minutes:g}min" if a.minutes else name if steps == 500 else f"{name}-{steps}"
            key += "" if lr == choice["lr"] else f"-lr{lr:g}"  # never overwrite the runs at the common lr
            key += shape  # nor another batch shape's
            key += temp if RUNS[name][2] else ""  # nor another temperature's
            gscale = a.galore_scale if RUNS[name][1] == "galore" else None
            key += "" if gscale in (None, OLD_GALORE_SCALE) else f"-gscale{gscale:g}"  # nor GaLore's at another scale
            runs[key] = finetune(work, key, *RUNS[name], a, lr, warmup, steps, cache if RUNS[name][2] else None,
                                 extra_args(work, name, gscale))
            runs[key]["galore_scale"] = gscale
            runs[key]["budget_minutes"] = a.minutes
            print(json.dumps({k: runs[key][k] for k in ("run", "final", "tokens_per_s", "peak_rss_gib", "wall_s")}),
                  flush=True)
            save(work, results)  # partial results survive

        def same_shape(r: dict) -> bool:  # runs before the shape was recorded had 2 x 128
            return (r.get("batch_size", 2), r.get("seqlen", 128)) == (a.batch_size, a.seqlen)

        if a.minutes:
            rows = [r for r in runs.values() if r.get("budget_minutes") == a.minutes and same_shape(r)]
            png, what = f"recovery-{a.minutes:g}min{shape}.png", f"{a.minutes:g} minutes of training"
        else:
            rows = [r for r in runs.values() if r["steps"] == a.steps and not r.get("budget_minutes") and same_shape(r)]
            png = f"recovery{shape}.png" if a.steps == 500 else f"recovery-{a.steps}{shape}.png"
            what = f"{a.steps} steps"
        plot(rows, dense, work / png, f"recovery of the compressed SmolLM2-135M: {what}, "
             f"{a.batch_size} x {a.seqlen} tokens of training text per step")
        for r in rows:
            f = r["final"]
            print(f"{r['run']:20s} wt2 {f['wikitext2_ppl']:9.2f} ({f['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}x) "
                  f"c4 {f['c4_ppl']:9.2f} trainable {r['trainable']:>11,} tok/s {r['tokens_per_s']:6.0f} "
                  f"RSS {r['peak_rss_gib']:.2f} GiB wall {r['wall_s']:.0f} s")
    save(work, results)


if __name__ == "__main__":
    main()
