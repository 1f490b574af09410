import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny, savers_train_the_same_steps
from safetensors.torch import load_file, save_file

from welore import WeloreError, load_compressed
from welore.distill import kd_loss, kd_loss_topk
from welore.finetune_config import FinetuneConfig
from welore.guard import KeepBest
from welore.teacher import Teacher, TeacherCache, build_teacher_cache
from welore.train import finetune
from welore.trainer import Batches

FAST = dict(steps=4, lr=3e-3, batch_size=2, seqlen=64, warmup=0, eval_tokens=256, save_every=0)


def test_kd_loss_is_the_tempered_kl_on_labelled_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, -100, -100, 4, 5]])
    T = 2.0
    want, n = 0.0, 0
    for b in range(2):
        for i in range(4):  # position i predicts label i + 1
            if labels[b, i + 1] != -100:
                p, q = F.softmax(t[b, i] / T, -1), F.softmax(s[b, i] / T, -1)
                want += (p * (p.log() - q.log())).sum().item()
                n += 1
    assert kd_loss(s, t, labels, T).item() == pytest.approx(T**2 * want / n, rel=1e-5)
    assert kd_loss(t, t, labels, T).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_of_the_first_step(compressed_dir, model_dir, tmp_path):
    """The logged loss of step 1 is kd_weight * KL(teacher || student) + (1 - kd_weight) * LM on its batch."""
    cfg = FinetuneConfig(teacher=str(model_dir), kd_weight=0.7, kd_temperature=1.5, **{**FAST, "steps": 1})
    res = finetune(compressed_dir, tmp_path / "out", cfg, progress=False)
    student, teacher = load_compressed(compressed_dir), Teacher(str(model_dir), load_compressed(compressed_dir).tokenizer, "cpu")
    batch = Batches(student.tokenizer, cfg).get(0, 0)
    with torch.no_grad():
        out = student.model(**batch)
        want = 0.7 * kd_loss(out.logits, teacher.logits(batch), batch["labels"], 1.5) + 0.3 * out.loss
    assert res.log[0]["loss"] == pytest.approx(want.item(), rel=1e-3)
    assert res.metrics["teacher"] == str(model_dir) and res.metrics["teacher_memory_gib"] > 0
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["config"]["teacher"] == str(model_dir)


@pytest.mark.parametrize("mode", ["lrc", "full", "lora", "galore"])
def test_every_mode_distils(compressed_dir, model_dir, tmp_path, mode):
    cfg = FinetuneConfig(mode=mode, teacher=str(model_dir), galore_rank=4, keep_best=False, **FAST)
    res = finetune(compressed_dir, tmp_path / mode, cfg, progress=False)
    assert len(res.log) == 4 and all(r["loss"] > 0 for r in res.log)


def test_bad_teachers(compressed_dir, tmp_path, tokenizer):
    with pytest.raises(WeloreError):  # the fixture's base model "tiny" is not a model anywhere
        finetune(compressed_dir, tmp_path / "a", FinetuneConfig(teacher="base", **FAST), progress=False)
    with pytest.raises(WeloreError):
        finetune(compressed_dir, tmp_path / "b", FinetuneConfig(teacher=str(tmp_path / "nowhere"), **FAST),
                 progress=False)
    other = tmp_path / "other"  # same architecture, another tokenizer (a vocabulary with one token renamed)
    make_tiny("llama").save_pretrained(other)
    vocab = tokenizer.get_vocab()
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str().replace(json.dumps(min(vocab, key=vocab.get))[1:-1] + '":', 'QQ":', 1)))
    tok.save_pretrained(other)
    with pytest.raises(WeloreError, match="tokenizer"):
        finetune(compressed_dir, tmp_path / "c", FinetuneConfig(teacher=str(other), **FAST), progress=False)
    for kw, msg in [({"kd_weight": 1.5}, "kd weight"), ({"kd_temperature": 0.0}, "temperature")]:
        with pytest.raises(WeloreError, match=msg):
            FinetuneConfig(**kw)
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_keep_best_returns_the_start_when_training_wrecks_the_model(compressed_dir, tmp_path):
    before = load_compressed(compressed_dir).model.state_dict()
    cfg = FinetuneConfig(**{**FAST, "lr": 50.0})  # diverges
    res = finetune(compressed_dir, tmp_path / "out", cfg, progress=False)
    assert res.evals[-1]["c4_ppl"] > res.evals[0]["c4_ppl"] and res.metrics["returned_step"] == 0
    after = load_compressed(tmp_path / "out").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    res = finetune(compressed_dir, tmp_path / "raw", FinetuneConfig(keep_best=False, **{**FAST, "lr": 50.0}),
                   progress=False)
    assert res.metrics["returned_step"] == 4


def test_keep_best_remembers_the_lowest_perplexity():
    model = torch.nn.Linear(2, 2)
    keep = KeepBest("c4_ppl")
    keep.seen(model, 0, {"c4_ppl": 10.0})
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    keep.seen(model, 5, {"c4_ppl": 12.0})
    assert keep.restore(model, 5) == 0 and torch.equal(model.weight, start)
    acc = KeepBest("accuracy")
    acc.seen(model, 0, {"accuracy": 0.5})
    acc.seen(model, 5, {"accuracy": 0.7})
    assert acc.restore(model, 5) == 5
    task = KeepBest("val_accuracy", "val_choice_nll")  # accuracy first; the loss (lower-better) breaks ties
    task.seen(model, 0, {"val_accuracy": 0.5, "val_choice_nll": 0.69})
    task.seen(model, 5, {"val_accuracy": 0.6, "val_choice_nll": 1.5})  # more right, though confidently wrong at times
    task.seen(model, 10, {"val_accuracy": 0.6, "val_choice_nll": 1.2})
    task.seen(model, 15, {"val_accuracy": 0.6, "val_choice_nll": 1.3})
    assert task.best == ((-0.6, 1.2), 10)
    wrecked = KeepBest("c4_ppl")  # a NaN score is never the best, even the first one seen
    wrecked.seen(model, 0, {"c4_ppl": float("nan")})
    wrecked.seen(model, 5, {"c4_ppl": 1e6})
    assert wrecked.best == ((1e6,), 5)


def test_the_teacher_flag_alone_names_the_base_model():
    from welore.cli import build_parser
    from welore.config import from_namespace

    def parsed(*flags):
        return from_namespace(FinetuneConfig, build_parser().parse_args(["finetune", "m", "-o", "o", *flags]))

    assert parsed("--teacher").teacher == "base" and parsed().teacher is None
    assert parsed("--teacher", "some/dir", "--kd-weight", "0.5").teacher == "some/dir"
    assert parsed("--no-keep-best").keep_best is False


def test_topk_kd_loss_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g) * 3, torch.randn(2, 6, 11, generator=g) * 3
    labels = torch.tensor([[1, 2, 3, 4, 5, 6], [1, -100, -100, 4, 5, 6]])
    T = 2.0
    full = kd_loss(s, t, labels, T).item()
    for k in (11, 5, 1):
        logp, ids = F.log_softmax(t[:, :-1] / T, -1).topk(k, -1)
        got = kd_loss_topk(s, ids, logp, labels, T).item()
        assert got == pytest.approx(full, rel=1e-5) if k == 11 else 0 <= got < full
    logp, ids = F.log_softmax(t[:, :-1] / T, -1).topk(5, -1)
    assert kd_loss_topk(t, ids, logp, labels, T).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kd_weight", [1.0, 0.4, 0.0])
def test_the_chunked_distillation_loss_is_the_whole_logits_one(compressed_dir, model_dir, tmp_path, tokenizer, kd_weight):
    """chunked_kd_loss gives DistillTrainer's loss (and gradients) from the whole logits, with the
    teacher in the loop and from its cache, on a batch with a masked prompt."""
    from welore.distill import DistillTrainer, chunked_kd_loss
    from welore.trainer import StepStream, training_arguments

    student = load_compressed(compressed_dir).model
    params = [p for p in student.parameters() if p.requires_grad]
    teacher = Teacher(str(model_dir), tokenizer, "cpu")
    stream = Batches(tokenizer, FinetuneConfig(seqlen=24, batch_size=2, steps=1)).stream(index=True)
    batch = stream.batch(0)
    batch["labels"][0, :9] = -100  # a prompt, as a task's batch has
    batch[StepStream.INDEX] = torch.arange(2)
    cache = tmp_path / "cache.safetensors"
    build_teacher_cache(cache, teacher, stream, 24, 7, 1.5, {"teacher": "x"}, progress=False)
    for answers in (teacher, TeacherCache(cache, stream, {"teacher": "x"})):
        trainer = DistillTrainer(model=student, args=training_arguments(tmp_path / "t", steps=1, lr=1e-3, batch_size=2),
                                 teacher=answers, kd_weight=kd_weight, temperature=1.5)
        whole = trainer.whole_loss(student, batch)[0]
        whole_grads = torch.autograd.grad(whole, params)
        for chunk in (5, 64):
            ours = chunked_kd_loss(student, batch, chunk, answers, kd_weight, 1.5)
            torch.testing.assert_close(ours, whole)
            for g, want in zip(torch.autograd.grad(ours, params), whole_grads):
                torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["lrc", "full"])
@pytest.mark.parametrize("cached", [False, True], ids=["in-the-loop", "cached"])
def test_memory_savers_distil_the_same_steps(compressed_dir, model_dir, tmp_path, monkeypatch, mode, cached):
    import welore.distill

    chunked, calls = welore.distill.chunked_kd_loss, []
    monkeypatch.setattr(welore.distill, "chunked_kd_loss", lambda *a, **kw: (calls.append(a[2]), chunked(*a, **kw))[1])
    def chunked_for_the_saved_run_only(name):
        assert calls == [7] * (3 * 2 + 1) * (name == "saved")  # each micro-batch, and the first check

    base = dict(FAST, steps=3, grad_accum=2, mode=mode, teacher=str(model_dir), kd_weight=0.5, keep_best=False)
    if cached:
        base.update(teacher_cache=str(tmp_path / "cache.safetensors"), teacher_top_k=16)
    # atol: 1/300 of one step (lr 3e-3; Adam lifts float noise in a tiny gradient)
    savers_train_the_same_steps(compressed_dir, tmp_path, base, atol=1e-5, after_run=chunked_for_the_saved_run_only)


def test_teacher_cache_is_built_once_and_gives_the_in_process_loss(compressed_dir, model_dir, tmp_path, tokenizer):
    """With k = the whole vocabulary the cached loss is the in-process one (up to fp16 log-probs);
    a second run reuses the file without loading the teacher and trains identically."""
    cache = tmp_path / "teacher.safetensors"
    base = dict(teacher=str(model_dir), keep_best=False, **FAST)
    live = finetune(compressed_dir, tmp_path / "live", FinetuneConfig(**base), progress=False)
    cfg = FinetuneConfig(**base, teacher_cache=str(cache), teacher_top_k=len(tokenizer))
    first = finetune(compressed_dir, tmp_path / "a", cfg, progress=False)
    assert cache.is_file() and first.metrics["teacher_cache_build_s"] > 0
    for a, b in zip(live.log, first.log):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    again = finetune(compressed_dir, tmp_path / "b", cfg, progress=False)
    assert "teacher_cache_build_s" not in again.metrics and "teacher_memory_gib" not in again.metrics
    assert [r["loss"] for r in again.log] == [r["loss"] for r in first.log]
    shorter = finetune(compressed_dir, tmp_path / "c", FinetuneConfig(**{**base, "steps": 2}, teacher_cache=str(cache),
                                                                      teacher_top_k=len(tokenizer)), progress=False)
    assert [r["loss"] for r in shorter.log] == [r["loss"] for r in first.log[:2]]  # a prefix of the batches


def test_teacher_cache_file_is_plain_safetensors_written_and_read_a_batch_at_a_time(model_dir, tokenizer, tmp_path):
    """Batches of varying width (a task): each row holds the teacher's top k where the batch has tokens
    and the fills beyond; the file is an ordinary safetensors file; rows come back in any order."""
    teacher = Teacher(str(model_dir), tokenizer, "cpu")
    stream = Batches(tokenizer, FinetuneConfig(data="coinflip", steps=3, batch_size=2, seqlen=512)).stream(index=True)
    path, k, T = tmp_path / "cache.safetensors", 5, 2.0
    build_teacher_cache(path, teacher, stream, 512, k, T, {"teacher": "x"}, progress=False)
    whole = load_file(str(path))  # the library reads what was written at computed offsets
    assert whole["top_ids"].shape == (6, 511, k) and whole["top_logp"].dtype == torch.float16
    cache = TeacherCache(path, stream, {"teacher": "x"})
    widths = set()
    for t in range(stream.micro_steps):
        batch, rows = stream.batch(t), torch.arange(2 * t, 2 * t + 2)
        width = batch["input_ids"].shape[1]
        widths.add(width)
        logp, ids = F.log_softmax(teacher.logits(batch)[:, :-1] / T, -1).topk(k, -1)
        got_ids, got_logp = cache.rows(rows, width, "cpu")
        assert torch.equal(got_ids, ids.int()) and torch.allclose(got_logp.float(), logp, atol=2e-2)
        assert (whole["input_ids"][rows, width:] == -1).all() and whole["top_logp"][rows, width - 1:].isinf().all()
    assert len(widths) > 1
    mixed = cache.rows(torch.tensor([5, 0, 3]), 20, "cpu")
    assert all(torch.equal(m, w[[5, 0, 3], :19]) for m, w in zip(mixed, (whole["top_ids"], whole["top_logp"])))


def test_teacher_cache_built_in_chunks_holds_the_same_answers(model_dir, tokenizer, tmp_path):
    # --loss-chunk builds the cache from the teacher's head a chunk of positions at a time
    teacher = Teacher(str(model_dir), tokenizer, "cpu")
    stream = Batches(tokenizer, FinetuneConfig(data="coinflip", steps=2, batch_size=2, seqlen=512)).stream(index=True)
    files = {}
    for chunk in (0, 37):
        files[chunk] = tmp_path / f"cache{chunk}.safetensors"
        build_teacher_cache(files[chunk], teacher, stream, 512, 6, 2.0, {"teacher": "x"}, progress=False, chunk=chunk)
    whole, chunked = load_file(str(files[0])), load_file(str(files[37]))
    assert torch.equal(whole["input_ids"], chunked["input_ids"])
    torch.testing.assert_close(chunked["top_logp"], whole["top_logp"], rtol=1e-3, atol=1e-3)
    # the same tokens, but where two are tied to rounding (the order of a tie may differ)
    assert (whole["top_ids"] == chunked["top_ids"]).float().mean() > 0.99
    with pytest.raises(WeloreError, match="exceeds its vocabulary"):
        build_teacher_cache(tmp_path / "big.safetensors", teacher, stream, 512, len(tokenizer) + 1, 2.0, {}, progress=False,
                            chunk=37)
    assert not (tmp_path / "big.safetensors").exists()


def test_teacher_cache_refuses_other_runs(compressed_dir, model_dir, tmp_path, tokenizer):
    cache = tmp_path / "teacher.safetensors"
    base = dict(teacher=str(model_dir), teacher_cache=str(cache), teacher_top_k=8, **FAST)
    finetune(compressed_dir, tmp_path / "built", FinetuneConfig(**base), progress=False)
    other_teacher = tmp_path / "other-teacher"
    make_tiny("llama", seed=1).save_pretrained(other_teacher)
    tokenizer.save_pretrained(other_teacher)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    cases = [({"seed": 1}, "other batches"), ({"seqlen": 32}, "other batches"), ({"batch_size": 1}, "other batches"),
             ({"data": "coinflip"}, "other batches"), ({"steps": 8}, "holds 8 sequences"),
             ({"kd_temperature": 1.0}, "temperature"), ({"teacher_top_k": 4}, "top_k"),
             ({"teacher": str(other_teacher)}, "another teacher"), ({"teacher": str(tmp_path / "none")}, "no such teacher"),
             ({"teacher_cache": str(truncated)}, "cannot read"), ({"teacher_cache": str(foreign)}, "not a welore")]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(WeloreError, match=msg):
            finetune(compressed_dir, tmp_path / f"out{i}", FinetuneConfig(**{**base, **kw}), progress=False)
    with pytest.raises(WeloreError, match="needs --teacher"):
        FinetuneConfig(teacher_cache=str(cache))
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
