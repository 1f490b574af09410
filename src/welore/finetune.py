"""Fine-tune a compressed model: only the LRC factors (WeLore), everything, LoRA, or GaLore.

    welore.finetune("compressed/x", "tuned/x", FinetuneConfig(mode="lrc", data="c4", steps=200))

The loop runs on Hugging Face `accelerate`, so one code path serves CPU, one GPU, or many
(`accelerate launch`, DDP/FSDP): gradient accumulation, cosine schedule with warmup, gradient
clipping, bf16 autocast on GPU / fp32 on CPU, a tqdm bar with loss and tokens/s, periodic
evaluation, and checkpoints that make a killed run resumable.

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
import math
import resource
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .compress import count_parameters, low_rank_modules, set_trainable
from .data import encode_corpus
from .errors import WeloreError
from .evaluate import encode_example, perplexity, task_accuracy
from .io import atomic_dir, check_output, load_compressed, read_meta, save_compressed
from .models import pick_device
from .progress import bar
from .report import markdown_table, plot_loss_curves
from .tasks import TASKS, task_splits

MODES = ("lrc", "full", "lora", "galore")
DATA = ("c4", *TASKS)


@dataclass
class FinetuneConfig:
    mode: str = "lrc"  # lrc | full | lora | galore
    data: str = "c4"  # "c4" (continual language modelling) or a task name
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seqlen: int = 256  # tokens per training sequence (task examples are cut to this)
    warmup: int = 10  # linear warmup steps before the cosine decay
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_tokens: int = 4096  # held-out tokens for perplexity (c4 mode)
    eval_examples: int = 100  # held-out examples for accuracy (task mode)
    save_every: int = 50  # checkpoint interval in steps (0: never)
    seed: int = 0
    lora_rank: int | None = None  # None: matched to the lrc mode's trainable parameters
    lora_alpha: float | None = None  # None: 2 x rank
    galore_rank: int = 64
    galore_update_gap: int = 50
    galore_scale: float = 0.25
    stop_after: int | None = None  # stop (as if killed) after this many steps: for resume tests

    def validate(self) -> None:
        if self.mode not in MODES:
            raise WeloreError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.data not in DATA:
            raise WeloreError(f"unknown task {self.data!r}; choose one of {', '.join(DATA)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise WeloreError(f"learning rate must be > 0, got {self.lr}")
        for name in ("steps", "batch_size", "grad_accum", "seqlen", "eval_tokens", "eval_examples"):
            if getattr(self, name) <= 0:
                raise WeloreError(f"{name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if self.warmup < 0 or self.eval_every < 0 or self.save_every < 0:
            raise WeloreError("warmup, eval_every and save_every must be >= 0")
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise WeloreError(f"lora rank must be > 0, got {self.lora_rank}")
        if self.seqlen < 8:
            raise WeloreError(f"seqlen must be at least 8, got {self.seqlen}")


@dataclass
class FinetuneResult:
    output: Path
    config: FinetuneConfig
    trainable: int
    total: int
    log: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# data: every batch is a function of (seed, step, micro-step)


class Batches:
    """Training batches: token windows of the C4 training documents, or task examples with the
    loss on the answer tokens only (labels -100 elsewhere)."""

    def __init__(self, tokenizer, cfg: FinetuneConfig, rank: int = 0):
        self.cfg, self.rank = cfg, rank  # rank: the data-parallel process index (each draws its own batch)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        if cfg.data == "c4":
            ids = encode_corpus(tokenizer, "c4-train")
            n = ids.numel() // cfg.seqlen
            if n == 0:
                raise WeloreError("the training corpus is shorter than one sequence")
            self.windows = ids[: n * cfg.seqlen].view(n, cfg.seqlen)
            self.size = n
        else:
            train, _ = task_splits(cfg.data, seed=cfg.seed, n_eval=cfg.eval_examples)
            if not train:
                raise WeloreError(f"task {cfg.data} has no training examples")
            self.examples = [encode_example(tokenizer, ex.prompt, ex.target, cfg.seqlen) for ex in train]
            self.size = len(self.examples)

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step, micro, self.rank])
        idx = rng.integers(0, self.size, self.cfg.batch_size)
        if self.cfg.data == "c4":
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


# ---------------------------------------------------------------------------------------------
# modes


def lora_targets(model: nn.Module) -> list[str]:
    """Every nn.Linear inside the blocks: dense N-LRCs and both factors of each LRC."""
    import re

    index = re.compile(r"\.\d+\.")
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and index.search(f".{n}.")]


def matched_lora_rank(model: nn.Module) -> int:
    """The LoRA rank whose trainable parameter count is closest to the LRC factors' count."""
    lrc = sum(m.down.weight.numel() + m.up.weight.numel() for m in low_rank_modules(model).values())
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if n in set(lora_targets(model)))
    return max(1, round(lrc / per_rank)) if per_rank else 1


def prepare_mode(model: nn.Module, cfg: FinetuneConfig) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """Mark trainable parameters for the mode and build its optimizer. Returns (model, optimizer, info)."""
    info: dict = {}
    if cfg.mode in ("lrc", "full"):
        set_trainable(model, cfg.mode)
    elif cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        rank = cfg.lora_rank or matched_lora_rank(model)
        info["lora_rank"] = rank
        set_trainable(model, "none")
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=cfg.lora_alpha or 2 * rank,
                                                 target_modules=lora_targets(model), lora_dropout=0.0))
    elif cfg.mode == "galore":
        set_trainable(model, "full")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.mode == "galore":
        optimizer = _galore_optimizer(model, cfg, info)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, optimizer, info


def _galore_optimizer(model: nn.Module, cfg: FinetuneConfig, info: dict) -> torch.optim.Optimizer:
    """GaLore (galore-torch's AdamW): full-parameter training whose Adam states live in a rank-r
    projection of each block matrix's gradient; other parameters get plain AdamW."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice is noise here
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise WeloreError(f"GaLore needs the galore-torch package: {e}") from e
    projected = {id(m.weight) for n, m in model.named_modules()
                 if type(m) is nn.Linear and n in set(lora_targets(model)) and min(m.weight.shape) > cfg.galore_rank}
    galore = [p for p in model.parameters() if id(p) in projected]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
    info.update(galore_rank=cfg.galore_rank, galore_matrices=len(galore))
    groups = [{"params": rest},
              {"params": galore, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_gap,
               "scale": cfg.galore_scale, "proj_type": "std"}]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                       no_deprecation_warning=True)


# ---------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak memory during training: CUDA peak allocated on GPU; on CPU the peak resident set size,
    sampled every 20 ms (and the process high-water mark, which also counts loading)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.start_rss = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_memory_gib": self.peak / 2**30, "memory_kind": "cuda peak allocated"}
        return {"peak_memory_gib": self.peak / 2**30, "memory_kind": "peak RSS during training",
                "rss_at_start_gib": self.start_rss / 2**30,
                "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ---------------------------------------------------------------------------------------------
# the loop


def _model_fingerprint(model_dir: Path) -> str:
    """Identity of the starting model: its welore.json plan and weight file size + head bytes."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(read_meta(model_dir)["plan"], sort_keys=True).encode())
    w = model_dir / "model.safetensors"
    h.update(str(w.stat().st_size).encode())
    with open(w, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _evaluate(model, tokenizer, cfg: FinetuneConfig, eval_set, progress: bool) -> dict:
    if cfg.data == "c4":
        out = {}
        for corpus in ("c4", "wikitext2"):
            seqlen = min(cfg.seqlen, cfg.eval_tokens)
            out[f"{corpus}_ppl"] = perplexity(model, tokenizer, corpus, seqlen=seqlen, max_tokens=cfg.eval_tokens,
                                              progress=False).ppl
        return out
    return {"accuracy": task_accuracy(model, tokenizer, eval_set, cfg.data, max_len=cfg.seqlen,
                                      progress=progress).accuracy}


def finetune(model_dir: str | Path, output: str | Path, cfg: FinetuneConfig, *, resume: bool = False,
             overwrite: bool = False, device=None, progress: bool = True) -> FinetuneResult:
    """Fine-tune the compressed model in `model_dir` and write the result to `output` (see module doc)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup


    cfg.validate()
    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise WeloreError(f"no such directory: {model_dir}")
    meta = read_meta(model_dir)  # refuses anything that is not a welore-compressed directory
    check_output(output, overwrite)
    ckpt = output.with_name(output.name + ".ckpt")
    fingerprint = _model_fingerprint(model_dir)
    state_file = ckpt / "trainer_state.json"
    if resume:
        if not state_file.is_file():
            raise WeloreError(f"nothing to resume: no checkpoint in {ckpt}")
        saved = json.loads(state_file.read_text())
        if saved["model_fingerprint"] != fingerprint:
            raise WeloreError(f"checkpoint {ckpt} is from a different model than {model_dir}")
        if saved["config"] != {k: v for k, v in asdict(cfg).items() if k != "stop_after"}:
            raise WeloreError(f"checkpoint {ckpt} was made with different settings; resume with the same ones")
    elif ckpt.exists():
        shutil.rmtree(ckpt)  # a stale checkpoint of an earlier run with this output

    dev = pick_device(device)
    accelerator = Accelerator(cpu=dev.type == "cpu", gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no")
    set_seed(cfg.seed)
    loaded = load_compressed(model_dir, device="cpu")
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise WeloreError(f"{model_dir} has no tokenizer; fine-tuning needs one")
    batches = Batches(tokenizer, cfg, rank=accelerator.process_index)
    eval_set = None if cfg.data == "c4" else task_splits(cfg.data, seed=cfg.seed, n_eval=cfg.eval_examples)[1]
    total = count_parameters(loaded.model)  # before LoRA adds adapters: percentages are of the model
    model, optimizer, info = prepare_mode(loaded.model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    msg = f"[{cfg.mode}] trainable parameters: {trainable:,} / {total:,} ({trainable / total:.2%})"
    print(msg + (f"  {info}" if info else ""), flush=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup, cfg.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    log, evals, start_step = [], [], 0
    if resume:
        accelerator.load_state(str(ckpt / "state"))
        start_step, log, evals = saved["step"], saved["log"], saved["evals"]

    def checkpoint(step: int) -> None:
        # every process takes part in save_state; only the main one touches the directories
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"), safe_serialization=False)
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({
                "step": step, "log": log, "evals": evals, "model_fingerprint": fingerprint,
                "config": {k: v for k, v in asdict(cfg).items() if k != "stop_after"}}))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
        accelerator.wait_for_everyone()

    if start_step == 0:
        evals.append({"step": 0, **_evaluate(model, tokenizer, cfg, eval_set, progress)})
    model.train()
    tokens, train_s = 0, 0.0
    pbar = bar(range(start_step, cfg.steps), desc=f"finetune [{cfg.mode}]", unit="step", progress=progress,
               initial=start_step, total=cfg.steps)
    with PeakMemory(accelerator.device) as mem:
        for step in pbar:
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in batches.get(step, micro).items()}
                with accelerator.accumulate(model):
                    loss = model(**batch, use_cache=False).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                    cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum())
            dt = time.perf_counter() - t0
            tokens, train_s = tokens + step_tokens, train_s + dt
            log.append({"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": step_tokens / dt})
            pbar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                evals.append({"step": done, **_evaluate(model, tokenizer, cfg, eval_set, progress=False)})
                model.train()
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                checkpoint(done)
            if cfg.stop_after is not None and done >= cfg.stop_after and done < cfg.steps:
                pbar.close()
                checkpoint(done)
                raise WeloreError(f"stopped after step {done} as asked; continue with --resume")
    pbar.close()
    evals.append({"step": cfg.steps, **_evaluate(model, tokenizer, cfg, eval_set, progress)})

    model = accelerator.unwrap_model(model)
    if cfg.mode == "lora":
        model = model.merge_and_unload()  # the adapters fold into the (factor) weights they adapt
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = {"trainable_params": trainable, "total_params": total, "train_tokens": tokens,
               "train_seconds": train_s, "tokens_per_s": tokens / train_s if train_s else None,
               "device": str(accelerator.device), **mem.report(), **info}
    result = FinetuneResult(output, cfg, trainable, total, log, evals, metrics)
    record = {"config": asdict(cfg), "base_model_dir": str(model_dir), "metrics": metrics, "evals": evals,
              "log": log, "resumed_from_step": start_step if resume else None}

    settings = {**meta.get("settings", {}), "finetune": asdict(cfg), "finetuned_from": str(model_dir)}
    plan = loaded.plan

    def extra(tmp: Path) -> None:
        (tmp / "finetune.json").write_text(json.dumps(record, indent=1))
        plot_loss_curves({cfg.mode: log}, tmp / "loss.png", title=f"{cfg.data}: training loss")

    if accelerator.is_main_process:
        save_compressed(model, output, plan, tokenizer=tokenizer, base_model=meta.get("base_model"),
                        settings=settings, overwrite=overwrite, extra=extra)
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result

def compare(model_dir: str | Path, output: str | Path, cfg: FinetuneConfig, modes=MODES, *,
            overwrite: bool = False, device=None, progress: bool = True) -> list[dict]:
    """Fine-tune `model_dir` once per mode on the same data, steps and seed, each in a fresh process
    (so peak memory is each mode's own), and write one table and one plot side by side."""
    import subprocess
    import sys


    cfg.validate()
    for m in modes:
        if m not in MODES:
            raise WeloreError(f"unknown training mode {m!r}; choose from {', '.join(MODES)}")
    read_meta(Path(model_dir))
    rows, logs = [], {}
    with atomic_dir(output, overwrite) as tmp:
        for mode in modes:
            args = [sys.executable, "-m", "welore", "finetune", str(model_dir), "-o", str(tmp / mode), "--train", mode,
                    *config_args(cfg), *(["--device", str(device)] if device else []), *([] if progress else ["-q"])]
            if subprocess.run(args).returncode != 0:
                raise WeloreError(f"the {mode} run failed (see its output above)")
            rec = json.loads((tmp / mode / "finetune.json").read_text())
            logs[mode] = rec["log"]
            met, first, last = rec["metrics"], rec["evals"][0], rec["evals"][-1]
            row = {"mode": mode, "trainable params": met["trainable_params"],
                   "trainable %": 100 * met["trainable_params"] / met["total_params"],
                   "peak memory GiB": met["peak_memory_gib"], "tokens/s": met["tokens_per_s"],
                   "train s": met["train_seconds"], "final loss": rec["log"][-1]["loss"]}
            for k in last:
                if k != "step":
                    row[f"{k} before"], row[f"{k} after"] = first[k], last[k]
            rows.append(row)
        header = (f"data {cfg.data}, {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum} sequences of <= {cfg.seqlen} "
                  f"tokens, lr {cfg.lr}, seed {cfg.seed}, memory: {met['memory_kind']}")
        (tmp / "compare.md").write_text(f"# welore compare: {model_dir}\n\n{header}\n\n{markdown_table(rows)}\n\n"
                                        "![loss](compare.png)\n")
        (tmp / "compare.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
        plot_loss_curves(logs, tmp / "compare.png", title=f"{cfg.data}: training loss by mode")
    return rows


def config_args(cfg: FinetuneConfig) -> list[str]:
    """The CLI flags that reproduce `cfg` (mode excepted)."""
    out = []
    for k, v in asdict(cfg).items():
        if k in ("mode", "stop_after") or v is None:
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out
