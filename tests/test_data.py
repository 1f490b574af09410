import pytest

from welore import WeloreError
from welore.data import load_corpus


def test_wikitext2_test_split():
    text = load_corpus("wikitext2")
    assert "\r" not in text and len(text) > 1_000_000
    assert text.lstrip().startswith("= Robert Boulter =")


def test_c4_train_and_eval_are_disjoint():
    train, held = load_corpus("c4-train"), load_corpus("c4")
    assert len(train) > 5 * len(held) > 0
    held_docs = held.split("\n\n")[:20]
    assert not any(d and d in train for d in held_docs)


def test_unknown_corpus_and_missing_folder(monkeypatch, tmp_path):
    with pytest.raises(WeloreError, match="unknown corpus"):
        load_corpus("nope")
    monkeypatch.setenv("WELORE_DATA", str(tmp_path / "missing"))
    from welore.data import data_dir

    with pytest.raises(WeloreError, match="not a directory"):
        data_dir()
