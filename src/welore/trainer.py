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
* `chunked_lm_loss` (`loss_chunk`): the LM loss without the whole [tokens x vocabulary] logits in
  memory (at 8 x 512 tokens a step it saves 1.6-1.8 GiB of peak RSS: docs/results.md, "Memory at a large batch").
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .config import FinetuneConfig
from .data import training_text
from .device import pick_device
from .errors import WeloreError
from .evaluate import encode_example
from .progress import bar
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
        of the recovery recipe: docs/results.md, "On a GPU")."""
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


def output_head(model: nn.Module) -> nn.Linear:
    """The output embedding (LM head) of a causal LM, wrapped (DDP, PEFT) or not."""
    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise WeloreError(f"--loss-chunk needs a linear LM head; {type(inner).__name__} has {type(head).__name__}")
    return head


def head_input(model: nn.Module, inputs: dict) -> torch.Tensor:
    """What the LM head of `model` reads at each position of `inputs` ([batch, seqlen, hidden]). The
    model is called whole, through its wrappers (DDP's forward readies the gradients' reduction), and
    a hook on its head keeps what the head was given and lets it compute the last position only."""
    head = output_head(model)
    kept = []

    def take(module, args):
        kept.append(args[0])
        return (args[0][:, -1:], *args[1:])

    hook = head.register_forward_pre_hook(take)
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
    finally:
        hook.remove()
    if len(kept) != 1 or kept[0].shape[:2] != inputs["input_ids"].shape:
        raise WeloreError("--loss-chunk: the model's head did not read one hidden state per position; "
                          "run without --loss-chunk")
    return kept[0]


def predicted(inputs: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(which positions predict a label: [batch, seqlen] bool, the last position never; their labels,
    in the order of `hidden[mask]`): the labels shifted as the LM loss shifts them, -100 ignored."""
    shifted = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].to(device)
    keep = shifted != -100
    return keep, shifted[keep]


def chunked_sum(fn: Callable[..., torch.Tensor], chunk: int, *rows) -> torch.Tensor:
    """sum_i fn(*(r[i:i + chunk] for r in rows)), each call inside non-reentrant activation checkpointing:
    the backward recomputes one chunk's intermediates (its logits) at a time instead of keeping them
    all. Entries of `rows` that are not tensors (a module, a float) are passed as they are."""
    n = len(rows[0])
    total = rows[0].sum() * 0.0  # a batch with nothing to predict still has a graph
    for i in range(0, n, chunk):
        part = [r[i: i + chunk] if isinstance(r, torch.Tensor) else r for r in rows]
        total = total + checkpoint(fn, *part, use_reentrant=False)
    return total


def _head_nll_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")  # fp32, as transformers' own loss


def chunked_lm_loss(model: nn.Module, inputs: dict, chunk: int, num_items: torch.Tensor | int | None = None
                    ) -> torch.Tensor:
    """The causal LM loss of `model` on `inputs` (labels shifted, -100 ignored): the summed token NLL
    over `num_items`, else the mean, as transformers computes it. The head runs on `chunk` predicted
    positions at a time inside activation checkpointing (`chunked_sum`), so the backward keeps the
    body's output and recomputes one chunk's logits at a time: the [tokens x vocabulary] logits and
    their log-softmax never exist whole (at 8 x 512 tokens and SmolLM2's 49,152-token vocabulary,
    0.75 GiB per fp32 copy). Positions without a label (a task's prompt) never reach the head."""
    hidden = head_input(model, inputs)
    keep, y = predicted(inputs, hidden.device)
    total = chunked_sum(_head_nll_sum, chunk, hidden[keep], y, output_head(model))
    return total / (num_items if num_items is not None else max(len(y), 1))


class WeloreTrainer(Trainer):
    """Trainer with GaLore's groups given the run's weight decay (Trainer builds them without it), and
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
                 callbacks: list[TrainerCallback] = (), teacher=None, loss_chunk: int = 0, **distill) -> WeloreTrainer:
    """A Trainer over `stream` with welore's callbacks in place of Trainer's printing ones; with a
    `teacher` (welore.distill.Teacher or TeacherCache), its loss is distillation (`distill`: kd_weight,
    temperature), else the LM loss; either computed in chunks when `loss_chunk` > 0."""
    kwargs = dict(model=model, args=args, train_dataset=stream, callbacks=list(callbacks), loss_chunk=loss_chunk)
    if teacher is None:
        trainer = WeloreTrainer(**kwargs)
    else:
        from .distill import DistillTrainer  # it subclasses WeloreTrainer

        trainer = DistillTrainer(**kwargs, teacher=teacher, **distill)
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return trainer
