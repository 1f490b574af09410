"""Losses computed a chunk of positions at a time, so the [tokens x vocabulary] logits never exist
whole (`--loss-chunk`): the LM loss here, distillation's in welore.distill. At 8 x 512 tokens a step
the chunked LM loss saves 1.6-1.8 GiB of peak RSS (docs/finetuning.md, "Memory at a large batch").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import WeloreError


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
