"""Generation: greedy, deterministic, streamed, with one-line errors for bad prompts."""

import pytest

from welore import WeloreError
from welore.generate import continuation, generate


def test_greedy_generation_is_deterministic_and_bounded(llama, tokenizer):
    a = generate(llama, tokenizer, "The cat", max_new_tokens=8)
    assert a == generate(llama, tokenizer, "The cat", max_new_tokens=8)
    assert a and a.startswith(generate(llama, tokenizer, "The cat", max_new_tokens=4))  # greedy: a prefix
    assert "\n" not in continuation(llama, tokenizer, "The cat", max_new_tokens=8)


def test_streaming_prints_what_it_returns(llama, tokenizer, capsys):
    text = generate(llama, tokenizer, "The cat", max_new_tokens=6, stream=True)
    assert capsys.readouterr().out.strip() == text.strip()


def test_sampling_depends_on_seed(llama, tokenizer):
    texts = {generate(llama, tokenizer, "The", max_new_tokens=12, temperature=5.0, seed=s) for s in range(4)}
    assert len(texts) > 1


@pytest.mark.parametrize("kwargs, match", [({"prompt": "  "}, "empty"),
                                           ({"prompt": "x", "chat": True}, "chat template"),
                                           ({"prompt": "x", "temperature": -1.0}, "temperature")])
def test_bad_input(llama, tokenizer, kwargs, match):
    with pytest.raises(WeloreError, match=match):
        generate(llama, tokenizer, **kwargs)
