import math

import pytest
import torch
from conftest import VOCAB

from welore import WeloreError, perplexity
from welore.data import encode_corpus
from welore.evaluate import Accuracy, wilson_interval


class UniformLM(torch.nn.Module):
    """Predicts every token with equal probability: perplexity must be exactly the vocabulary size."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, VOCAB)})()


def test_uniform_model_has_perplexity_equal_to_vocab(tokenizer):
    r = perplexity(UniformLM(), tokenizer, "wikitext2", seqlen=64, max_tokens=640, progress=False)
    assert math.isclose(r.ppl, VOCAB, rel_tol=1e-5)  # fp32 log-softmax
    assert r.tokens == 640 and r.seqlen == 64


def test_windows_are_non_overlapping_and_bounded(llama, tokenizer):
    r = perplexity(llama, tokenizer, "wikitext2", seqlen=100, max_tokens=1050, progress=False)
    assert r.tokens == 1000  # floor(1050 / 100) windows of 100
    assert 1 < r.ppl < 10 * VOCAB  # a random tiny model is near-uniform


def test_batching_does_not_change_the_result(llama, tokenizer):
    a = perplexity(llama, tokenizer, "c4", seqlen=64, max_tokens=512, progress=False)
    b = perplexity(llama, tokenizer, "c4", seqlen=64, max_tokens=512, batch_size=4, progress=False)
    assert math.isclose(a.nll, b.nll, rel_tol=1e-5)


def test_prefix_tokenization_matches_full(tokenizer):
    full = encode_corpus(tokenizer, "wikitext2")
    bounded = encode_corpus(tokenizer, "wikitext2", max_tokens=2000)
    assert torch.equal(bounded[:2000], full[:2000])


def test_bad_arguments(llama, tokenizer):
    with pytest.raises(WeloreError, match="at least seqlen"):
        perplexity(llama, tokenizer, seqlen=512, max_tokens=100)
    with pytest.raises(WeloreError, match="needs a tokenizer"):
        perplexity(llama, None)
    with pytest.raises(WeloreError, match="unknown corpus"):
        perplexity(llama, tokenizer, "imagenet", seqlen=16, max_tokens=32)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (163, 300), (1, 300)])
def test_wilson_interval_bounds_are_the_score_test_roots(k, n):
    """The Wilson bounds are the proportions p0 where the score statistic (p - p0)^2 n / (p0 (1 - p0))
    equals z^2 = 1.96^2: check that directly, and that the interval holds the observed proportion."""
    lo, hi = wilson_interval(k, n)
    p, z2 = k / n, 1.959964**2
    assert 0 <= lo <= p <= hi <= 1
    for b in (lo, hi):
        if 0 < b < 1:
            assert (p - b) ** 2 * n == pytest.approx(z2 * b * (1 - b), rel=1e-6)
    assert Accuracy("t", k / n, k, n, 0.0).to_dict()["ci95"] == [lo, hi]
    assert wilson_interval(150, 300)[1] - wilson_interval(150, 300)[0] == pytest.approx(0.112, abs=1e-3)
