import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import savers_train_the_same_steps
from safetensors.torch import load_file

from welore import WeloreError, load_compressed
from welore.finetune_config import FinetuneConfig
from welore.modes import low_rank_modules, matched_lora_rank, prepare_mode
from welore.report import finetune_row, returned_eval
from welore.train import finetune
from welore.trainer import Batches, make_trainer, task_data, training_arguments

FAST = dict(steps=12, lr=3e-3, batch_size=2, seqlen=64, warmup=2, eval_tokens=256, save_every=0)


def test_lrc_mode_changes_only_the_lrc_factors(compressed_dir, tmp_path):
    before = load_file(str(compressed_dir / "model.safetensors"))
    finetune(compressed_dir, tmp_path / "out", FinetuneConfig(mode="lrc", **FAST), progress=False)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert before.keys() == after.keys()
    factors = [k for k in before if k.endswith(("down.weight", "up.weight"))]
    assert factors
    for k in before:
        if k in factors:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:  # N-LRCs, embeddings, norms, head, LRC biases: bitwise unchanged
            assert torch.equal(before[k], after[k]), f"{k} changed"


@pytest.mark.parametrize("mode", ["lrc", "full", "lora", "galore", "qlrc", "qlora"])
def test_each_mode_learns_a_memorisable_batch(compressed_dir, tokenizer, mode, tmp_path):
    cfg = FinetuneConfig(mode=mode, lr=1e-2, galore_rank=4, galore_update_gap=10)
    model, optim, _ = prepare_mode(load_compressed(compressed_dir).model, cfg)
    # the optimizer the run's Trainer builds (GaLore through Trainer's optim="galore_adamw")
    optimizer = make_trainer(model, training_arguments(tmp_path, steps=1, lr=cfg.lr, batch_size=2, device="cpu",
                                                       **optim)).create_optimizer()
    model.train()
    batch = Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2)).get(0, 0)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_galore_scale_multiplies_the_step_of_the_projected_matrices_only(compressed_dir, tokenizer, tmp_path):
    # GaLore moves a projected matrix by lr x scale x (Adam's direction, projected back): at scale 0.25
    # and one --lr for every mode, its matrices would take a quarter of the other modes' step
    batch = Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2)).get(0, 0)
    steps, projected = {}, set()
    for scale in (1.0, 0.25):
        cfg = FinetuneConfig(mode="galore", lr=1e-3, galore_rank=4, galore_scale=scale)
        model, optim, _ = prepare_mode(load_compressed(compressed_dir).model, cfg)
        optimizer = make_trainer(model, training_arguments(tmp_path, steps=1, lr=cfg.lr, batch_size=2, device="cpu",
                                                           **optim)).create_optimizer()
        names = {id(p): n for n, p in model.named_parameters()}
        projected = {names[id(p)] for g in optimizer.param_groups if "rank" in g for p in g["params"]}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**batch).loss.backward()
        optimizer.step()
        steps[scale] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    assert projected and len(projected) < len(steps[1.0])
    for n, step in steps[1.0].items():
        assert step.abs().max() > 0, f"{n} did not move"
        # atol: the steps are differences of weights, rounded at the weights' own magnitude
        torch.testing.assert_close(steps[0.25][n], 0.25 * step if n in projected else step, rtol=1e-4,
                                   atol=1e-4 * step.abs().max().item())


@pytest.mark.parametrize("mode", ["lrc", "full", "lora", "galore", "qlrc", "qlora"])
def test_each_mode_lowers_held_out_perplexity(compressed_dir, tmp_path, mode):
    res = finetune(compressed_dir, tmp_path / mode, FinetuneConfig(mode=mode, galore_rank=4, **FAST), progress=False)
    first, last = res.evals[0], res.evals[-1]
    assert last["c4_ppl"] < first["c4_ppl"] and last["wikitext2_ppl"] < first["wikitext2_ppl"]
    assert 0 < res.trainable <= res.total and res.metrics["tokens_per_s"] > 0
    assert res.metrics["peak_memory_gib"] > 0
    rec = json.loads((tmp_path / mode / "finetune.json").read_text())
    assert len(rec["log"]) == FAST["steps"] and rec["config"]["mode"] == mode
    assert (tmp_path / mode / "loss.png").is_file()
    # the result is a normal compressed directory: loads, and keeps the rank plan
    loaded = load_compressed(tmp_path / mode)
    assert loaded.plan.to_dict() == load_compressed(compressed_dir).plan.to_dict()


def test_lora_rank_is_matched_to_lrc(compressed_dir):
    model = load_compressed(compressed_dir).model
    rank = matched_lora_rank(model)
    lrc_params = prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="lrc"))[0]
    lrc = sum(p.numel() for p in lrc_params.parameters() if p.requires_grad)
    lora = sum(p.numel() for p in prepare_mode(model, FinetuneConfig(mode="lora"))[0].parameters() if p.requires_grad)
    per_rank = lora / rank
    assert abs(lora - lrc) <= per_rank / 2 + 1


def test_lora_targets_select_the_adapted_linears(compressed_dir):
    factors = r"\.(down|up)$"
    model = load_compressed(compressed_dir).model
    lrc = sum(m.down.weight.numel() + m.up.weight.numel() for m in low_rank_modules(model).values())
    model, _, info = prepare_mode(model, FinetuneConfig(mode="lora", lora_targets=factors))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and all(re.search(factors, n) for n in adapted)
    assert info["lora_matrices"] == 2 * len(low_rank_modules(model))  # every LRC's two factors, no dense N-LRC
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(lora - lrc) <= lora / info["lora_rank"] / 2 + 1  # still matched to lrc's count
    with pytest.raises(WeloreError, match="no linear layer in the blocks matches"):
        prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="lora", lora_targets="nothing"))


@pytest.mark.parametrize("mode", ["lrc", "full", "lora", "galore", "qlora"])
def test_resume_reproduces_an_uninterrupted_run(compressed_dir, tmp_path, mode):
    cfg = dict(FAST, steps=10, save_every=3, mode=mode, galore_rank=4, galore_update_gap=4)
    full = finetune(compressed_dir, tmp_path / "a", FinetuneConfig(**cfg), progress=False)
    with pytest.raises(WeloreError, match="stopped after step 5"):
        finetune(compressed_dir, tmp_path / "b", FinetuneConfig(**cfg, stop_after=5), progress=False)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.ckpt").is_dir()
    resumed = finetune(compressed_dir, tmp_path / "b", FinetuneConfig(**cfg), resume=True, progress=False)
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in full.log]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b.ckpt").exists()  # cleaned up after completion


def test_resume_refuses_another_model_or_other_settings(compressed_dir, tmp_path, tokenizer):
    cfg = dict(FAST, steps=6, save_every=2)
    with pytest.raises(WeloreError, match="stopped"):
        finetune(compressed_dir, tmp_path / "b", FinetuneConfig(**cfg, stop_after=2), progress=False)
    with pytest.raises(WeloreError, match="different settings"):
        finetune(compressed_dir, tmp_path / "b", FinetuneConfig(**dict(cfg, lr=1e-4)), resume=True, progress=False)
    other = tmp_path / "other"
    finetune(compressed_dir, other, FinetuneConfig(**dict(FAST, steps=2)), progress=False)  # different weights
    with pytest.raises(WeloreError, match="different model"):
        finetune(other, tmp_path / "b", FinetuneConfig(**cfg), resume=True, progress=False)
    with pytest.raises(WeloreError, match="nothing to resume"):
        finetune(compressed_dir, tmp_path / "c", FinetuneConfig(**cfg), resume=True, progress=False)


def test_task_mode_trains_on_answers_only(compressed_dir, tokenizer, tmp_path):
    batch = Batches(tokenizer, FinetuneConfig(data="coinflip", seqlen=128, batch_size=3)).get(0, 0)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        answer = tokenizer.decode(ids[labels != -100])
        assert answer in (" yes", " no")
    res = finetune(compressed_dir, tmp_path / "t", FinetuneConfig(data="coinflip", eval_examples=10,
                                                                  **dict(FAST, seqlen=128)), progress=False)
    assert 0 <= res.evals[-1]["accuracy"] <= 1


def test_a_guarded_task_run_chooses_by_validation_examples_it_never_trains_on(compressed_dir, tokenizer, tmp_path):
    cfg = FinetuneConfig(data="coinflip", eval_examples=20, val_examples=8, eval_every=1,
                         **dict(FAST, steps=3, seqlen=128))
    train, val, ev = task_data(cfg)
    assert len(val) == 8 and len(train) + len(val) == 500 - 20  # coin flip has 500 examples
    assert not {e.prompt for e in val} & ({e.prompt for e in train} | {e.prompt for e in ev})
    assert len(Batches(tokenizer, cfg).examples) == len(train)  # set aside: never trained on
    assert len(task_data(replace(cfg, keep_best=False))[0]) == 480  # no guard, no validation split
    res = finetune(compressed_dir, tmp_path / "t", cfg, progress=False)
    # the eval examples are scored at the start and the end only; the guard reads the validation ones
    assert [("accuracy" in e, "val_choice_nll" in e) for e in res.evals] == [(True, True)] + [(False, True)] * 2 + [
        (True, True)]
    best = min(res.evals, key=lambda e: (-e["val_accuracy"], e["val_choice_nll"]))  # the first of equals
    assert res.metrics["returned_step"] == best["step"]
    returned = returned_eval(res.evals, best["step"])
    assert {"accuracy", "ci95", "val_accuracy"} <= returned.keys()  # scored on the eval examples, once chosen
    row = finetune_row("lrc", json.loads((tmp_path / "t" / "finetune.json").read_text()))
    assert row["accuracy after"] == returned["accuracy"]  # `welore compare` reports the returned weights


def test_a_task_run_wrecked_by_its_learning_rate_returns_its_start(compressed_dir, tmp_path):
    cfg = FinetuneConfig(data="coinflip", eval_examples=20, val_examples=8, **dict(FAST, steps=3, seqlen=128, lr=50.0))
    res = finetune(compressed_dir, tmp_path / "t", cfg, progress=False)
    first, last = res.evals[0], res.evals[-1]
    assert (last["val_accuracy"], -last["val_choice_nll"]) <= (first["val_accuracy"], -first["val_choice_nll"]) or \
        math.isnan(last["val_choice_nll"])  # worse, or NaN
    assert res.metrics["returned_step"] == 0
    assert returned_eval(res.evals, 0)["accuracy"] == res.evals[0]["accuracy"]


def _text_file(path: Path, lines: int = 400) -> Path:
    """A small text of a few repeated sentence shapes: learnable, so its held-out tail gets easier."""
    path.write_text("\n".join(f"The {w} sat on mat number {i % 7}, and the {w} was happy." for i, w in
                              zip(range(lines), ["cat", "dog", "bird", "fox"] * lines)))
    return path


def test_a_text_file_is_trained_on_less_its_held_out_tail(compressed_dir, tokenizer, tmp_path):
    text = _text_file(tmp_path / "mine.txt")
    cfg = FinetuneConfig(data=str(text), **FAST)
    batches = Batches(tokenizer, cfg)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    assert batches.held_out.tolist() == ids[-cfg.eval_tokens:]  # the tail, set apart...
    assert batches.windows.numel() <= len(ids) - cfg.eval_tokens  # ...and never trained on
    assert batches.windows.flatten().tolist() == ids[: batches.windows.numel()]
    res = finetune(compressed_dir, tmp_path / "o", cfg, progress=False)
    first, last = res.evals[0], res.evals[-1]
    assert {"c4_ppl", "wikitext2_ppl", "heldout_ppl"} <= first.keys()
    assert last["heldout_ppl"] < 0.5 * first["heldout_ppl"]
    rec = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert rec["data"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    # C4 runs say which text they trained on too, and are judged on C4's own held-out documents
    assert "heldout_ppl" not in finetune(compressed_dir, tmp_path / "c", FinetuneConfig(**dict(FAST, steps=1)),
                                         progress=False).evals[-1]


def test_resume_refuses_an_edited_text_file(compressed_dir, tmp_path):
    text = _text_file(tmp_path / "mine.txt")
    cfg = dict(FAST, steps=4, save_every=2, data=str(text))
    with pytest.raises(WeloreError, match="stopped"):
        finetune(compressed_dir, tmp_path / "o", FinetuneConfig(**cfg, stop_after=2), progress=False)
    _text_file(text, lines=401)
    with pytest.raises(WeloreError, match="trained on other text"):
        finetune(compressed_dir, tmp_path / "o", FinetuneConfig(**cfg), resume=True, progress=False)


@pytest.mark.parametrize("data, message", [
    ("nope.txt", "no such corpus file"),
    ("{short}", "needs at least"),
    ("{c4}", "holds evaluation text"),
])
def test_bad_training_text(compressed_dir, tmp_path, data, message):
    from welore.data import corpus_path
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold out anything.")
    data = data.format(short=short, c4=corpus_path("c4"))
    with pytest.raises(WeloreError, match=message):
        finetune(compressed_dir, tmp_path / "o", FinetuneConfig(**dict(FAST, data=data)), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(data="mmlu"), "unknown task"),
    (dict(mode="adapter"), "unknown training mode"),
    (dict(lr=0.0), "learning rate must be > 0"),
    (dict(lr=-1e-3), "learning rate must be > 0"),
    (dict(steps=0), "steps must be > 0"),
    (dict(seqlen=10**9), "shorter than one sequence"),
])
def test_bad_configs(compressed_dir, tmp_path, kwargs, message):
    with pytest.raises(WeloreError, match=message):
        finetune(compressed_dir, tmp_path / "o", FinetuneConfig(**dict(FAST, **kwargs)), progress=False)
    assert not (tmp_path / "o").exists()


def test_not_a_compressed_directory(model_dir, tmp_path):
    with pytest.raises(WeloreError, match="not a welore model directory"):
        finetune(model_dir, tmp_path / "o", FinetuneConfig(**FAST), progress=False)
    with pytest.raises(WeloreError, match="no such directory"):
        finetune(tmp_path / "nope", tmp_path / "o", FinetuneConfig(**FAST), progress=False)


# no "saved" case alone: "distil-saved" runs the same savers (its loss mixes the chunked LM loss in)
@pytest.mark.parametrize("how", ["own-loss", "distil-saved", "distil-cached-saved"])
def test_two_processes_match_one(compressed_dir, model_dir, tmp_path, how):
    """Two processes (DDP over gloo) end with the same weights on both ranks, and their losses and
    weights match one process with the same global batch. `accelerate launch --cpu` would start one
    process here (its multi-CPU path needs mpirun); its torchrun launcher starts two, on the CPU.
    The chunked loss applies the head outside the model's forward: its gradients must still be reduced.
    Distillation: each process runs the teacher on its own rows, or looks up their cached answers."""
    steps = dict(steps=4, seqlen=32, lr=3e-3, warmup=1, eval_tokens=64, save_every=0)
    saved = dict(activation_checkpointing=True, loss_chunk=5)
    distil = dict(saved, teacher=str(model_dir), kd_weight=0.5)
    extra = {"own-loss": {}, "distil-saved": distil,
             "distil-cached-saved": dict(distil, teacher_top_k=16, teacher_cache=str(tmp_path / "teacher.safetensors"))}[how]
    # one process first: it builds the teacher cache, which several processes may only read
    one = finetune(compressed_dir, tmp_path / "one", FinetuneConfig(batch_size=2, **steps, **extra), progress=False)
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in {**steps, **extra}.items()]
    welore_cli = Path(sys.executable).with_name("welore")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(welore_cli), "finetune",
              str(compressed_dir), "-o", str(tmp_path / "two"), "--batch-size", "1", "--device", "cpu", "-q", *flags]
    run = subprocess.run(launch, capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    digests = two["metrics"]["weights_digest"]
    assert two["metrics"]["processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert one.metrics["processes"] == 1 and one.metrics["train_tokens"] == two["metrics"]["train_tokens"]
    assert [e["loss"] for e in two["log"]] == pytest.approx([e["loss"] for e in one.log], rel=1e-4)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("mode", ["lrc", "full", "lora"])
@pytest.mark.parametrize("data, extra", [("c4", {}), ("coinflip", dict(eval_examples=20, val_examples=8, seqlen=128))])
def test_memory_savers_train_the_same_steps(compressed_dir, tmp_path, monkeypatch, mode, data, extra):
    # gradient checkpointing and the chunked LM loss change what is kept for the backward, not the
    # steps: the same losses and weights as the model's own loss (a task's batches have uneven label
    # counts, which the accumulated loss must weigh as transformers does)
    from transformers import PreTrainedModel

    from welore.trainer import CHECKPOINTING

    enabled = []  # what Trainer asked of the model (transformers 5.25 renamed the method)
    method = f"{CHECKPOINTING}_enable"
    enable = getattr(PreTrainedModel, method)
    monkeypatch.setattr(PreTrainedModel, method, lambda self, **kw: (enabled.append(kw), enable(self, **kw))[1])
    def turned_on_for_the_saved_run_only(name):
        assert len(enabled) == (name == "saved")  # Trainer turned checkpointing on for that run only

    base = dict(FAST, steps=3, grad_accum=2, mode=mode, data=data, **extra)
    savers_train_the_same_steps(compressed_dir, tmp_path, base, atol=1e-6, after_run=turned_on_for_the_saved_run_only)
    assert "'use_reentrant': False" in str(enabled[0])


def test_chunked_loss_refuses_a_head_that_is_not_linear(compressed_dir, model_dir, tmp_path, monkeypatch):
    # a logit soft-cap after the head (Gemma 2's), in the model's forward (the student's, and with a teacher
    # of the same class, its teacher's too): the chunked loss (LM, distillation) would be another loss
    from transformers import LlamaForCausalLM

    from welore.losses import chunked_lm_loss

    loaded = load_compressed(compressed_dir)
    batch = Batches(loaded.tokenizer, FinetuneConfig(seqlen=32, batch_size=2)).get(0, 0)
    torch.testing.assert_close(chunked_lm_loss(loaded.model, batch, 5), loaded.model(**batch).loss)
    forward = LlamaForCausalLM.forward

    def capped(self, *args, labels=None, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        out = forward(self, *args, **kwargs)
        out.logits = torch.tanh(out.logits)
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", capped)
    cache = tmp_path / "teacher.safetensors"
    for name, extra in (("lm", {}), ("kd", dict(teacher=str(model_dir), kd_weight=0.5)),
                        ("kd-cached", dict(teacher=str(model_dir), teacher_cache=str(cache)))):
        with pytest.raises(WeloreError, match="run without --loss-chunk"):
            finetune(compressed_dir, tmp_path / name, FinetuneConfig(**FAST, loss_chunk=8, **extra), progress=False)
        assert not (tmp_path / name).exists() and not cache.exists()


@pytest.mark.parametrize("data, extra", [("coinflip", dict(eval_examples=20, val_examples=8, seqlen=128)), ("c4", {})])
def test_evaluations_during_a_run_leave_its_training_untouched(compressed_dir, tmp_path, data, extra):
    # the guard evaluates (and snapshots the best weights) every eval_every steps: that must not move the
    # losses of the steps in between, or a guarded run would be another run than the unguarded one
    logs = [[e["loss"] for e in finetune(compressed_dir, tmp_path / str(every), FinetuneConfig(
        data=data, eval_every=every, **dict(FAST, steps=6, **extra)), progress=False).log if "loss" in e]
        for every in (0, 2)]
    assert len(logs[0]) == 6 and logs[0] == logs[1]
