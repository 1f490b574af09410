"""`transformers.Trainer` as welore uses it: the one loop behind `welore finetune`, `compare` and
`gradients`.

What welore adds to Trainer, and why:

* `StepStream`: the data is a pure function of the micro-step index (`batch(t)` returns the whole
  global micro-batch), read in order. A resumed run sees exactly the batches an uninterrupted one
  would (Trainer skips the trained indices), and with several processes process r takes rows
  [r*b, (r+1)*b) of each global micro-batch, so the global batch, hence the loss, does not depend on
  the number of processes.
* `Batches`: fine-tuning data (C4 windows, or task examples with the loss on the answer only).
* `StepLog`: one record per optimizer step (loss, learning rate, tokens/s of the step's own wall time,
  so evaluations and checkpoints are not counted), and welore's progress bar instead of Trainer's.
* `loss_chunk`: the LM loss by welore.losses.chunked_lm_loss, without the whole [tokens x
  vocabulary] logits in memory.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import elastic
from .data import training_text
from .device import pick_device
from .errors import WeloreError
from .evaluate import encode_example
from .finetune_config import FinetuneConfig
from .losses import chunked_lm_loss
from .progress import bar
from .qtrain import LR_SCALE
from .tasks import Example, split_validation, task_splits

# deprecation notices raised inside the libraries' own code paths, not by anything welore calls:
# Trainer asks models `is_gradient_checkpointing`, and galore-torch's AdamW announces its future
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="This implementation of AdamW is deprecated", category=FutureWarning)


class StepStream(torch.utils.data.Dataset):
    """Rows of a deterministic stream: micro-step t is `batch(t)` (a dict of tensors with `rows` rows);
    item k is row k % rows of micro-step k // rows. With `index`, each item also carries k (under
    `INDEX`), so a loss can look up what was precomputed for that row (welore.distill.TeacherCache)."""

    INDEX = "welore_row"

    def __init__(self, batch: Callable[[int], dict[str, torch.Tensor]], micro_steps: int, rows: int,
                 index: bool = False):
        self.batch, self.micro_steps, self.rows, self.index = batch, micro_steps, rows, index
        self._t, self._cached = -1, {}

    def __len__(self) -> int:
        return self.micro_steps * self.rows

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        t, r = divmod(k, self.rows)
        if t != self._t:  # rows are read in order: one batch is drawn per micro-step
            self._t, self._cached = t, self.batch(t)
        item = {key: v[r] for key, v in self._cached.items()}
        return {**item, self.INDEX: torch.tensor(k)} if self.index else item


def task_data(cfg: FinetuneConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, eval) examples of the task `cfg.data`. Validation examples are set aside
    from the train split only for the keep-the-best guard; without it every train example trains."""
    train, ev = task_splits(cfg.data, seed=cfg.seed, n_eval=cfg.eval_examples)
    return (*split_validation(train, cfg.val_examples if cfg.keep_best else 0), ev)


class Batches:
    """Fine-tuning batches: token windows of the C4 training documents or of a text file (less its
    held-out tail, `held_out`), or task examples with the loss on the answer tokens only (labels -100
    elsewhere; `held_out` = the (validation, eval) examples, none of them trained on). `get(step, micro)` is the global micro-batch
    (`rows` sequences), a function of (seed, step, micro) only."""

    def __init__(self, tokenizer, cfg: FinetuneConfig, rows: int | None = None):
        self.cfg, self.rows = cfg, rows or cfg.batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        if cfg.is_text:
            ids, self.held_out = training_text(tokenizer, cfg.data, cfg.eval_tokens)
            n = ids.numel() // cfg.seqlen
            if n == 0:
                raise WeloreError("the training corpus is shorter than one sequence")
            self.windows = ids[: n * cfg.seqlen].view(n, cfg.seqlen)
            self.size = n
        else:
            train, val, ev = task_data(cfg)
            self.held_out = (val, ev)
            if not train:
                raise WeloreError(f"task {cfg.data} has no training examples")
            self.examples = [encode_example(tokenizer, ex.prompt, ex.target, cfg.seqlen) for ex in train]
            self.size = len(self.examples)

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        # the trailing 0 keeps the draws of the single-process runs made before the stream was global
        idx = torch.from_numpy(np.random.default_rng([self.cfg.seed, step, micro, 0]).integers(0, self.size, self.rows))
        if self.cfg.is_text:
            x = self.windows[idx]
            return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
        rows = [self.examples[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for r, (ids, n_prompt) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def passes(self) -> float:
        """How many times over, on average, the run's draws cover the training text (or examples):
        above 1 it trains on repeats, and held-out loss can rise while training loss falls (a GPU run
        of the recovery recipe: docs/results/recovery.md, "On a GPU")."""
        return self.cfg.steps * self.cfg.grad_accum * self.rows / self.size

    def stream(self, index: bool = False) -> StepStream:
        accum = self.cfg.grad_accum
        return StepStream(lambda t: self.get(*divmod(t, accum)), self.cfg.steps * accum, self.rows, index)


# ---------------------------------------------------------------------------------------------
# the trainer


# transformers 5.25 renamed gradient checkpointing (the old name is an alias until v6): the
# TrainingArguments field, and the model's `<name>_enable(<name>_kwargs=...)` Trainer calls
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def training_arguments(output_dir, *, steps: int, lr: float, batch_size: int, grad_accum: int = 1,
                       warmup: int = 0, schedule: str = "cosine", weight_decay: float = 0.0,
                       max_grad_norm: float = 1.0, seed: int = 0, save_every: int = 0, device=None,
                       activation_checkpointing: bool = False, **optim) -> TrainingArguments:
    """Trainer settings for welore's runs: in-order data, a log record every step, no reporting
    integrations, bf16 autocast on a GPU that has it and fp32 elsewhere. activation_checkpointing:
    transformers' own, non-reentrant (it needs no input that requires a gradient, which a run with
    frozen embeddings has not)."""
    dev = pick_device(device)
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, warmup_steps=warmup, lr_scheduler_type=schedule,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, data_seed=seed,
        use_cpu=dev.type == "cpu", bf16=dev.type == "cuda" and torch.cuda.is_bf16_supported(),
        train_sampling_strategy="sequential",
        logging_steps=1, include_num_input_tokens_seen="non_padding", report_to="none", disable_tqdm=True,
        save_strategy="steps" if save_every else "no", save_steps=save_every or 500, save_total_limit=1,
        dataloader_num_workers=0, remove_unused_columns=False, label_names=["labels"],
        **{CHECKPOINTING: activation_checkpointing,
           CHECKPOINTING + "_kwargs": {"use_reentrant": False} if activation_checkpointing else None}, **optim)


class WeloreTrainer(Trainer):
    """Trainer with GaLore's groups given the run's weight decay (Trainer builds them without it), the
    parameters marked with LR_SCALE in groups at that fraction of the learning rate, and
    with `loss_chunk` > 0 the LM loss by `chunked_lm_loss`. Before its first step that loss is checked
    against the model's own on one sequence: a head that is more than a linear map of the body's
    output (a logit soft-cap or scale) would make it another loss, and is refused."""

    def __init__(self, *args, loss_chunk: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk, self._chunk_checked = loss_chunk, False

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if str(self.args.optim).startswith("galore"):
            for group in optimizer.param_groups:
                group["weight_decay"] = self.args.weight_decay
        for group in list(optimizer.param_groups):  # parameters marked LR_SCALE: a group of their own
            scaled = [p for p in group["params"] if hasattr(p, LR_SCALE)]
            group["params"] = [p for p in group["params"] if not hasattr(p, LR_SCALE)]
            for factor in sorted({getattr(p, LR_SCALE) for p in scaled}):
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "lr": group["lr"] * factor,
                                           "params": [p for p in scaled if getattr(p, LR_SCALE) == factor]})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_chunk:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.check_chunked_loss(model, inputs, whole=lambda row: model(**row, use_cache=False).loss,
                                chunked=lambda row: chunked_lm_loss(model, row, self.loss_chunk))
        loss = chunked_lm_loss(model, inputs, self.loss_chunk, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # as Trainer scales the model's own loss
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def check_chunked_loss(self, model, inputs, whole: Callable[[dict], torch.Tensor],
                           chunked: Callable[[dict], torch.Tensor]) -> None:
        """Once, on the first sequence with a label: refuse the run if `chunked(row)` differs from
        `whole(row)` (the same loss computed from the model's own logits)."""
        if self._chunk_checked:
            return
        row = {k: v[:1] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels", StepStream.INDEX)}
        if not (row["labels"][:, 1:] != -100).any():
            return  # nothing to compare on: the next batch is checked
        was_training = model.training
        model.eval()  # dropout would make the two forwards differ
        try:
            own, ours = whole(row).float().item(), chunked(row).float().item()
        finally:
            model.train(was_training)
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 and not self.args.bf16 else 2e-2
        if not abs(own - ours) <= tol * max(abs(own), 1e-6):
            raise WeloreError(f"--loss-chunk computes {ours:.5g} where the model's own logits give {own:.5g} (a head "
                              "that is more than a linear map of its body's output); run without --loss-chunk")
        self._chunk_checked = True


class StepLog(TrainerCallback):
    """A record per optimizer step in `log` (loss, lr, tokens/s) and a progress bar on process 0."""

    def __init__(self, desc: str, progress: bool = True, log: list[dict] | None = None):
        self.desc, self.progress, self.log = desc, progress, log if log is not None else []
        self.tokens, self.seconds, self._t0, self._dt = 0, 0.0, 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._seen = state.num_input_tokens_seen
        self.bar = bar(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                       progress=self.progress and state.is_world_process_zero)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's queued kernels (the optimizer's) belong to its time
        self._dt = time.perf_counter() - self._t0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        tokens, self._seen = state.num_input_tokens_seen - self._seen, state.num_input_tokens_seen
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + self._dt
        self.log.append({"step": state.global_step, "loss": logs["loss"], "lr": logs["learning_rate"],
                         "tokens_per_s": tokens / self._dt if self._dt else None})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{tokens / max(self._dt, 1e-9):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def make_trainer(model: nn.Module, args: TrainingArguments, stream: StepStream | None = None,
                 callbacks: list[TrainerCallback] = (), trainer_class: type[WeloreTrainer] | None = None,
                 **kwargs) -> WeloreTrainer:
    """A `trainer_class` (default WeloreTrainer; welore.distill.DistillTrainer distils) over `stream`
    with welore's callbacks in place of Trainer's printing ones; `kwargs` go to the class (loss_chunk,
    and a DistillTrainer's teacher, kd_weight, temperature)."""
    trainer = (trainer_class or WeloreTrainer)(model=model, args=args, train_dataset=stream,
                                               callbacks=list(callbacks), **kwargs)
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return trainer


class NestedSteps(TrainerCallback):
    """Each optimizer step trains one budget, `budget_of_step`'s."""

    def __init__(self, nest: elastic.Nest, seed: int):
        self.nest, self.seed = nest, seed

    def on_step_begin(self, args, state, control, **kwargs):
        self.nest.use(elastic.budget_of_step(list(self.nest.plans), self.seed, state.global_step))
