import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from welore import (
    WeloreError,
    apply_plan,
    load_compressed,
    merge_to_dense,
    plan_model,
    save_compressed,
    save_dense,
)
from welore.io import WEIGHTS


def _compressed(model, tmp_path, tokenizer=None):
    plan, spectra = plan_model(model, ratio=0.5, min_ratio=0.0, progress=False)
    apply_plan(model, plan, spectra, progress=False)
    out = save_compressed(model, tmp_path / "out", plan, tokenizer=tokenizer, base_model="tiny",
                          settings={"ratio": 0.5})
    return out, plan


def _logits(model):
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def test_save_load_gives_bit_identical_logits(arch, tiny, tmp_path):
    out, plan = _compressed(tiny, tmp_path)
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(_logits(loaded.model), _logits(tiny))
    assert loaded.plan.to_dict() == plan.to_dict()


def test_directory_describes_itself(llama, tmp_path, tokenizer):
    out, plan = _compressed(llama, tmp_path, tokenizer)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", WEIGHTS, "welore.json", "tokenizer.json"} <= files
    meta = json.loads((out / "welore.json").read_text())
    assert meta["format"] == "welore/1" and meta["base_model"] == "tiny"
    assert {"welore", "torch", "transformers"} <= set(meta["versions"])
    assert meta["plan"]["totals"]["lrc_count"] == len(plan.lrcs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_load_needs_no_svd_and_no_base_model(llama, tmp_path, monkeypatch):
    out, _ = _compressed(llama, tmp_path)
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD during load"))
    load_compressed(out)


def test_merge_round_trip_loads_with_stock_transformers(arch, tiny, tmp_path):
    out, _ = _compressed(tiny, tmp_path)
    compressed = load_compressed(out).model
    dense_dir = save_dense(merge_to_dense(load_compressed(out).model), tmp_path / "dense")
    stock = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert torch.allclose(_logits(stock), _logits(compressed), atol=1e-5)


def test_corrupt_weights_are_refused(llama, tmp_path):
    out, _ = _compressed(llama, tmp_path)
    (out / WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(WeloreError, match="corrupt"):
        load_compressed(out)


def test_weights_that_do_not_match_the_plan_are_refused(llama, tmp_path):
    out, plan = _compressed(llama, tmp_path)
    meta = json.loads((out / "welore.json").read_text())
    lrc = next(m for m in meta["plan"]["matrices"] if m["lrc"])
    lrc["alloc_rank"] -= 1
    (out / "welore.json").write_text(json.dumps(meta))
    with pytest.raises(WeloreError, match="does not match its rank plan"):
        load_compressed(out)


def test_nan_in_saved_weights_is_refused(llama, tmp_path):
    out, _ = _compressed(llama, tmp_path)
    state = load_file(str(out / WEIGHTS))
    key = next(k for k in state if k.endswith("up.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, str(out / WEIGHTS))
    with pytest.raises(WeloreError, match="NaN or Inf"):
        load_compressed(out)


def test_missing_or_corrupt_metadata(tmp_path, llama):
    with pytest.raises(WeloreError, match="not a welore model directory"):
        load_compressed(tmp_path)
    out, _ = _compressed(llama, tmp_path)
    (out / "welore.json").write_text("{")
    with pytest.raises(WeloreError, match="corrupt"):
        load_compressed(out)


def test_failed_write_leaves_nothing_behind(llama, tmp_path):
    plan, spectra = plan_model(llama, ratio=0.5, progress=False)

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_compressed(llama, tmp_path / "out", plan, extra=boom)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(llama, tmp_path):
    out, plan = _compressed(llama, tmp_path)
    with pytest.raises(WeloreError, match="already exists"):
        save_compressed(llama, out, plan)
    save_compressed(llama, out, plan, overwrite=True)
    assert (out / WEIGHTS).is_file() and len(list(tmp_path.iterdir())) == 1


BLOCK_WELORE = """
import sys
sys.modules["welore"] = None  # `import welore` raises: only transformers may load the directory
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__name__ == "WeloreForCausalLM", type(model)
ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_plain_transformers_loads_a_compressed_dir_without_welore(arch, tmp_path):
    import subprocess
    import sys

    from conftest import make_tiny

    model = make_tiny(arch)
    out, plan = _compressed(model, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_welore.WeloreForCausalLM"}
    assert set(config["welore_lrcs"]) == {m.name for m in plan.lrcs}
    assert "\nBASE_CLASS = None\n" not in (out / "modeling_welore.py").read_text()
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BLOCK_WELORE, str(out), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(load_compressed(out, device="cpu").model))


def test_disk_full_while_saving_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    from conftest import make_tiny
    from safetensors import SafetensorError

    import welore.io as io

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(WeloreError, match="cannot write .*No space left"):
        _compressed(make_tiny("llama"), tmp_path)
    assert list(tmp_path.iterdir()) == []
