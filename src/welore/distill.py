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
8 x 512 tokens a step, with checkpointing, that cut a distillation step's peak to a fifth (docs/results.md,
"Distillation with the savers").

`KeepBest` is the guard every recovery run needs: a compressed model is fragile, a too-high
learning rate wrecks it in a few steps, and so the weights with the best held-out score seen at an
evaluation (step 0 included) are what a run returns, never a model worse than its start.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import WeloreError, one_line
from .io import atomic_file, hash_file_heads
from .models import load_model, looks_like_path
from .progress import bar
from .trainer import StepStream, WeloreTrainer, chunked_sum, head_input, output_head, predicted

BEST = "welore_best.safetensors"  # in a Trainer checkpoint: KeepBest's weights
CACHE_FORMAT = "welore-teacher-topk/1"


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
        _same_vocabulary(teacher_head.out_features, head.out_features)
        answers = (teacher.hidden(inputs)[keep], teacher_head, None, None)
    total = chunked_sum(_mix_sum, chunk, hidden[keep], labels, head, kd_weight, temperature, *answers)
    return total / max(len(labels), 1)


def _same_vocabulary(teacher: int, student: int) -> None:
    if teacher != student:
        raise WeloreError(f"the teacher has {teacher} logits per token, the student {student}: they do not "
                          "share a vocabulary")


class Teacher:
    """The frozen dense model, checked to speak the student's vocabulary."""

    def __init__(self, source: str, student_tokenizer, device):
        loaded = load_model(source, device=device)
        self.model, self.source = loaded.model.eval(), loaded.source
        # what the teacher holds for the whole run (its forward's activations come and go each step)
        self.memory_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        self._chunks_checked = False  # top_k in chunks: checked once against the whole logits
        for p in self.model.parameters():
            p.requires_grad_(False)
        tok = loaded.tokenizer
        if tok is None or student_tokenizer is None or tok.get_vocab() != student_tokenizer.get_vocab():
            raise WeloreError(f"the teacher {source} does not share the student's tokenizer (vocabularies differ)")

    @torch.no_grad()
    def logits(self, inputs: dict) -> torch.Tensor:
        kw = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        return self.model(**kw, use_cache=False).logits

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        """What its head reads at each position (for `chunked_kd_loss`)."""
        return head_input(self.model, inputs)

    @property
    def head(self) -> nn.Linear:
        return output_head(self.model)

    @torch.no_grad()
    def top_k(self, inputs: dict, k: int, temperature: float, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities at the temperature, token ids) of the k likeliest next tokens at every
        position but the last: [b, L-1, k] each. With `chunk` > 0 the head runs on `chunk` positions at a
        time, so the [tokens x vocabulary] logits never exist whole (checked once, on one sequence, against
        them: a head that is more than a linear map is refused, as `--loss-chunk` refuses it)."""
        def vocabulary(size: int) -> None:
            if k > size:
                raise WeloreError(f"teacher top-k {k} exceeds its vocabulary ({size} tokens)")

        if not chunk:
            logits = self.logits(inputs)
            vocabulary(logits.shape[-1])
            return F.log_softmax(logits[:, :-1].float() / temperature, -1).topk(k, dim=-1)
        head = self.head
        vocabulary(head.out_features)
        hidden = self.hidden(inputs)[:, :-1]
        parts = [F.log_softmax(head(h).float() / temperature, -1).topk(k, dim=-1)
                 for h in hidden.reshape(-1, hidden.shape[-1]).split(chunk)]
        logp, ids = (torch.cat(p).view(*hidden.shape[:2], k) for p in zip(*parts))
        if not self._chunks_checked:
            whole = F.log_softmax(self.logits({key: v[:1] for key, v in inputs.items()})[:, :-1].float() / temperature, -1)
            tol = 1e-3 if head.weight.dtype == torch.float32 else 2e-2
            if not torch.allclose(whole.gather(-1, ids[:1]), logp[:1], rtol=tol, atol=tol):
                raise WeloreError("--loss-chunk: the teacher's head is more than a linear map of its body's output "
                                  "(a logit soft-cap or scale); run without --loss-chunk")
            self._chunks_checked = True
        return logp, ids


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
            _same_vocabulary(teacher.shape[-1], outputs.logits.shape[-1])
            kd = kd_loss(outputs.logits, teacher, inputs["labels"], self.temperature)
        loss = self.kd_weight * kd + (1 - self.kd_weight) * outputs.loss if self.kd_weight < 1 else kd
        return loss, outputs


# ---------------------------------------------------------------------------------------------
# the teacher's answers, computed once


def source_fingerprint(source: str) -> str:
    """Identity of a model without loading it: name, size and first MiB of each weight file and of
    config.json (a hub id: the id itself)."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")
                       or p.name == "config.json")
    else:
        files = []
    h = hashlib.blake2b(str(source if not files else "").encode(), digest_size=12)
    hash_file_heads(h, files, names=True)
    return h.hexdigest()


def vocab_fingerprint(tokenizer) -> str:
    return hashlib.blake2b(json.dumps(sorted(tokenizer.get_vocab().items())).encode(), digest_size=12).hexdigest()


_ST_DTYPES = {torch.int32: "I32", torch.float16: "F16"}


def _cache_layout(n: int, seqlen: int, top_k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], float]]:
    """name -> (dtype, shape, fill of the positions beyond a short batch's width), in file order."""
    return {"input_ids": (torch.int32, (n, seqlen), -1),  # -1: no token there
            "top_ids": (torch.int32, (n, seqlen - 1, top_k), 0),
            "top_logp": (torch.float16, (n, seqlen - 1, top_k), float("-inf"))}


def build_teacher_cache(path: Path, teacher: Teacher, stream: StepStream, seqlen: int, top_k: int,
                        temperature: float, identity: dict, progress: bool = True, chunk: int = 0) -> float:
    """Run `teacher` over every micro-batch of `stream` and write its tempered top-k log-probabilities
    (fp16: rounding moves a probability p by at most |log p| x 0.05% of itself) with the input tokens and
    `identity`, to `path` in one rename. Returns the seconds it took.

    The file is a safetensors file written a micro-batch at a time (its layout is known up front: the
    header first, then each batch's rows at their offsets), so memory stays one batch whatever the run's
    length; with `chunk` (the run's --loss-chunk), the teacher's logits are never whole either."""
    n = len(stream)
    layout = _cache_layout(n, seqlen, top_k)
    header, offset = {"__metadata__": {"format": CACHE_FORMAT, **{k: str(v) for k, v in identity.items()}}}, 0
    for name, (dtype, shape, _) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    base = 8 + len(head)
    print(f"teacher cache: {n:,} sequences x {seqlen - 1} positions x top {top_k} -> {path} "
          f"({offset / 2**20:,.1f} MiB)", flush=True)
    start = time.perf_counter()
    device = next(teacher.model.parameters()).device
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.truncate(base + offset)
        for t in bar(range(stream.micro_steps), desc="teacher cache", unit="batch", progress=progress):
            batch = stream.batch(t)
            logp, ids = teacher.top_k({k: v.to(device) for k, v in batch.items()}, top_k, temperature, chunk)
            for name, value in (("input_ids", batch["input_ids"]), ("top_ids", ids), ("top_logp", logp)):
                dtype, shape, fill = layout[name]
                rows = torch.full((stream.rows, *shape[1:]), fill, dtype=dtype)
                rows[:, : value.shape[1]] = value.to(dtype).cpu()
                f.seek(base + header[name]["data_offsets"][0] + t * rows.numel() * dtype.itemsize)
                f.write(rows.numpy().tobytes())
    return time.perf_counter() - start


class TeacherCache:
    """A cache file checked against this run: same teacher and settings (`identity`), and the same
    input tokens in every row `stream` will produce. Rows are read from the file as the batches ask
    for them (safetensors slices of a memory map), so memory is a batch, not the file."""

    def __init__(self, path: Path, stream: StepStream, identity: dict):
        try:
            self._file = safe_open(str(path), framework="pt")
            meta = self._file.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise WeloreError(f"{path} is not a welore teacher cache")
            self._slices = {k: self._file.get_slice(k) for k in ("input_ids", "top_ids", "top_logp")}
        except WeloreError:
            raise
        except Exception as e:  # safetensors raises several types for a truncated or foreign file
            raise WeloreError(f"cannot read teacher cache {path}: {one_line(e)}") from e
        for key, want in identity.items():
            if meta.get(key) != str(want):
                raise WeloreError(f"teacher cache {path} was built with another {key} "
                                  f"({meta.get(key)}, this run: {want}); use another file or delete it")
        self.bytes = path.stat().st_size
        held = self._slices["input_ids"].get_shape()[0]
        if held < len(stream):
            raise WeloreError(f"teacher cache {path} holds {held:,} sequences, this run needs "
                              f"{len(stream):,}; use another file or delete it")
        for t in range(stream.micro_steps):  # cheap: the batches are token windows, no model runs
            x = stream.batch(t)["input_ids"]
            got = self._slices["input_ids"][t * stream.rows: (t + 1) * stream.rows]
            if x.shape[1] > got.shape[1] or not (torch.equal(got[:, : x.shape[1]], x.int())
                                                  and (got[:, x.shape[1]:] == -1).all()):
                raise WeloreError(f"teacher cache {path} was built on other batches (another corpus, seed, "
                                  f"seqlen, batch size or tokenizer): first difference at micro-batch {t}")

    def rows(self, index: torch.Tensor, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(top ids, top log-probs) of the stream rows `index`, cut to a batch `width` tokens wide."""
        i = index.cpu().tolist()
        # a micro-batch's rows are consecutive: one slice each; any other order, a slice per row
        runs = [(i[0], i[-1] + 1)] if i == list(range(i[0], i[0] + len(i))) else [(r, r + 1) for r in i]
        return tuple(torch.cat([self._slices[k][a:b, : width - 1] for a, b in runs]).to(device, non_blocking=True)
                     for k in ("top_ids", "top_logp"))


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


def load_teacher(cfg, meta: dict, student_tokenizer, device, stream: StepStream, world_size: int = 1,
                 progress: bool = True) -> tuple[Teacher | TeacherCache | None, dict]:
    """The teacher `cfg.teacher` names ("base": the base model in welore.json), or its cache
    (`cfg.teacher_cache`, built first if missing), or None; and what to report about it."""
    if cfg.teacher is None:
        return None, {}
    source = meta.get("base_model") if cfg.teacher == "base" else cfg.teacher
    if not source:
        raise WeloreError("this model records no base model to distil from; name one: --teacher MODEL")
    if cfg.teacher_cache is None:
        teacher = Teacher(source, student_tokenizer, device)
        return teacher, {"teacher": teacher.source, "teacher_memory_gib": teacher.memory_bytes / 2**30}
    path = Path(cfg.teacher_cache)
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise WeloreError(f"no such teacher: {source}")
    identity = {"teacher": source_fingerprint(source), "vocab": vocab_fingerprint(student_tokenizer),
                "temperature": repr(float(cfg.kd_temperature)), "top_k": cfg.teacher_top_k}
    info = {"teacher": source, "teacher_cache": str(path)}
    if not path.exists():
        if world_size > 1:
            raise WeloreError("build the teacher cache in one process first (the same command without a launcher)")
        teacher = Teacher(source, student_tokenizer, device)
        info.update(teacher_memory_gib=teacher.memory_bytes / 2**30, teacher_cache_build_s=build_teacher_cache(
            path, teacher, stream, cfg.seqlen, cfg.teacher_top_k, cfg.kd_temperature, identity, progress,
            cfg.loss_chunk))
        del teacher  # training runs from the cache alone
    cache = TeacherCache(path, stream, identity)
    return cache, {**info, "teacher_cache_gib": cache.bytes / 2**30}  # on disk: rows are read as needed
