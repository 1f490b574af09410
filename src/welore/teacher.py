"""The teacher of distillation (welore.distill): the frozen dense model in the loop (`Teacher`), or
its answers computed once and cached (`TeacherCache`): the top-k log-probabilities at the
temperature for every position of every batch of a run, which is a pure function of (seed, step).
Runs on the same batches (every mode of a comparison, a resumed run, a sweep) then train without
the teacher in memory or in the loop. The file records the teacher (its weight files'
fingerprint), the tokenizer, the temperature, k and every input token it was computed on, and a
run whose batches, teacher or settings differ is refused. `load_teacher` gives a run the one it asks for.
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
from torch import nn

from .errors import WeloreError, one_line
from .files import atomic_file, hash_file_heads
from .losses import head_input, output_head
from .models import load_model, looks_like_path
from .progress import bar
from .trainer import StepStream

CACHE_FORMAT = "welore-teacher-topk/1"


def same_vocabulary(teacher: int, student: int) -> None:
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


def teacher_source(cfg, meta: dict) -> str | None:
    """The model `cfg.teacher` names ("base": the base model in welore.json), checked to exist where
    it is a path; None without a teacher. Cheap: a run calls it before it reads any data."""
    if cfg.teacher is None:
        return None
    source = meta.get("base_model") if cfg.teacher == "base" else cfg.teacher
    if not source:
        raise WeloreError("this model records no base model to distil from; name one: --teacher MODEL")
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise WeloreError(f"no such teacher: {source}")
    return source


def load_teacher(cfg, source: str | None, student_tokenizer, device, stream: StepStream, world_size: int = 1,
                 progress: bool = True, teacher: Teacher | None = None) -> tuple[Teacher | TeacherCache | None, dict]:
    """The teacher `source` (`teacher_source`) in the loop (`teacher`, when already loaded), or its
    cache (`cfg.teacher_cache`, built first if missing), or None; and what to report about it."""
    if source is None:
        return None, {}
    if cfg.teacher_cache is None:
        teacher = teacher or Teacher(source, student_tokenizer, device)
        return teacher, {"teacher": teacher.source, "teacher_memory_gib": teacher.memory_bytes / 2**30}
    path = Path(cfg.teacher_cache)
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
