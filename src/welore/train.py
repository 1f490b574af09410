"""Fine-tune a compressed model: only the LRC factors (WeLore), everything, LoRA, GaLore, ... (welore.modes).

    welore.finetune("compressed/x", "tuned/x", FinetuneConfig(mode="lrc", data="c4", steps=200))

The modes are setups of one `transformers.Trainer` (welore.trainer; CPU, one GPU or many): each marks what
trains and picks the optimizer. An elastic directory without --budget trains every budget at once (lrc
only; welore.elastic.Nest: each step one budget's ranks) and stays elastic.

Reproducibility: the batch of step s is a pure function of (seed, s), so a resumed run sees exactly
the batches an uninterrupted one would, and with the optimizer, scheduler and RNG states restored it
reproduces the same loss curve and the same parameters.

Outputs: `OUT/` is a welore-compressed directory (loads with `load_compressed`, merges with
`welore merge`; LoRA adapters are merged into the weights they adapt), plus `finetune.json` (config,
per-step log, evaluations, measurements) and `loss.png`. Checkpoints live in `OUT.ckpt/` while the run
is in flight and are removed when it completes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerCallback, set_seed

from . import elastic
from .allocate import RankPlan
from .data import corpus_info, training_corpus
from .device import PeakMemory
from .distill import DistillTrainer
from .errors import WeloreError
from .evaluate import cut_windows, mean_nll, nll_to_ppl, perplexity, task_accuracy
from .files import check_output, hash_file_heads
from .finetune_config import FinetuneConfig
from .guard import KeepBest, guard_metrics
from .io import is_quantised, load_compressed, read_meta, save_compressed
from .modes import get_mode
from .report import plot_loss_curves, returned_eval
from .shards import ShardReader
from .targets import count_parameters
from .teacher import Teacher, load_teacher, teacher_source
from .trainer import Batches, NestedSteps, StepLog, make_trainer, training_arguments

STATE = "welore_state.json"  # welore's part of a Trainer checkpoint: log, evaluations, model identity


@dataclass
class FinetuneResult:
    output: Path
    config: FinetuneConfig
    trainable: int
    total: int
    log: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- the job


def _model_fingerprint(model_dir: Path, budget: float | None = None) -> str:
    """Identity of the starting model: its welore.json plan (and budget), each weight file's size + head bytes."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(read_meta(model_dir)["plan"], sort_keys=True).encode())
    h.update(b"" if budget is None else f"budget {budget:g}".encode())
    hash_file_heads(h, ShardReader(model_dir).files())  # one file, or the shards of a streamed compression
    return h.hexdigest()


def _weights_digest(model: nn.Module) -> str:
    """A hash of every trainable parameter's bytes."""
    h = hashlib.blake2b(digest_size=12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _evaluate(model, tokenizer, cfg: FinetuneConfig, eval_set, progress: bool, test: bool = True) -> dict:
    """Held-out C4 and WikiText-2 perplexity (and, training on a text file, that of its held-out tail:
    `eval_set` holds its token ids), or for a task (`eval_set` = (validation, eval) examples) the
    accuracy on the eval examples (unless not `test`) and on the validation ones (if any)."""
    was_training = model.training
    if cfg.is_text:
        seqlen = min(cfg.seqlen, cfg.eval_tokens)
        out = {f"{corpus}_ppl": perplexity(model, tokenizer, corpus, seqlen=seqlen, max_tokens=cfg.eval_tokens,
                                           progress=False).ppl for corpus in ("c4", "wikitext2")}
        if eval_set is not None:
            out["heldout_ppl"] = nll_to_ppl(mean_nll(model, cut_windows(eval_set, seqlen), progress=False))
    else:
        val, ev = eval_set
        out = {}
        if test:
            acc = task_accuracy(model, tokenizer, ev, cfg.data, max_len=cfg.seqlen, progress=progress)
            out = {"accuracy": acc.accuracy, "correct": acc.correct, "examples": acc.total, "ci95": list(acc.interval)}
        if val:
            acc = task_accuracy(model, tokenizer, val, cfg.data, max_len=cfg.seqlen, progress=False)
            out["val_accuracy"] = acc.accuracy
            if acc.choice_nll is not None:
                out["val_choice_nll"] = acc.choice_nll
    model.train(was_training)
    return out


class _RunState(TrainerCallback):
    """Evaluations every `eval_every` steps, the `stop_after` stop, and welore's state written into
    each Trainer checkpoint, so that a resume can check it is the same model and settings.

    Not Trainer's `eval_strategy`: its evaluation is the loss on an eval dataset, where a run here is
    judged by perplexity on several held-out corpora or by a task's accuracy (`_evaluate`)."""

    def __init__(self, cfg: FinetuneConfig, evaluate, log: list, evals: list, fingerprint: str, keep: KeepBest | None,
                 data: dict | None = None):
        self.cfg, self.evaluate, self.log, self.evals, self.fingerprint = cfg, evaluate, log, evals, fingerprint
        self.keep, self.data = keep, data

    def on_step_end(self, args, state, control, model=None, **kwargs):
        done, cfg = state.global_step, self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            self.evals.append({"step": done, **self.evaluate(model)})
            if self.keep:
                self.keep.seen(model, done, self.evals[-1])
        if cfg.stop_after is not None and cfg.stop_after <= done < cfg.steps:
            control.should_save, control.should_training_stop = True, True
        if done >= cfg.steps:
            control.should_save = False  # the finished model is saved as the output, not as a checkpoint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE).write_text(json.dumps({
                "step": state.global_step, "log": self.log, "evals": self.evals,
                "model_fingerprint": self.fingerprint, "config": self.cfg.to_dict(), "data": self.data}))
            if self.keep:
                self.keep.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _last_checkpoint(ckpt: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint in `ckpt` (one that has welore's state, written last). Not
    transformers' `get_last_checkpoint`, which takes the newest folder even when a killed save left
    it half written."""
    done = sorted((p for p in ckpt.glob("checkpoint-*") if (p / STATE).is_file()),
                  key=lambda p: int(p.name.split("-")[-1])) if ckpt.is_dir() else []
    if not done:
        raise WeloreError(f"nothing to resume: no checkpoint in {ckpt}")
    return done[-1], json.loads((done[-1] / STATE).read_text())


def finetune(model_dir: str | Path, output: str | Path, cfg: FinetuneConfig, *, resume: bool = False,
             overwrite: bool = False, device=None, progress: bool = True, budget: float | None = None) -> FinetuneResult:
    """Fine-tune the compressed model in `model_dir` (at `budget`, of an elastic one) and write the result
    to `output` (see module doc)."""
    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise WeloreError(f"no such directory: {model_dir}")
    meta = read_meta(model_dir)  # refuses anything that is not a welore-compressed directory
    check_output(output, overwrite)
    ckpt = output.with_name(output.name + ".ckpt")
    fingerprint = _model_fingerprint(model_dir, budget)
    # which text the run trains on, by content: a file edited between runs is other data
    data_info = corpus_info(training_corpus(cfg.data)) if cfg.is_text else None
    last, log, evals = None, [], []
    if resume:
        last, saved = _last_checkpoint(ckpt)
        if saved["model_fingerprint"] != fingerprint:
            raise WeloreError(f"checkpoint {ckpt} is from a different model than {model_dir}")
        if not cfg.same_settings(saved["config"]):
            raise WeloreError(f"checkpoint {ckpt} was made with different settings; resume with the same ones")
        if saved.get("data") and data_info and saved["data"]["sha256"] != data_info["sha256"]:
            raise WeloreError(f"checkpoint {ckpt} was trained on other text than {cfg.data} has now")
        log, evals = saved["log"], saved["evals"]
    elif ckpt.exists():
        shutil.rmtree(ckpt)  # a stale checkpoint of an earlier run with this output

    set_seed(cfg.seed)
    loaded = load_compressed(model_dir, device="cpu", budget=budget)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise WeloreError(f"{model_dir} has no tokenizer; fine-tuning needs one")
    plans = {k: RankPlan.from_dict(p) for k, p in meta["budgets"]["plans"].items()} if "budgets" in meta and budget is None else None
    if plans and (cfg.mode != "lrc" or not cfg.is_text):  # every budget at once: elastic.Nest
        raise WeloreError(f"{model_dir} holds several budgets; the lrc mode trains them all at once on text, "
                          "anything else one at a time: pick it with --budget")
    nest = elastic.Nest(loaded.model, plans, loaded.extra) if plans else None
    total = count_parameters(loaded.model)  # before LoRA adds adapters: percentages are of the model
    loaded.model.config.use_cache = False  # no KV cache while training; restored before saving
    mode = get_mode(cfg.mode, meta.get("base_model"))
    model, optim, info = mode.prepare(loaded.model, cfg)
    args = training_arguments(ckpt, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                              max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, save_every=cfg.save_every,
                              device=device, activation_checkpointing=cfg.activation_checkpointing, **optim)
    source = teacher_source(cfg, meta)  # a bad teacher fails before the data is read; one in the loop loads now
    teacher = Teacher(source, tokenizer, args.device) if source and cfg.teacher_cache is None else None
    batches = Batches(tokenizer, cfg, rows=cfg.batch_size * args.world_size)  # the global batch
    eval_set = batches.held_out  # a text file's tail (None: C4's own held-out documents), or (validation, eval) examples
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    msg = f"[{cfg.mode}] trainable parameters: {trainable:,} / {total:,} ({trainable / total:.2%})"
    print(msg + (f"  {info}" if info else ""), flush=True)
    passes = batches.passes()
    if cfg.is_text and passes > 1:  # tasks are trained over many times by design
        print(f"note: {cfg.steps} steps x {batches.rows * cfg.grad_accum} sequences of {cfg.seqlen} tokens go "
              f"{passes:.1f} times over the {batches.size:,} sequences of {cfg.data}'s training text; "
              "held-out loss can rise once it repeats (--keep-best returns the best evaluation)", flush=True)

    steps = StepLog(f"finetune [{cfg.mode}]", progress, log)
    guard = guard_metrics(cfg, eval_set)
    keep = KeepBest(*guard) if guard else None
    # a task guarded by validation examples scores only those during the run: the eval examples are
    # scored at the start, at the end, and on the weights returned
    during = cfg.is_text or keep is None
    evaluate = _evaluate if nest is None else elastic.nested_evaluation(nest, _evaluate)
    run = _RunState(cfg, lambda m: evaluate(m, tokenizer, cfg, eval_set, False, test=during), log, evals,
                    fingerprint, keep, data_info)
    stream = batches.stream(index=cfg.teacher_cache is not None)
    teacher, teacher_info = load_teacher(cfg, source, tokenizer, args.device, stream, args.world_size, progress,
                                         teacher)
    distil = {} if teacher is None else dict(trainer_class=DistillTrainer, teacher=teacher, kd_weight=cfg.kd_weight,
                                             temperature=cfg.kd_temperature)
    callbacks = [steps, run] + ([NestedSteps(nest, cfg.seed)] if nest else [])
    trainer = make_trainer(model, args, stream, callbacks, loss_chunk=cfg.loss_chunk, **distil)
    if last is None:
        evals.append({"step": 0, **evaluate(trainer.model, tokenizer, cfg, eval_set, progress)})
        if keep:
            keep.seen(trainer.model, 0, evals[0])
    elif keep:
        keep.load(last, trainer.model)
    with PeakMemory(args.device) as mem:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    if trainer.state.global_step < cfg.steps:
        raise WeloreError(f"stopped after step {trainer.state.global_step} as asked; continue with --resume")
    evals.append({"step": cfg.steps, **evaluate(trainer.model, tokenizer, cfg, eval_set, progress)})
    returned = cfg.steps
    if keep:  # never a model worse than the best evaluated, the start included
        keep.seen(trainer.model, cfg.steps, evals[-1])
        returned = keep.restore(trainer.model, cfg.steps)
        chosen = returned_eval(evals, returned)
        if not cfg.is_text and "accuracy" not in chosen:  # weights chosen mid-run: score them on the eval examples
            chosen.update(_evaluate(trainer.model, tokenizer, cfg, (None, eval_set[1]), progress))
    digests = gather_object([_weights_digest(trainer.model)])  # one per process: data parallelism must agree
    if len(set(digests)) > 1:
        raise WeloreError(f"the {len(digests)} processes ended with different weights; nothing was written")

    model, extra = mode.finish(trainer.model), None
    if nest is not None:  # back to an elastic directory: the first budget's model, factors beside its dense matrices
        model, extra = nest.unnest()
    model.eval()
    model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = {"trainable_params": trainable, "total_params": total, "train_tokens": steps.tokens,
               "train_sequences_available": batches.size, "passes": passes,
               "train_seconds": steps.seconds, "tokens_per_s": steps.tokens / steps.seconds if steps.seconds else None,
               "device": str(args.device), "processes": args.world_size, "weights_digest": digests,
               **mem.report(), **info, "returned_step": returned, **teacher_info}
    record = {"config": asdict(cfg), "base_model_dir": str(model_dir), "data": data_info, "metrics": metrics, "evals": evals,
              "log": log, "resumed_from_step": int(last.name.split("-")[-1]) if last else None}
    settings = {**meta.get("settings", {}), "finetune": asdict(cfg), "finetuned_from": str(model_dir),
                **({"budget": budget} if budget is not None else {})}

    def write_extra(tmp: Path) -> None:
        (tmp / "finetune.json").write_text(json.dumps(record, indent=1))
        plot_loss_curves({cfg.mode: log}, tmp / "loss.png", title=f"{cfg.data}: training loss")

    if args.process_index == 0:
        save_compressed(model, output, loaded.plan, tokenizer=tokenizer, base_model=meta.get("base_model"),
                        settings=settings, overwrite=overwrite, extra=write_extra, budgets=plans, tensors=extra)
        shutil.rmtree(ckpt, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(output, cfg, trainable, total, log, evals, metrics)


def recover(model_dir: str | Path, output: str | Path | None = None, steps: int = 500, *, overwrite: bool = False,
            device=None, progress: bool = True, **overrides) -> FinetuneResult:
    """Recover the quality of the compressed model in `model_dir` with the recovery recipe,
    `FinetuneConfig.recovery(steps, **overrides)` (LRC-only, LM loss on C4 train, or on the text file
    `data=FILE`: the domain the model should be good at). output: default MODEL_DIR/recovered.

    With a teacher among the overrides, its answers are cached once and the student trains from the
    cache (faster than the teacher in the loop even for one run: benchmarks/recovery.py --speed), in a
    file next to the output that is removed when the run completes, unless `teacher_cache` names one.
    """
    model_dir = Path(model_dir)
    output = Path(output) if output else model_dir / "recovered"
    ours = overrides.get("teacher") is not None and "teacher_cache" not in overrides  # else the caller's to keep
    cache = output.with_name(output.name + ".teacher.safetensors")
    cfg = FinetuneConfig.recovery(steps, quantised=is_quantised(read_meta(model_dir).get("settings", {})),
                                  **({"teacher_cache": str(cache)} if ours else {}), **overrides)
    check_output(output, overwrite)
    if ours:
        cache.unlink(missing_ok=True)  # left by an earlier, killed recovery, perhaps of other settings
    res = finetune(model_dir, output, cfg, overwrite=overwrite, device=device, progress=progress)
    if ours:
        cache.unlink(missing_ok=True)
    return res
