"""Recovery by distillation: the dense model teaches its compressed student.

    welore finetune COMPRESSED --teacher              # the base model recorded in welore.json
    welore finetune COMPRESSED --teacher DENSE_DIR --kd-weight 0.5 --kd-temperature 2

The loss is T^2 KL(p_teacher^T || p_student^T) over the predicted positions (token distributions
softened by the temperature T; T^2 keeps the gradient scale independent of T, as in Hinton et
al.), mixed with the LM loss as `kd_weight * KL + (1 - kd_weight) * LM`. A compressed model has
lost its calibration on *every* token, not only on the next one in the text, and the teacher's
whole distribution says where: that is why distillation recovers faster than the LM loss alone.

The teacher runs in the same process, without gradients, on the student's device; it is one more
forward per micro-batch (the student pays a forward and a backward). It works with every training
mode (lrc, full, lora, galore) since it only changes the loss.

`KeepBest` is the guard every recovery run needs: a compressed model is fragile, a too-high
learning rate wrecks it in a few steps, and so the weights with the best held-out score seen at an
evaluation (step 0 included) are what a run returns, never a model worse than its start.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import WeloreError
from .trainer import WeloreTrainer

BEST = "welore_best.safetensors"  # in a Trainer checkpoint: KeepBest's weights


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened next-token distributions, averaged over the
    positions that predict a label (labels != -100, shifted as the LM loss is)."""
    mask = labels[:, 1:] != -100
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].float() / temperature
    if s.numel() == 0:
        return student.sum() * 0.0  # nothing to predict in this batch
    log_t = F.log_softmax(t, dim=-1)
    kl = F.kl_div(F.log_softmax(s, dim=-1), log_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


class Teacher:
    """The frozen dense model, checked to speak the student's vocabulary."""

    def __init__(self, source: str, student_tokenizer, device):
        from .models import load_model  # models imports the training stack's users: only here

        loaded = load_model(source, device=device)
        self.model, self.source = loaded.model.eval(), loaded.source
        # what the teacher holds for the whole run (its forward's activations come and go each step)
        self.memory_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        for p in self.model.parameters():
            p.requires_grad_(False)
        tok = loaded.tokenizer
        if tok is None or student_tokenizer is None or tok.get_vocab() != student_tokenizer.get_vocab():
            raise WeloreError(f"the teacher {source} does not share the student's tokenizer (vocabularies differ)")

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        kw = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        return self.model(**kw, use_cache=False).logits


class DistillTrainer(WeloreTrainer):
    """WeloreTrainer whose loss is the distillation mix (see module docstring)."""

    def __init__(self, *args, teacher: Teacher, kd_weight: float = 1.0, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_weight, self.temperature = teacher, kd_weight, temperature
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the accumulation

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)  # with labels: the LM loss, a mean over this micro-batch's tokens
        teacher = self.teacher.logits(inputs)
        if teacher.shape[-1] != outputs.logits.shape[-1]:
            raise WeloreError(f"the teacher has {teacher.shape[-1]} logits per token, the student "
                              f"{outputs.logits.shape[-1]}: they do not share a vocabulary")
        kd = kd_loss(outputs.logits, teacher, inputs["labels"], self.temperature)
        loss = self.kd_weight * kd + (1 - self.kd_weight) * outputs.loss if self.kd_weight < 1 else kd
        return (loss, outputs) if return_outputs else loss


class KeepBest:
    """Remembers the trainable weights at the best evaluation (lowest held-out C4 perplexity, or
    highest task accuracy) and puts them back at the end if the last evaluation is worse."""

    def __init__(self, metric: str):
        self.metric, self.sign = metric, (1 if metric.endswith("_ppl") else -1)
        self.best: tuple[float, int] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def seen(self, model: nn.Module, step: int, scores: dict) -> None:
        """Called after each evaluation (step 0 included) with its scores."""
        value = self.sign * scores[self.metric]
        if self.best is None or value < self.best[0]:
            self.best = (value, step)
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def save(self, checkpoint: Path) -> None:
        """Into a Trainer checkpoint: a resumed run keeps the guard's memory."""
        if self.weights is not None:
            save_file({n: w.contiguous() for n, w in self.weights.items()}, str(checkpoint / BEST),
                      metadata={"format": "pt", "score": repr(self.best[0]), "step": str(self.best[1])})

    def load(self, checkpoint: Path, model: nn.Module) -> None:
        if (checkpoint / BEST).is_file():
            with safe_open(str(checkpoint / BEST), framework="pt") as f:
                meta = f.metadata()
                self.weights = {k: f.get_tensor(k) for k in f.keys()}
            self.best = (float(meta["score"]), int(meta["step"]))

    def restore(self, model: nn.Module, last_step: int) -> int:
        """Put the best weights back (if they are not the last ones); returns the step they are from."""
        if self.best is None or self.best[1] == last_step:
            return last_step
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in self.weights.items():
                params[n].copy_(w.to(params[n].device))
        return self.best[1]


def load_teacher(cfg, meta: dict, student_tokenizer, device) -> Teacher | None:
    """The teacher `cfg.teacher` names ("base": the base model in welore.json), or None."""
    if cfg.teacher is None:
        return None
    source = meta.get("base_model") if cfg.teacher == "base" else cfg.teacher
    if not source:
        raise WeloreError("this model records no base model to distil from; name one: --teacher MODEL")
    return Teacher(source, student_tokenizer, device)
