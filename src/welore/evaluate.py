"""Perplexity with the standard protocol of LLM-compression papers.

Concatenate the corpus, tokenize once, cut it into non-overlapping windows of `seqlen` tokens
(the ragged tail is dropped), and report exp(mean token NLL) over every predicted token.
`max_tokens` bounds the work to the first floor(max_tokens / seqlen) windows.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import corpus_info, encode_corpus
from .errors import WeloreError
from .progress import bar
from .tasks import first_number


@dataclass
class Perplexity:
    corpus: str
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # tokens in the evaluated windows
    seqlen: int
    seconds: float
    sha256: str | None = None  # of the corpus file: which text this was measured on

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def perplexity(model, tokenizer, corpus: str = "wikitext2", *, seqlen: int = 512, max_tokens: int | None = None,
               batch_size: int = 1, text_field: str = "text", progress: bool = True) -> Perplexity:
    """Perplexity of `model` on `corpus`: a name (wikitext2, c4) or a .txt / .jsonl / .json / .parquet
    file whose `text_field` holds the documents (see module docstring)."""
    windows = perplexity_windows(tokenizer, corpus, seqlen, max_tokens, text_field)
    start = time.perf_counter()
    nll = mean_nll(model, windows, batch_size=batch_size, desc=f"Perplexity on {corpus}", progress=progress)
    return Perplexity(corpus, nll_to_ppl(nll), nll, windows.numel(), seqlen, time.perf_counter() - start,
                      corpus_info(corpus, text_field)["sha256"])


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, *, batch_size: int = 1, desc: str = "Perplexity",
             progress: bool = True) -> float:
    """Mean next-token NLL (nats) of `model` over `windows` (n x seqlen token ids)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    pbar = bar(total=windows.numel(), desc=desc, unit="tok", progress=progress)
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i: i + batch_size].to(device)
        total_nll += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
        count += batch[:, 1:].numel()
        pbar.update(batch.numel())
        pbar.set_postfix(ppl=f"{nll_to_ppl(total_nll / count):.2f}")
    pbar.close()
    model.train(was_training)
    return total_nll / count


def nll_to_ppl(nll: float) -> float:
    """exp(nll), or inf past float range (a destroyed model's perplexity)."""
    return math.exp(nll) if nll < 700 else float("inf")


def perplexity_windows(tokenizer, corpus: str, seqlen: int, max_tokens: int | None = None,
                       text_field: str = "text") -> torch.Tensor:
    """The evaluation windows (n x seqlen token ids) of the protocol in the module docstring."""
    if tokenizer is None:
        raise WeloreError("evaluation needs a tokenizer, and this model has none")
    if seqlen < 2:
        raise WeloreError(f"seqlen must be at least 2, got {seqlen}")
    if max_tokens is not None and max_tokens < seqlen:
        raise WeloreError(f"max_tokens ({max_tokens}) must be at least seqlen ({seqlen})")
    return cut_windows(encode_corpus(tokenizer, corpus, max_tokens, text_field), seqlen, max_tokens, corpus)


def cut_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, name: str = "text") -> torch.Tensor:
    """`ids` cut into non-overlapping windows of `seqlen` (the ragged tail dropped), at most
    floor(max_tokens / seqlen) of them: (n x seqlen)."""
    n_windows = ids.numel() // seqlen
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seqlen)
    if n_windows == 0:
        raise WeloreError(f"corpus {name} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of `batch` (b x seqlen) under `logits`; fp32 log-softmax, since
    half-precision logits lose digits in the NLL."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                           reduction="sum").item()


@dataclass
class Accuracy:
    task: str
    accuracy: float
    correct: int
    total: int
    seconds: float
    # mean -log p(answer) with p the softmax of the options' summed log-probabilities (None: no option
    # examples): a continuous score, so that checkpoints can be told apart when accuracies tie
    choice_nll: float | None = None

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval of the accuracy (a binomial proportion over `total` examples)."""
        return wilson_interval(self.correct, self.total)

    def to_dict(self) -> dict:
        return {**self.__dict__, "ci95": list(self.interval)}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% for the default z): unlike the
    normal approximation it stays inside [0, 1] and is honest near 0 and 1."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 or k = n the bound is exactly 0 or 1 (the formula leaves a rounding error)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def encode_example(tokenizer, prompt: str, target: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + target (encoded separately, so the option boundary is exact) and the
    length of the prompt part. Long prompts are cut from the left: the question sits at the end."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"][: max_len - 1]
    p = p[-(max_len - len(t)):]
    return p + t, len(p)


@torch.no_grad()
def option_scores(model, encoded: list[tuple[list[int], int]], shared: bool = True) -> list[float]:
    """Summed log-probability of each option's tokens after its prompt (`encoded`: encode_example's
    (ids, prompt length) per option). With `shared` and one prompt for all options (the usual case),
    the prompt runs once and each option continues from a copy of its KV cache: the same numbers as
    one forward per option, for a fraction of the tokens (date: 6 options of ~8 tokens after a
    ~40-token prompt)."""
    device = next(model.parameters()).device
    prompts = {tuple(ids[:n]) for ids, n in encoded}
    if shared and len(prompts) == 1 and all(n > 0 for _, n in encoded):
        n = encoded[0][1]
        out = model(input_ids=torch.tensor([encoded[0][0][:n]], device=device), use_cache=True)
        cache, first = out.cache, F.log_softmax(out.logits[0, -1].float(), -1)
        scores = []
        for ids, _ in encoded:
            opt = ids[n:]
            score = first[opt[0]].item()
            if len(opt) > 1:  # a copy: a forward appends to the cache it is given (a prompt's is small)
                o = model(input_ids=torch.tensor([opt[:-1]], device=device), cache=copy.deepcopy(cache), use_cache=True)
                logp = F.log_softmax(o.logits[0].float(), -1)
                score += logp.gather(1, torch.tensor(opt[1:], device=device)[:, None]).sum().item()
            scores.append(score)
        return scores
    scores = []
    for ids, n_prompt in encoded:  # prompts cut differently per option (long prompts): one forward each
        x = torch.tensor([ids], device=device)
        logp = F.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), -1)
        scores.append(logp[n_prompt - 1:].gather(1, x[0, 1:, None][n_prompt - 1:]).sum().item())
    return scores


@torch.no_grad()
def task_accuracy(model, tokenizer, examples, task: str = "", *, max_len: int = 512, max_new_tokens: int = 12,
                  progress: bool = True) -> Accuracy:
    """Accuracy on `examples` (welore.tasks.Example): the highest summed option log-probability wins;
    generative examples (no options) need an exact match of the first number generated."""

    if tokenizer is None:
        raise WeloreError("evaluation needs a tokenizer, and this model has none")
    if not examples:
        raise WeloreError(f"no evaluation examples for task {task!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, nll, chosen, start = 0, 0.0, 0, time.perf_counter()
    for ex in bar(examples, desc=f"Accuracy on {task}", unit="ex", progress=progress):
        if ex.options:
            scores = option_scores(model, [encode_example(tokenizer, ex.prompt, o, max_len) for o in ex.options])
            # a NaN score (a diverged model) picks nothing: the example counts as wrong
            correct += int(all(map(math.isfinite, scores)) and max(range(len(scores)), key=scores.__getitem__) == ex.answer)
            nll += (torch.logsumexp(torch.tensor(scores, dtype=torch.float64), 0) - scores[ex.answer]).item()
            chosen += 1
        else:
            ids, _ = encode_example(tokenizer, ex.prompt, "", max_len - max_new_tokens)
            x = torch.tensor([ids], device=device)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
            correct += int(first_number(text.split("\n")[0]) == ex.answer)
    model.train(was_training)
    return Accuracy(task, correct / len(examples), correct, len(examples), time.perf_counter() - start,
                    nll / chosen if chosen else None)
