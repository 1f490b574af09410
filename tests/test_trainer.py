import torch
from torch.utils.data import DataLoader

from welore.finetune_config import FinetuneConfig
from welore.trainer import Batches, StepStream


def test_step_stream_serves_each_micro_batch_row_by_row_and_draws_it_once():
    calls = []

    def batch(t):
        calls.append(t)
        return {"input_ids": torch.arange(3).view(3, 1) + 10 * t}

    stream = StepStream(batch, micro_steps=4, rows=3)
    assert len(stream) == 12
    rows = [int(stream[k]["input_ids"]) for k in range(len(stream))]
    assert rows == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]
    assert calls == [0, 1, 2, 3]


def test_per_process_slices_make_up_the_global_batch(tokenizer):
    """What two data-parallel processes read (accelerate hands process r every other batch of the
    in-order loader) is, row for row, the global batch one process reads."""
    cfg = FinetuneConfig(seqlen=32, batch_size=1, steps=3, grad_accum=2)
    stream = Batches(tokenizer, cfg, rows=2).stream()
    single = list(DataLoader(stream, batch_size=2))  # one process, batch 2
    halves = list(DataLoader(stream, batch_size=1))  # batches 0, 2, 4.. to rank 0; 1, 3, 5.. to rank 1
    assert len(single) == cfg.steps * cfg.grad_accum
    for t, b in enumerate(single):
        glued = torch.cat([halves[2 * t]["input_ids"], halves[2 * t + 1]["input_ids"]])
        assert torch.equal(b["input_ids"], glued)


def test_batches_are_a_function_of_seed_step_and_micro_step(tokenizer):
    a = Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2))
    b = Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2))
    assert torch.equal(a.get(3, 1)["input_ids"], b.get(3, 1)["input_ids"])
    assert not torch.equal(a.get(3, 1)["input_ids"], a.get(3, 0)["input_ids"])
    other = Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2, seed=1))
    assert not torch.equal(a.get(3, 1)["input_ids"], other.get(3, 1)["input_ids"])


def test_passes_count_how_often_the_draws_cover_the_training_text(tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("The meeting moved to room five, then back to room two. " * 40)
    cfg = FinetuneConfig(data=str(text), seqlen=32, batch_size=2, steps=30, grad_accum=2, eval_tokens=64)
    b = Batches(tokenizer, cfg)
    assert b.size == b.windows.shape[0] > 0
    assert b.passes() == 30 * 2 * 2 / b.size  # steps x micro-batches x rows, over the windows
    assert Batches(tokenizer, FinetuneConfig(seqlen=32, batch_size=2, steps=3)).passes() < 0.01  # C4 train


def test_the_chunked_loss_is_the_models_own_in_every_architecture(tiny):
    # the body's output through the head, chunk by chunk, is the loss (and the gradient) transformers
    # computes from the whole logits; masked positions (-100) are left out as it leaves them out
    from welore.losses import chunked_lm_loss

    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt, as a task's batch has
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = [p for p in tiny.parameters() if p.requires_grad]
    own = tiny(**batch).loss
    own_grads = torch.autograd.grad(own, params)
    for chunk in (5, 64):
        ours = chunked_lm_loss(tiny, batch, chunk)
        torch.testing.assert_close(ours, own)
        for g, want in zip(torch.autograd.grad(ours, params), own_grads):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    summed = chunked_lm_loss(tiny, batch, 5, num_items=10)  # transformers' accumulated form: sum / items
    torch.testing.assert_close(summed, own * (labels[:, 1:] != -100).sum() / 10)


def test_parameters_marked_with_an_lr_scale_train_at_that_fraction_of_the_lr(tmp_path):
    from welore.qtrain import LR_SCALE
    from welore.trainer import WeloreTrainer, training_arguments

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    setattr(model[1].weight, LR_SCALE, 0.1)
    args = training_arguments(tmp_path, steps=10, lr=1e-3, batch_size=1, warmup=0, schedule="constant")
    opt = WeloreTrainer(model=model, args=args).create_optimizer()
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lrs) == 4 and lrs[id(model[1].weight)] == 1e-4
    assert all(lrs[id(p)] == 1e-3 for p in (model[0].weight, model[0].bias, model[1].bias))
