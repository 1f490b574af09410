"""Calibration statistics: what the data-aware factorisations and the loss allocation know of the data.

For every target matrix, from C4 training documents (never the evaluation text) run through the
model: the Gram matrix X^T X of its inputs and mean |x_j| per input channel (InputStats), and with
`gradients=True` the mean squared gradient of the LM loss with respect to each output channel.
What is done with them lives in welore.factorize (asvd, whiten, whiten-fisher, loss estimates).

Statistics come from forward hooks on the target modules. Modules that read the same input tensor
(q/k/v, gate/up) share one Gram matrix, and blocks are hooked in groups sized to `max_stats_gib`, so
memory stays bounded on large models at the price of more passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import encode_corpus, random_windows
from .errors import WeloreError
from .progress import bar
from .targets import Target


@dataclass
class InputStats:
    """Second-moment statistics of one target's inputs (rows = tokens, columns = input channels)."""

    gram: torch.Tensor  # X^T X (in x in), float64
    abs_mean: torch.Tensor  # mean |x_j| per input channel, float64
    tokens: int
    grad_sq: torch.Tensor | None = None  # mean squared dLoss/dy per output channel (collect_stats(gradients=True))


def calibration_batches(tokenizer, samples: int, seqlen: int, corpus: str = "c4-train", seed: int = 0, *,
                        model: nn.Module | None = None, progress: bool = False) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens from `corpus` (a training corpus, by default), or, with
    corpus "self", `samples` sequences `model` samples itself (`sampled_batches`: no data at all)."""
    if corpus == "self":
        if model is None:
            raise WeloreError("calibrating on the model's own samples needs the model in memory (not --stream)")
        return sampled_batches(model, tokenizer, samples, seqlen, seed=seed, progress=progress)
    if corpus in ("c4", "wikitext2"):
        raise WeloreError(f"{corpus} is evaluation text; calibrate on c4-train")
    if samples <= 0 or seqlen <= 1:
        raise WeloreError(f"calibration needs samples > 0 and seqlen > 1, got {samples} x {seqlen}")
    if tokenizer is None:
        raise WeloreError("calibration needs a tokenizer, and this model has none")
    ids = encode_corpus(tokenizer, corpus)
    if ids.numel() < samples * seqlen:
        raise WeloreError(f"too few calibration tokens: {corpus} has {ids.numel():,}, "
                          f"{samples} x {seqlen} = {samples * seqlen:,} needed")
    return random_windows(ids, samples, seqlen, torch.Generator().manual_seed(seed))


@torch.no_grad()
def sampled_batches(model: nn.Module, tokenizer, samples: int, seqlen: int, *, seed: int = 0, batch: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """`samples` sequences of `seqlen` tokens sampled from `model` itself (temperature 1, no top-k or
    top-p), each from a first token drawn uniformly from the vocabulary's ordinary tokens: calibration
    with no data, as LLM-QAT's data-free generation (Liu et al. 2023). Their inputs are those the model
    meets on its own text; with labels sampled from the model, the squared loss gradients are its true
    Fisher rather than the empirical one. Seeded; the global random state is left as it was."""
    if samples <= 0 or seqlen <= 1:
        raise WeloreError(f"calibration needs samples > 0 and seqlen > 1, got {samples} x {seqlen}")
    if tokenizer is None:
        raise WeloreError("sampling calibration text needs a tokenizer, and this model has none")
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), model.get_input_embeddings().num_embeddings))
                             if i not in special])
    first = ordinary[torch.randint(len(ordinary), (samples,), generator=torch.Generator().manual_seed(seed))]
    was_training, out = model.training, []
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in bar(range(0, samples, batch), desc="Sampling calibration text", unit="batch", progress=progress):
                start = first[i:i + batch, None].to(device)
                out.append(model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen - 1,
                                          min_new_tokens=seqlen - 1, pad_token_id=tokenizer.pad_token_id or 0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def collect_stats(model: nn.Module, targets: list[Target], batches: torch.Tensor, *, max_stats_gib: float = 4.0,
                  gradients: bool = False, progress: bool = True) -> dict[str, InputStats]:
    """Input statistics of every target (see module docstring for sharing and grouping).

    gradients: also backpropagate the LM loss of each calibration sequence (labels = the sequence)
    and record the mean squared gradient per output channel of every target (`grad_sq`).
    Only activations get gradients (the weights' are never formed), so it costs about two forwards.
    """
    device = next(model.parameters()).device
    # group blocks so that one group's Gram matrices fit in max_stats_gib (float64)
    by_layer: dict[object, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    groups, current, size = [], [], 0.0
    for layer_targets in by_layer.values():
        need = sum(t.in_features ** 2 * 8 for t in layer_targets) / 2**30
        if current and size + need > max_stats_gib:
            groups.append(current)
            current, size = [], 0.0
        current += layer_targets
        size += need
    groups.append(current)

    out: dict[str, InputStats] = {}
    pbar = bar(total=len(groups) * len(batches), desc="Calibration passes", unit="seq", progress=progress)
    was_training = model.training
    model.eval()  # statistics of the model as it is used: no dropout
    try:
        for group in groups:
            out.update(_collect_group(model, group, batches, device, pbar, gradients))
    finally:
        model.train(was_training)
        pbar.close()
    return out


def _collect_group(model: nn.Module, group: list[Target], batches: torch.Tensor, device, pbar,
                   gradients: bool) -> dict[str, InputStats]:
    hooks = StatsHooks({t.name: model.get_submodule(t.name) for t in group}, gradients)
    try:
        for seq in batches:
            ids = seq[None].to(device)
            if gradients:
                with torch.enable_grad():
                    # gradients flow to a leaf copy of the embeddings, never to the weights
                    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
                    loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
                    torch.autograd.grad(loss, emb)
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            hooks.next_sequence()
            pbar.update(1)
    finally:
        hooks.remove()
    return hooks.stats()


class StatsHooks:
    """Hooks on `modules` ({name: module}) that accumulate their InputStats over the sequences run
    through them (and, with `gradients`, the squared loss gradients of their outputs). Whatever drives
    the sequences (the whole model here, one block at a time in welore.sequential) gets the same sums.
    Call `next_sequence` after each sequence, `remove` at the end, then `stats`."""

    def __init__(self, modules: dict[str, nn.Module], gradients: bool):
        self.names, self.gradients = list(modules), gradients
        self.owner: dict[str, str] = {}  # module -> the module whose identical input tensor it shares
        self.first_pass: list[tuple[torch.Tensor, str]] = []  # references keep addresses from being reused
        self.acc: dict[str, list] = {}
        self.grad_acc: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._input_hook(n)) for n, m in modules.items()]
        if gradients:
            self.handles += [m.register_forward_hook(self._grad_hook(n)) for n, m in modules.items()]

    def _grad_hook(self, name):
        def fn(module, args, output):
            def on_grad(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)
                self.grad_acc[name] = self.grad_acc[name] + g2 if name in self.grad_acc else g2
            if output.requires_grad:
                output.register_hook(on_grad)
        return fn

    def _input_hook(self, name):
        def fn(module, args):
            x = args[0]
            if name not in self.owner:
                self.owner[name] = next((o for t, o in self.first_pass if t is x), name)
                self.first_pass.append((x, name))
            if self.owner[name] != name:
                return
            # fp32 product per sequence (fast), fp64 running sum (no drift over many sequences)
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            gram, abs_sum = (xf.T @ xf).double(), xf.abs().sum(0).double()
            if name in self.acc:
                self.acc[name][0] += gram
                self.acc[name][1] += abs_sum
                self.acc[name][2] += xf.shape[0]
            else:
                self.acc[name] = [gram, abs_sum, xf.shape[0]]
        return fn

    def next_sequence(self) -> None:
        self.first_pass.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def stats(self) -> dict[str, InputStats]:
        out = {}
        for name in self.names:
            gram, abs_sum, n = self.acc[self.owner[name]]
            g2 = self.grad_acc[name] / n if name in self.grad_acc else None
            if self.gradients and g2 is None:
                raise WeloreError(f"no loss gradient reached {name}: is it used by the forward pass?")
            out[name] = InputStats(gram, abs_sum / n, n, g2)
        return out
