"""Recovery by distillation: the dense model teaches its compressed student.

    welore finetune COMPRESSED --teacher              # the base model recorded in welore.json
    welore finetune COMPRESSED --teacher DENSE_DIR --kd-weight 0.5 --kd-temperature 2

The loss is T^2 KL(p_teacher^T || p_student^T) over the predicted positions (token distributions
softened by the temperature T; T^2 keeps the gradient scale independent of T, as in Hinton et
al.), mixed with the LM loss as `kd_weight * KL + (1 - kd_weight) * LM`. A compressed model has
lost its calibration on *every* token, not only on the next one in the text, and the teacher's
whole distribution says where. Measured here (benchmarks/recovery.py, 500 steps on C4), that did not
make it the faster route: the LM loss alone recovered the 50% plain-SVD model 2x further than
distillation at T = 2, and the 30% calibrated model as far as half of each, so the recovery recipe
(`FinetuneConfig.recovery`) uses the LM loss and distillation is an option.

The teacher runs in the same process, without gradients, on the student's device; it is one more
forward per micro-batch (the student pays a forward and a backward). It works with every training
mode (lrc, full, lora, galore) since it only changes the loss.

Or its answers are computed once and cached (`--teacher-cache FILE`): the top-k log-probabilities at
the temperature for every position of every batch of the run, which is a pure function of (seed,
step). Runs on the same batches (every mode of a comparison, a resumed run, a sweep) then train
without the teacher in memory or in the loop. The cached loss is the KL between the teacher's and
the student's distributions over k + 1 outcomes (the k tokens, and "any other token"): exact when
the teacher puts no mass outside its top k, a lower bound of the full KL otherwise. The file records
the teacher (its weight files' fingerprint), the tokenizer, the temperature, k and every input token
it was computed on, and a run whose batches, teacher or settings differ is refused.

With `--loss-chunk N` the mix is computed N predicted positions at a time (`chunked_kd_loss`), both
heads inside activation checkpointing, so neither model's [tokens x vocabulary] logits exist whole: at
8 x 512 tokens a step, with checkpointing, that cut a distillation step's peak to a fifth (docs/results/recovery.md,
"Distillation with the savers").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import chunked_sum, head_input, output_head, predicted
from .teacher import Teacher, TeacherCache, same_vocabulary
from .trainer import StepStream, WeloreTrainer


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


def kd_loss_topk(student: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """kd_loss against a cached teacher: T^2 KL over k + 1 outcomes (the teacher's top k tokens, whose
    tempered log-probabilities are `top_logp` [b, L-1, k] at ids `top_ids`, and the rest)."""
    mask = labels[:, 1:] != -100
    if not mask.any():
        return student.sum() * 0.0
    log_q = F.log_softmax(student[:, :-1][mask].float() / temperature, dim=-1)
    return _kl_topk(log_q, top_ids[mask], top_logp[mask]).mean() * temperature**2


def _kl_topk(log_q: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Per position [n]: KL over the teacher's top k tokens and "the rest", from the student's tempered
    log-probabilities `log_q` [n, V] and the teacher's `top_logp` [n, k] at `top_ids` [n, k]."""
    log_p = top_logp.float()
    log_q_top = log_q.gather(1, top_ids.long())
    p_rest = (1 - log_p.exp().sum(1)).clamp_min(0)
    # log(1 - sum q_top), kept finite when the student's top k hold (almost) all its mass
    log_q_rest = torch.log1p(-log_q_top.logsumexp(1).exp().clamp_max(1 - 1e-7))
    return (log_p.exp() * (log_p - log_q_top)).sum(1) + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest


def _mix_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, kd_weight: float, temperature: float,
             teacher_hidden: torch.Tensor | None, teacher_head: nn.Linear | None, top_ids: torch.Tensor | None,
             top_logp: torch.Tensor | None) -> torch.Tensor:
    """The distillation mix summed over some predicted positions, from the student's and the teacher's
    head inputs (or the teacher's cached top k): one chunk of `chunked_kd_loss`."""
    logits = head(hidden).float()
    total = (1 - kd_weight) * F.cross_entropy(logits, labels, reduction="sum") if kd_weight < 1 else 0.0
    if kd_weight > 0:
        log_q = F.log_softmax(logits / temperature, dim=-1)
        if teacher_hidden is not None:
            log_p = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
            kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        else:
            kl = _kl_topk(log_q, top_ids, top_logp).sum()
        total = total + kd_weight * temperature**2 * kl
    return total


def chunked_kd_loss(model: nn.Module, inputs: dict, chunk: int, teacher: Teacher | TeacherCache, kd_weight: float,
                    temperature: float) -> torch.Tensor:
    """The distillation mix of `DistillTrainer` (a mean over the predicted positions) with neither
    model's [tokens x vocabulary] logits whole in memory: both heads run on `chunk` positions at a
    time inside activation checkpointing (welore.trainer.chunked_sum), as `chunked_lm_loss` does for
    the LM loss. `inputs` carries the stream's row index when the teacher is a cache."""
    hidden = head_input(model, inputs)
    head = output_head(model)
    keep, labels = predicted(inputs, hidden.device)
    if isinstance(teacher, TeacherCache):
        ids, logp = teacher.rows(inputs[StepStream.INDEX], inputs["input_ids"].shape[1], hidden.device)
        at = keep[:, :-1]  # the cache holds every position but the last, which never predicts
        answers = (None, None, ids[at], logp[at])
    else:
        teacher_head = teacher.head
        same_vocabulary(teacher_head.out_features, head.out_features)
        answers = (teacher.hidden(inputs)[keep], teacher_head, None, None)
    total = chunked_sum(_mix_sum, chunk, hidden[keep], labels, head, kd_weight, temperature, *answers)
    return total / max(len(labels), 1)


class DistillTrainer(WeloreTrainer):
    """WeloreTrainer whose loss is the distillation mix (see module docstring); the teacher is a
    `Teacher` run on each batch, or a `TeacherCache` looked up by the batch's rows. With `loss_chunk`
    > 0, by `chunked_kd_loss`, checked first against the whole logits' loss as the LM loss is."""

    def __init__(self, *args, teacher, kd_weight: float = 1.0, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_weight, self.temperature = teacher, kd_weight, temperature
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the accumulation

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        if self.loss_chunk:
            self.check_chunked_loss(model, inputs, whole=lambda row: self.whole_loss(model, row)[0],
                                    chunked=lambda row: self.chunked_loss(model, row))
            loss, outputs = self.chunked_loss(model, inputs), None
        else:
            loss, outputs = self.whole_loss(model, inputs)
        return (loss, outputs) if return_outputs else loss

    def chunked_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return chunked_kd_loss(model, inputs, self.loss_chunk, self.teacher, self.kd_weight, self.temperature)

    def whole_loss(self, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, object]:
        """(the mix from the model's whole logits, the model's outputs)."""
        rows = inputs.get(StepStream.INDEX)  # present when the stream is indexed for a cache
        outputs = model(**{k: v for k, v in inputs.items() if k != StepStream.INDEX})  # LM loss: a micro-batch mean
        if isinstance(self.teacher, TeacherCache):
            ids, logp = self.teacher.rows(rows, inputs["input_ids"].shape[1], outputs.logits.device)
            kd = kd_loss_topk(outputs.logits, ids, logp, inputs["labels"], self.temperature)
        else:
            teacher = self.teacher.logits(inputs)
            same_vocabulary(teacher.shape[-1], outputs.logits.shape[-1])
            kd = kd_loss(outputs.logits, teacher, inputs["labels"], self.temperature)
        loss = self.kd_weight * kd + (1 - self.kd_weight) * outputs.loss if self.kd_weight < 1 else kd
        return loss, outputs
