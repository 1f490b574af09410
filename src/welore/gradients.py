"""The gradient view: how low-rank weights emerge from low-rank gradients.

The paper's claim ("From GaLore to WeLore"): a matrix whose gradient keeps a stable low-rank subspace
through training accumulates updates in few directions and ends with a heavy-tailed, low-rank weight;
a matrix whose gradient saturates (high stable rank, drifting subspace) stays high-rank. This module
measures that on a real run:

* per target matrix, every `every` steps, on a fixed measurement batch: the gradient's top-k singular
  values, its stable rank ||G||_F^2 / ||G||_2^2, the overlap of its top-r left/right singular
  subspaces with the previous record's (mean squared cosine of the principal angles, 1 = same
  subspace, 0 = orthogonal), and the cosine between successive gradients;
* the weight spectrum at the start and the end, and the spectrum of the accumulated update
  W_end - W_start (the direct product of the gradients: the paper's mechanism is that low-rank,
  stable gradients add up to a low-rank update);
* per matrix, the WeLore reduction ratio of the final weight and the low-rankness of the update,
  and the Spearman correlation between gradient low-rankness / stability and each, overall, per
  matrix type and per layer. In a short run the final weight is mostly the starting weight (the
  pretrained one, or a random one whose spectrum is set by its shape), so the update is where a
  short run can show the mechanism; the final weight is where a long run shows its outcome.

Records are a callback on welore's Trainer; randomized SVDs (`exact=True`: full ones) keep them cheap.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from .allocate import allocate
from .data import text_batches
from .errors import WeloreError
from .files import atomic_dir, check_output
from .jobs import GradientsConfig
from .models import load_model
from .report import gradients_markdown, plot_gradients
from .spectrum import Spectra, cosine, singular_values, stable_rank, subspace_overlap, top_svd
from .targets import Target, find_targets, weight_matrix
from .trainer import StepLog, StepStream, make_trainer, training_arguments

PRESETS = {
    # LLaMA configs that pretrain on a laptop CPU in minutes (the tokenizer's vocabulary sets the
    # embedding size; the blocks are what is measured)
    "llama-tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4),
    "llama-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4),
}


def spearman(x, y) -> float:
    """Spearman rank correlation (scipy's; average ranks for ties), leaving out pairs with a NaN;
    NaN when fewer than 3 pairs remain or either side is constant."""
    from scipy.stats import spearmanr  # scipy is heavy and only the report needs it

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------------
# recording


@dataclass
class GradientRecord:
    targets: list[Target]
    steps: list[int] = field(default_factory=list)
    series: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> metric -> values per record
    weight_spectra: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {"start", "end"}
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"targets": [[t.name, t.kind, t.out_features, t.in_features] for t in self.targets],
                "steps": self.steps, "series": self.series, "weight_spectra": self.weight_spectra,
                "losses": self.losses, "info": self.info}


class GradientRecorder(TrainerCallback):
    """Every `every` optimizer steps (and at step 0), the gradient of every target on the fixed
    `measure` batch: its top-k singular values, stable rank, norm, the overlap of its top-`rank`
    subspaces with the previous record's, and its cosine with the previous and first gradients.
    At the end, the weight spectra and the spectrum of the accumulated update W_end - W_start."""

    def __init__(self, rec: GradientRecord, measure: dict, every: int):
        self.rec, self.measure, self.every, self.seconds = rec, measure, every, 0.0
        self.prev: dict[str, tuple] = {}
        self.first: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.modules = {t.name: model.get_submodule(t.name) for t in self.rec.targets}
        # a CPU copy of the starting weights, for the spectrum of the accumulated update at the end
        self.start = {n: weight_matrix(m).detach().float().cpu().clone() for n, m in self.modules.items()}
        self.record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.record(model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rec.losses.append(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        for name, module in self.modules.items():
            self.rec.weight_spectra[name]["end"] = _svdvals(module)
            update = weight_matrix(module).detach().float().cpu() - self.start.pop(name)
            self.rec.weight_spectra[name]["update"] = singular_values(update).tolist()

    def record(self, model: nn.Module, step: int) -> None:
        t0, rec, info = time.perf_counter(), self.rec, self.rec.info
        device = next(model.parameters()).device
        model.train()
        model.zero_grad(set_to_none=True)
        model(**{k: v.to(device) for k, v in self.measure.items()}, use_cache=False).loss.backward()
        rec.steps.append(step)
        for t in rec.targets:
            w = self.modules[t.name].weight  # gradients live on the stored parameter; Conv1D stores W^T
            g = (w.grad.T if t.kind == "conv1d" else w.grad).detach().float()
            U, S, V = top_svd(g, info["top_k"], info["exact"], seed=step)
            s, r = rec.series[t.name], info["rank"]
            s["top_sv"].append(S.tolist())
            s["stable_rank"].append(stable_rank(g, S[0].item() if len(S) else None))
            s["grad_norm"].append(g.norm().item())
            if t.name in self.prev:
                pu, pv, pg = self.prev[t.name]
                s["overlap_left"].append(subspace_overlap(pu, U[:, :r]))
                s["overlap_right"].append(subspace_overlap(pv, V[:, :r]))
                s["cosine_prev"].append(cosine(pg, g))
            else:
                self.first[t.name] = g.clone()
            s["cosine_first"].append(cosine(self.first[t.name], g))
            self.prev[t.name] = (U[:, :r].clone(), V[:, :r].clone(), g.clone())
        model.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0


def _check_schedule(steps: int, every: int) -> None:
    if steps <= 0:
        raise WeloreError(f"steps must be > 0, got {steps}")
    if every <= 0 or every > steps:
        raise WeloreError(f"the sampling interval must be in [1, steps={steps}], got {every}")


def record_gradients(model: nn.Module, train_batches, measure_batch: dict, *, steps: int, every: int,
                     lr: float = 1e-4, top_k: int = 8, rank: int = 4, exact: bool = False,
                     targets: list[Target] | None = None, progress: bool = True) -> GradientRecord:
    """Train `model` for `steps` AdamW steps (constant `lr`, clipping at 1) on `train_batches(step)`
    and record gradient statistics of every target on the fixed `measure_batch` every `every` steps
    (and at step 0)."""
    _check_schedule(steps, every)
    if not 1 <= rank <= top_k:
        raise WeloreError(f"rank must be in [1, top_k={top_k}], got {rank}")
    targets = targets if targets is not None else find_targets(model)
    rec = GradientRecord(targets, info={"steps": steps, "every": every, "lr": lr, "top_k": top_k, "rank": rank,
                                        "exact": exact})
    rec.series = {t.name: {"stable_rank": [], "top_sv": [], "overlap_left": [], "overlap_right": [],
                           "cosine_prev": [], "cosine_first": [], "grad_norm": []} for t in targets}
    rec.weight_spectra = {t.name: {"start": _svdvals(model.get_submodule(t.name))} for t in targets}
    for p in model.parameters():
        p.requires_grad_(True)
    rows = len(measure_batch["input_ids"])
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output directory; nothing is saved
        args = training_arguments(scratch, steps=steps, lr=lr, batch_size=rows, schedule="constant",
                                  device=device.type)
        log = StepLog("Training with gradient records", progress)
        recorder = GradientRecorder(rec, measure_batch, every)
        make_trainer(model, args, StepStream(train_batches, steps, rows), [log, recorder]).train()
    rec.info.update(train_seconds=log.seconds, record_seconds=recorder.seconds, train_tokens=log.tokens,
                    tokens_per_s_training=log.tokens / log.seconds if log.seconds else None,
                    tokens_per_s_with_records=log.tokens / (log.seconds + recorder.seconds) if log.seconds else None)
    model.eval()
    return rec


def _svdvals(module: nn.Module) -> list[float]:
    return singular_values(weight_matrix(module).detach().float()).tolist()


# ---------------------------------------------------------------------------------------------
# analysis


def matrix_summary(rec: GradientRecord, ratio: float = 0.5) -> list[dict]:
    """Per matrix: gradient low-rankness and stability, and the WeLore reduction ratio of the final
    weight under the threshold that reduces the final model by `ratio` (min_ratio 0: every matrix's
    own reduction, not whether it would become an LRC)."""

    spectra = Spectra(rec.targets, {t.name: torch.tensor(rec.weight_spectra[t.name]["end"]) for t in rec.targets},
                      {t.name: "" for t in rec.targets})
    plan = allocate(spectra, ratio=ratio, min_ratio=0.0)
    out = []
    for t, m in zip(rec.targets, plan.matrices):
        s = rec.series[t.name]
        later = s["stable_rank"][1:] or s["stable_rank"]
        overlaps = [(a + b) / 2 for a, b in zip(s["overlap_left"], s["overlap_right"])]
        upd = np.asarray(rec.weight_spectra[t.name].get("update", []), dtype=np.float64)
        upd_sr = float((upd ** 2).sum() / upd[0] ** 2) if len(upd) and upd[0] > 0 else float("nan")
        out.append({"name": t.name, "type": t.type, "layer": t.layer, "min_dim": min(t.shape),
                    "grad_stable_rank": float(np.mean(later)),
                    "grad_stable_rank_rel": float(np.mean(later)) / min(t.shape),
                    "grad_subspace_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
                    "grad_cosine_prev": float(np.mean(s["cosine_prev"])) if s["cosine_prev"] else float("nan"),
                    "update_stable_rank_rel": upd_sr / min(t.shape),
                    "weight_reduction": m.reduction})
    return out


def correlations(summary: list[dict]) -> dict:
    """Spearman correlation of gradient low-rankness (low relative stable rank) and stability
    (subspace overlap) with the final weight's WeLore reduction and with the low-rankness of the
    accumulated update (low relative stable rank of W_end - W_start): overall, by type, by layer."""
    def corr(rows):
        red = [r["weight_reduction"] for r in rows]
        upd = [-r["update_stable_rank_rel"] for r in rows]
        low, stab = [-r["grad_stable_rank_rel"] for r in rows], [r["grad_subspace_overlap"] for r in rows]
        return {"n": len(rows),
                "lowrank_vs_reduction": spearman(low, red), "stability_vs_reduction": spearman(stab, red),
                "lowrank_vs_update": spearman(low, upd), "stability_vs_update": spearman(stab, upd)}

    out = {"overall": corr(summary), "by_type": {}, "by_layer": {}}
    for key, field_ in (("by_type", "type"), ("by_layer", "layer")):
        groups: dict = {}
        for r in summary:
            groups.setdefault(r[field_], []).append(r)
        out[key] = {str(k): corr(v) for k, v in groups.items()}
    return out


# ---------------------------------------------------------------------------------------------
# report


def write_report(rec: GradientRecord, out: str | Path, title: str, ratio: float = 0.5) -> dict:
    """JSON of every series, the PNGs, and report.md putting them together. Returns the correlations."""

    out = Path(out)
    summary = matrix_summary(rec, ratio)
    corr = correlations(summary)
    (out / "gradients.json").write_text(json.dumps({"record": rec.to_dict(), "summary": summary,
                                                    "correlations": corr}, indent=1))
    plot_gradients(rec, summary, corr, out, title)
    (out / "report.md").write_text(gradients_markdown(rec, summary, corr, title, ratio))
    return corr


def pretrain_model(preset: str, vocab_size: int, seed: int = 0) -> nn.Module:
    """A randomly initialised LLaMA of a preset size (for watching low-rank weights emerge)."""
    if preset not in PRESETS:
        raise WeloreError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=True,
                      **PRESETS[preset])
    return AutoModelForCausalLM.from_config(cfg)


def run_gradients(source, cfg: GradientsConfig) -> tuple[Path, dict, GradientRecord]:
    """`welore gradients`: fine-tune `source` (None: the embedded model) or, with `cfg.preset`, pretrain
    a fresh LLaMA of that size (tokenizer from `source`), recording gradients; write the report."""
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise WeloreError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    check_output(cfg.output, cfg.overwrite)
    loaded = load_model(source, device=cfg.device, dtype=cfg.dtype)
    if loaded.tokenizer is None:
        raise WeloreError("recording gradients on text needs a tokenizer, and this model has none")
    if cfg.preset:
        model = pretrain_model(cfg.preset, vocab_size=len(loaded.tokenizer), seed=cfg.seed).to(loaded.model.device)
        title = f"{cfg.preset} pretrained from scratch ({sum(p.numel() for p in model.parameters()):,} params)"
        name = cfg.preset
    else:
        model, title, name = loaded.model, f"{loaded.name} fine-tuned", loaded.name
    target_list = find_targets(model, cfg.targets, cfg.ignore)
    batches, measure = text_batches(loaded.tokenizer, cfg.seqlen, cfg.batch_size, seed=cfg.seed)
    output = Path(cfg.output) if cfg.output else Path("gradients") / name
    with atomic_dir(output, cfg.overwrite) as tmp:
        rec = record_gradients(model, batches, measure, steps=cfg.steps, every=cfg.every, lr=cfg.lr, top_k=cfg.top_k,
                               rank=cfg.rank, exact=cfg.exact, targets=target_list, progress=cfg.progress)
        rec.info.update(source=loaded.source, preset=cfg.preset, batch_size=cfg.batch_size, seqlen=cfg.seqlen,
                        seed=cfg.seed, corpus="c4-train")
        corr = write_report(rec, tmp, title, cfg.ratio)
    return output, corr, rec
