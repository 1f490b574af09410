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


def test_compiled_decoding_writes_what_eager_writes(compressed_dir):
    """torch.compile'd decoding (static cache, inductor) through welore's LowRankLinear: the same
    greedy text, and the speed measurement runs compiled."""
    from welore import load_compressed
    from welore.generate import generation_speed

    loaded = load_compressed(compressed_dir)
    model, tok = loaded.model, loaded.tokenizer
    eager = generate(model, tok, "The cat", max_new_tokens=8)
    assert not hasattr(model, "_compiled_call")
    assert generate(model, tok, "The cat", max_new_tokens=8, compile=True) == eager
    assert hasattr(model, "_compiled_call")  # transformers' handle on the compiled step: it did compile
    speed = generation_speed({"m": model}, tok, new_tokens=8, prefill_tokens=16, runs=1, compile=True)
    assert speed["m"]["decode"] > 0 and speed["m"]["prefill"] > 0


def test_compiled_speed_compiles_every_model(compressed_dir, llama, monkeypatch):
    """Models of one class share a compiled frame, each one a recompile: past dynamo's limit the
    rest would be timed eager while reported compiled. generation_speed compiles each model from a
    fresh dynamo cache."""
    import torch
    from torch._dynamo.utils import counters

    from welore import load_compressed
    from welore.generate import generation_speed

    loaded = load_compressed(compressed_dir)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    counters.clear()
    generation_speed({"dense": llama, "compressed": loaded.model}, loaded.tokenizer, new_tokens=4,
                     prefill_tokens=8, runs=1, compile=True)
    assert counters["stats"]["unique_graphs"] >= 2
