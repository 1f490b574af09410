import os
import time

import pytest
import torch

from welore import WeloreError, load_model, pick_device
from welore.models import parse_dtype


def test_load_hf_directory(model_dir):
    loaded = load_model(model_dir, device="cpu")
    assert loaded.tokenizer is not None and loaded.name == "tiny-llama"
    assert not loaded.model.training and loaded.meta is None


def test_load_safetensors_checkpoint_file(model_dir, tmp_path):
    loaded = load_model(model_dir / "model.safetensors", device="cpu")
    assert loaded.model.config.model_type == "llama"
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeloreError, match="needs a config.json"):
        load_model(lone)


def test_dtype_override(model_dir):
    loaded = load_model(model_dir, device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_bad_sources(tmp_path):
    with pytest.raises(WeloreError, match="no such file or directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeloreError, match="no config.json"):
        load_model(tmp_path / "empty")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(WeloreError, match="is not a model"):
        load_model(junk)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not really")
    with pytest.raises(WeloreError, match="cannot load GGUF"):
        load_model(fake)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(WeloreError, match="cannot load model directory"):
        load_model(broken)


def test_device_and_dtype_parsing():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(WeloreError, match="CUDA is not available"):
            pick_device("cuda")
    assert parse_dtype("auto") is None and parse_dtype("bf16") == torch.bfloat16
    with pytest.raises(WeloreError, match="unknown dtype"):
        parse_dtype("float8")


def test_gguf_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from welore.models import gguf_cache_dir

    monkeypatch.setenv("WELORE_CACHE", str(tmp_path / "c"))
    assert gguf_cache_dir() == tmp_path / "c"
    for off in ("off", "0", ""):
        monkeypatch.setenv("WELORE_CACHE", off)
        assert gguf_cache_dir() is None
    monkeypatch.delenv("WELORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_dir() == tmp_path / "xdg" / "welore"


def test_gguf_cache_entries_are_keyed_by_content(monkeypatch, tmp_path):
    """Two installs of the same file (two virtual environments) share one ~540 MB entry; any other
    bytes get their own."""
    from welore.models import _gguf_cache_entry

    monkeypatch.setenv("WELORE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    assert _gguf_cache_entry(a) == _gguf_cache_entry(b) and _gguf_cache_entry(a).parent == tmp_path / "cache"
    b.write_bytes(b"GGUF" + bytes(range(256)) * 63 + bytes(255) + b"x")
    assert _gguf_cache_entry(a) != _gguf_cache_entry(b)
    monkeypatch.setenv("WELORE_CACHE", "off")
    assert _gguf_cache_entry(a) is None


def test_writing_the_cache_prunes_day_old_partial_entries(llama, tokenizer, tmp_path):
    """What a writer killed mid-write left goes at the next write, once a day old; a fresh one (a
    writer still at work) stays."""
    from welore.models import _write_cache

    old, fresh = tmp_path / "m-1.partial-111", tmp_path / "m-2.partial-222"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    day_ago = time.time() - 86400 - 60
    os.utime(old, (day_ago, day_ago))
    _write_cache(tmp_path / "m-3", llama, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-2.partial-222", "m-3"]


def test_a_cache_that_cannot_be_written_only_warns(llama, tokenizer, tmp_path, caplog):
    """A read-only or full cache costs time, never the load; and no partial entry is left behind."""
    from welore.models import _write_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING"):
        _write_cache(blocker / "entry", llama, tokenizer)
    assert "could not cache" in caplog.text and blocker.read_text() == "not a directory"
    # a second process that converted at the same time finds the first one's entry: quietly kept
    entry = tmp_path / "entry"
    _write_cache(entry, llama, tokenizer)
    before = (entry / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("WARNING"):
        _write_cache(entry, llama, tokenizer)
    assert caplog.text == "" and (entry / "model.safetensors").stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "file"]
    assert load_model(entry, device="cpu").model.config.model_type == "llama"


def test_a_damaged_cache_entry_is_converted_again(llama, tokenizer, tmp_path, monkeypatch, caplog):
    """The GGUF conversion itself is transformers' (the real file: tests/test_real_model.py); here a
    stand-in returns a tiny model, to check what happens around it when the entry is damaged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import welore.models as wm

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"stand-in")
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    conversions = []

    def model_from(src, *args, **kw):
        if "gguf_file" in kw:
            conversions.append(kw["gguf_file"])
            llama.hf_quantizer = None  # what from_pretrained sets on a model it loads
            return llama
        return real_model(src, *args, **kw)

    monkeypatch.setattr(wm.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(wm.AutoTokenizer, "from_pretrained",
                        lambda src, *a, **kw: tokenizer if "gguf_file" in kw else real_tok(src, *a, **kw))
    monkeypatch.setenv("WELORE_CACHE", str(tmp_path / "cache"))
    entry = wm._gguf_cache_entry(gguf)
    first = load_model(gguf, device="cpu")
    assert conversions == ["tiny.gguf"] and (entry / "model.safetensors").is_file()
    assert first.source == str(gguf) and first.name == "tiny"
    load_model(gguf, device="cpu")
    assert len(conversions) == 1  # read from the cache
    (entry / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level("WARNING"):
        again = load_model(gguf, device="cpu")
    assert "ignoring the cached conversion" in caplog.text and len(conversions) == 2
    want = llama.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.model.state_dict().items())
    assert load_model(gguf, device="cpu").model is not llama and len(conversions) == 2  # rebuilt, read again
