import math

import pytest
import torch

from welore import WeloreError
from welore.evaluate import encode_example, option_scores, task_accuracy
from welore.tasks import TASKS, Example, first_number, load_examples, split_validation, task_splits

SIZES = {"boolq": 3270, "csqa": 9741, "strategyqa": 2290, "svamp": 1000, "coinflip": 500, "date": 369,
         "tracking": 750}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_loads_with_valid_answers(task):
    examples, given_eval = load_examples(task)
    assert len(examples) == SIZES[task]
    for ex in examples[:50]:
        assert ex.prompt and not ex.prompt.endswith(" ")  # options carry their own leading space
        if ex.options:
            assert 0 <= ex.answer < len(ex.options) and all(o.startswith(" ") for o in ex.options)
        else:
            assert first_number(ex.answer) == ex.answer
    if task == "csqa":
        assert len(given_eval) == 1221


def test_known_examples_are_formatted_right():
    boolq = load_examples("boolq")[0][0]
    assert boolq.prompt.endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.target == " no"  # answer: false
    csqa = load_examples("csqa")[1][0]
    assert csqa.prompt.startswith("Question: A revolving door is convenient") and csqa.target == " bank"
    svamp = load_examples("svamp")[0][0]
    assert svamp.answer == "51" and svamp.target == " 51"
    tracking = load_examples("tracking")[0][0]
    assert tracking.prompt.endswith("Alice has the") and tracking.target == " blue ball."
    date = load_examples("date")[0][0]
    assert date.target == " 05/01/2021" and len(date.options) == 6


def test_small_tasks_can_hold_out_300_examples_and_keep_some_to_train_on():
    for task, n in [("coinflip", 500), ("date", 369)]:
        train, ev = task_splits(task, n_eval=300)
        assert len(ev) == 300 and len(train) == n - 300 and not set(ev) & set(train)
    train, ev = task_splits("date", n_eval=1000)
    assert len(train) == 369 // 10 and len(ev) == 369 - 369 // 10


def test_validation_is_set_aside_from_train_and_at_most_a_fifth_of_it():
    train, _ = task_splits("coinflip", n_eval=300)
    rest, val = split_validation(train, 50)
    assert len(val) == 40 and rest + val == train  # 200 train examples: a fifth
    assert split_validation(train, 10) == (train[:-10], train[-10:])
    assert split_validation(train, 0) == (train, [])
    assert split_validation(train[:4], 3) == (train[:4], [])  # too few to spare one


@pytest.mark.parametrize("task", ["boolq", "csqa", "svamp"])
def test_splits_are_disjoint_and_reproducible(task):
    train, ev = task_splits(task, seed=3, n_eval=50)
    assert len(ev) == 50 and not set(ev) & set(train)
    assert task_splits(task, seed=3, n_eval=50)[1] == ev
    assert task_splits(task, seed=4, n_eval=50)[1] != ev


def test_first_number():
    assert first_number(" 51 dollars") == "51"
    assert first_number("It is 2.50.") == "2.5" and first_number("1,200 apples") == "1200"
    assert first_number("no idea") is None


def test_loss_target_boundary(tokenizer):
    ids, n_prompt = encode_example(tokenizer, "Question: is it?\nAnswer:", " yes", max_len=512)
    assert tokenizer.decode(ids[n_prompt:]) == " yes"
    ids, n_prompt = encode_example(tokenizer, "x " * 400 + "end", " yes", max_len=32)
    assert len(ids) == 32 and tokenizer.decode(ids[:n_prompt]).endswith("end")  # cut from the left


class PrefersToken(torch.nn.Module):
    """A fake LM that always puts its mass on one token: scoring must pick the option made of it."""

    def __init__(self, token: int, vocab: int = 256):
        super().__init__()
        self.token, self.vocab, self.p = token, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, cache=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return type("Out", (), {"logits": logits, "cache": None})()

    def generate(self, x, max_new_tokens, **kw):
        return torch.cat([x, torch.full((1, 3), self.token)], 1)


def test_option_scoring_picks_the_most_likely_option(tokenizer):
    # two options of one token each, and different ones (" the" and " of" both begin with the same " ")
    options = ("x", "q")
    (a,), (b,) = (tokenizer.encode(o) for o in options)
    examples = [Example("Some prompt\nAnswer:", options, 1), Example("Other\nAnswer:", options, 0)]
    assert a != b and all(encode_example(tokenizer, ex.prompt, o, 64)[0][-1] == t
                          for ex in examples for o, t in zip(options, (a, b)))
    acc = task_accuracy(PrefersToken(b), tokenizer, examples, "t", progress=False)
    assert (acc.correct, acc.total) == (1, 2)
    # the choice loss: -log of the answer's share of the options' probabilities, averaged
    p = [torch.tensor(option_scores(PrefersToken(b), [encode_example(tokenizer, ex.prompt, o, 64) for o in options]))
         .softmax(0)[ex.answer] for ex in examples]
    assert acc.choice_nll == pytest.approx(-sum(x.log().item() for x in p) / 2)
    assert p[0] > 0.9 > 0.1 > p[1]  # the model's preference is sharp both ways
    assert task_accuracy(PrefersToken(a), tokenizer, examples[1:], "t", progress=False).accuracy == 1.0


def test_a_diverged_model_gets_nothing_right(tokenizer):
    """NaN scores pick nothing; argmax over NaNs would pick the first option, right half the time."""
    class Diverged(PrefersToken):
        def forward(self, input_ids, use_cache=False, cache=None):
            out = super().forward(input_ids)
            out.logits.fill_(float("nan"))
            return out

    examples = [Example("A\nAnswer:", (" no", " yes"), i % 2) for i in range(4)]
    acc = task_accuracy(Diverged(0), tokenizer, examples, "t", progress=False)
    assert acc.correct == 0 and math.isnan(acc.choice_nll)


def test_shared_prompt_scores_equal_one_forward_per_option(tiny, tokenizer):
    """The KV-cache path (prompt once, each option continued from it) gives the per-option forwards'
    scores, on every architecture (their caches differ: sliding windows, absolute positions...)."""
    for ex in task_splits("date", n_eval=4)[1] + task_splits("coinflip", n_eval=2)[1]:
        encoded = [encode_example(tokenizer, ex.prompt, o, 256) for o in ex.options]
        shared, full = option_scores(tiny, encoded), option_scores(tiny, encoded, shared=False)
        assert shared == pytest.approx(full, abs=1e-4)
    long = [encode_example(tokenizer, "x " * 400, o, 32) for o in (" a", " a b c d")]  # cut differently
    assert option_scores(tiny, long) == option_scores(tiny, long, shared=False)


def test_generative_scoring_uses_the_first_number(tokenizer):
    seven = tokenizer.encode("7")[0]
    ex = [Example("How many?\nAnswer:", (), "777"), Example("How many?\nAnswer:", (), "7")]
    acc = task_accuracy(PrefersToken(seven), tokenizer, ex, "svamp", progress=False)
    assert (acc.correct, acc.total) == (1, 2)  # generates "777"


def test_real_examples_score_on_a_tiny_model(llama, tokenizer):
    for task in ("boolq", "coinflip", "date", "tracking"):
        _, ev = task_splits(task, n_eval=3)
        acc = task_accuracy(llama, tokenizer, ev, task, max_len=256, progress=False)
        assert acc.total == 3 and 0 <= acc.accuracy <= 1


def test_bad_task():
    with pytest.raises(WeloreError, match="unknown task"):
        load_examples("mmlu")
    with pytest.raises(WeloreError, match="no evaluation examples"):
        task_accuracy(None, object(), [], "x")
