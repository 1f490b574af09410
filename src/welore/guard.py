"""The keep-the-best guard every recovery run needs: a compressed model is fragile, a too-high
learning rate wrecks it in a few steps, and so the weights with the best held-out score seen at an
evaluation (step 0 included) are what a run returns, never a model worse than its start.

Not Trainer's `load_best_model_at_end`: that needs Trainer's own evaluation loop (an eval dataset and
its loss), where welore judges by perplexity on held-out text or by a task's validation accuracy
(welore.train._evaluate), and it reloads a whole checkpoint where this keeps only the trainable
weights, in memory and in each checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .finetune_config import FinetuneConfig

BEST = "welore_best.safetensors"  # in a Trainer checkpoint: KeepBest's weights


class KeepBest:
    """Remembers the trainable weights at the best evaluation (lowest held-out perplexity: C4's, or a
    training file's held-out tail; on a task, highest accuracy on its validation examples, ties broken
    by their choice loss) and puts them back at the end if the last evaluation is worse.
    `metrics`: the score to judge by, then tie-breakers; names ending in _ppl or _nll are lower-better."""

    def __init__(self, *metrics: str):
        self.metrics = metrics
        self.signs = [1 if m.endswith(("_ppl", "_nll")) else -1 for m in metrics]
        self.best: tuple[tuple[float, ...], int] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def seen(self, model: nn.Module, step: int, scores: dict) -> None:
        """Called after each evaluation (step 0 included) with its scores."""
        key = tuple(s * scores[m] for m, s in zip(self.metrics, self.signs))
        if any(map(math.isnan, key)):  # a wrecked model scores NaN: never the best
            key = (math.inf,) * len(key)
        if self.best is None or key < self.best[0]:
            self.best = (key, step)
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def save(self, checkpoint: Path) -> None:
        """Into a Trainer checkpoint: a resumed run keeps the guard's memory."""
        if self.weights is not None:
            save_file({n: w.contiguous() for n, w in self.weights.items()}, str(checkpoint / BEST),
                      metadata={"format": "pt", "score": json.dumps(self.best[0]), "step": str(self.best[1])})

    def load(self, checkpoint: Path, model: nn.Module) -> None:
        if (checkpoint / BEST).is_file():
            with safe_open(str(checkpoint / BEST), framework="pt") as f:
                meta = f.metadata()
                self.weights = {k: f.get_tensor(k) for k in f.keys()}
            score = meta["score"]  # a JSON list; a lone float in checkpoints of earlier versions
            self.best = (tuple(json.loads(score)) if score.startswith("[") else (float(score),), int(meta["step"]))

    def restore(self, model: nn.Module, last_step: int) -> int:
        """Put the best weights back (if they are not the last ones); returns the step they are from."""
        if self.best is None or self.best[1] == last_step:
            return last_step
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in self.weights.items():
                params[n].copy_(w.to(params[n].device))
        return self.best[1]


def guard_metrics(cfg: FinetuneConfig, eval_set) -> tuple[str, ...]:
    """What the keep-the-best guard judges by (a score, then tie-breakers; () for no guard): held-out
    text of the training kind (C4's own held-out documents, a text file's tail), or a task's validation
    examples, never its reported eval ones (choosing by them would flatter the accuracy reported).
    On a task, accuracy first: the choice loss alone prefers a model that answers 50/50 (loss ln 2)
    to one that is right more often but sometimes confidently wrong (benchmarks/tasks.py, coin flip);
    it only breaks the ties of a few dozen examples' accuracies."""
    if not cfg.keep_best:
        return ()
    if cfg.is_text:
        return ("c4_ppl",) if eval_set is None else ("heldout_ppl",)
    val = eval_set[0]
    if not val:
        print(f"[{cfg.mode}] no validation examples to judge by (--val-examples 0, or a train split under 5 "
              "examples): the run returns its last step", flush=True)
        return ()
    return ("val_accuracy", "val_choice_nll") if val[0].options else ("val_accuracy",)
