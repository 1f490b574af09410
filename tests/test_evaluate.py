import math

import pytest
import torch
from conftest import VOCAB

from welore import WeloreError, perplexity
from welore.data import encode_corpus


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
