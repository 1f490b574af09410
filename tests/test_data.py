import pytest
import torch

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


def _write(tmp_path, name, content):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return str(p)


def test_local_files_of_every_format(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from welore.data import corpus_info

    docs = ["first document.", "second document, longer."]
    txt = _write(tmp_path, "a.txt", "line one\r\nline two\n")
    jsonl = _write(tmp_path, "a.jsonl", "\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    js = _write(tmp_path, "a.json", json.dumps([{"body": d} for d in docs]))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    assert load_corpus(txt) == "line one\nline two\n"
    for path in (jsonl, js, str(tmp_path / "a.parquet")):
        assert load_corpus(path, "body") == "\n\n".join(docs)
    info = corpus_info(jsonl, "body")
    import hashlib

    assert info["sha256"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert info["corpus"] == jsonl and info["text_field"] == "body"


def test_an_edited_file_is_read_again(tmp_path):
    import os

    p = _write(tmp_path, "e.txt", "old text")
    assert load_corpus(p) == "old text"
    (tmp_path / "e.txt").write_text("new text!")
    os.utime(p, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert load_corpus(p) == "new text!"


@pytest.mark.parametrize("name, content, field, needle", [
    ("missing.txt", None, "text", "no such corpus file"),
    ("empty.txt", "", "text", "is empty"),
    ("blank.txt", "  \n\n ", "text", "holds no text"),
    ("bin.txt", b"\x00\x01\x02binary", "text", "binary"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "text", "not UTF-8"),
    ("a.jsonl", '{"body": "x"}\n', "text", "has no field 'text'"),
    ("num.jsonl", '{"text": 3}\n', "text", "not text"),
    ("bad.jsonl", "{not json", "text", "cannot read"),
    ("a.csv", "x,y", "text", "unknown corpus"),
])
def test_bad_corpus_files(tmp_path, name, content, field, needle):
    path = str(tmp_path / name) if content is None else _write(tmp_path, name, content)
    with pytest.raises(WeloreError, match=needle):
        load_corpus(path, field)


def test_a_whole_corpus_is_tokenised_once_per_cache(tokenizer, tmp_path, monkeypatch):
    """Another process (here: the in-memory cache emptied) reads the ids back instead of tokenising
    again: the same ids; without a cache nothing is written."""
    import welore.data as data

    monkeypatch.setenv("WELORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_ENCODED", {})
    first = data.encode_corpus(tokenizer, "wikitext2")
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 1
    monkeypatch.setattr(data, "_ENCODED", {})
    monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("tokenised again"))
    assert torch.equal(data.encode_corpus(tokenizer, "wikitext2"), first) and first.dtype == torch.long
    monkeypatch.undo()  # _tokenize back; then without a cache
    monkeypatch.setenv("WELORE_CACHE", "off")
    monkeypatch.setattr(data, "_ENCODED", {})
    assert torch.equal(data.encode_corpus(tokenizer, "wikitext2"), first)
    assert len(list((tmp_path / "cache" / "tokens").glob("*"))) == 1
