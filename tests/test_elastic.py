"""welore.elastic: one directory for several budgets, each sliced at load bit for bit the model a
separate compression at that budget writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from test_io import _logits

from welore import CompressConfig, WeloreError, load_compressed
from welore.cli import main
from welore.jobs import CompressJob
from welore.pipeline import run_compress

BUDGETS = [0.2, 0.4, 0.6]


def _compress(model_dir, out, **cfg):
    return run_compress(str(model_dir), CompressConfig(**cfg), CompressJob(output=str(out), eval=False, quiet=True))


def _state(path, budget=None) -> dict:
    return load_compressed(path, device="cpu", budget=budget).model.state_dict()


@pytest.mark.parametrize("settings", [
    dict(),  # WeLore, data-free: plain SVD, min_ratio 0.5 (so matrices turn low-rank between budgets)
    dict(allocation="loss", method="whiten-fisher", calib_samples=4, calib_seqlen=32),  # the calibrated recipe
], ids=["welore-svd", "loss-whiten-fisher"])
def test_every_sliced_budget_is_bit_for_bit_its_separate_run(model_dir, tmp_path, settings):
    target = "params" if settings else "rank"
    _compress(model_dir, tmp_path / "elastic", budgets=BUDGETS, target=target, **settings)
    with safe_open(str(tmp_path / "elastic" / "model.safetensors"), "pt") as f:
        beside = [k for k in f.keys() if ".elastic." in k]
    meta = json.loads((tmp_path / "elastic" / "welore.json").read_text())
    assert list(meta["budgets"]["plans"]) == ["0.2", "0.4", "0.6"] and meta["budgets"]["default"] == "0.2"
    first_lrcs = {m["name"] for m in meta["plan"]["matrices"] if m["lrc"]}
    later_lrcs = {m["name"] for m in meta["budgets"]["plans"]["0.6"]["matrices"] if m["lrc"]}
    assert {k.split(".elastic.")[0] for k in beside} == later_lrcs - first_lrcs
    if not settings:
        assert beside  # the case that stores a matrix twice (dense, and factors for the later budgets) is tested
    for b in BUDGETS:
        separate = _compress(model_dir, tmp_path / f"separate-{b}", ratio=b, target=target, **settings)
        sliced = load_compressed(tmp_path / "elastic", device="cpu", budget=b)
        assert sliced.plan.to_dict()["matrices"] == separate.plan.to_dict()["matrices"]
        want = _state(tmp_path / f"separate-{b}")
        got = sliced.model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    # no budget: the first, as stored (what a loader that knows nothing of budgets gets too)
    assert all(torch.equal(v, _state(tmp_path / "separate-0.2")[k]) for k, v in _state(tmp_path / "elastic").items())


PLAIN_AT_BUDGETS = """
import sys
sys.modules["welore"] = None  # `import welore` raises: only transformers may load the directory
import torch
from transformers import AutoModelForCausalLM
ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
out = {}
for b in sys.argv[3].split(","):
    try:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, welore_budget=float(b)).eval()
    except ValueError as e:
        out[b] = str(e)
        continue
    with torch.no_grad():
        out[b] = model(ids).logits
torch.save(out, sys.argv[2])
"""


def test_plain_transformers_slices_a_budget_without_welore(model_dir, tmp_path):
    out = tmp_path / "elastic"
    _compress(model_dir, out, budgets=BUDGETS)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PLAIN_AT_BUDGETS, str(out), str(tmp_path / "logits.pt"), "0.2,0.6,0.3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    for b in (0.2, 0.6):  # the stored budget, and one sliced at load
        assert torch.equal(got[f"{b:g}"], _logits(load_compressed(out, device="cpu", budget=b).model))
    assert got["0.3"] == "budget 0.3 is not in this checkpoint; it has 0.2, 0.4, 0.6"


def test_budgets_from_the_command_line(model_dir, tmp_path, capsys):
    out = tmp_path / "elastic"
    assert main(["compress", str(model_dir), "--budgets", "0.2,0.4", "-o", str(out), "--eval-tokens", "128", "--seqlen", "64",
                 "--no-recipe", "-q"]) == 0
    table = capsys.readouterr().out  # the main job's rows: dense, uniform, each budget as it loads
    assert "WeLore @ 0.2" in table and "WeLore @ 0.4" in table and "uniform" in table
    assert main(["merge", str(out), str(tmp_path / "merged"), "--budget", "0.4", "-q"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), _logits(load_compressed(out, budget=0.4).model), atol=1e-5, rtol=1e-4)
    # a budget not in the directory, budgets not increasing, a budget of a directory that has one: exit 2, one line
    capsys.readouterr()
    assert main(["evaluate", str(out), "--budget", "0.3", "--max-tokens", "64", "-q"]) == 2
    assert capsys.readouterr().err.strip().endswith("has no budget 0.3: it has 0.2, 0.4")
    assert main(["compress", str(model_dir), "--budgets", "0.4,0.2", "-o", str(tmp_path / "bad"), "--no-eval"]) == 2
    assert "--budgets must increase, got 0.4, 0.2" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["compress", str(model_dir), "--budgets", "0.2,0.4", "--ratio", "0.3", "-o", str(tmp_path / "bad")]) == 2
    assert "drop --ratio" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "hi", "--budget", "0.2"]) == 2
    assert "is not one" in capsys.readouterr().err


@pytest.mark.parametrize("settings, flag", [(dict(refit=True), "--refit"), (dict(bits=4), "--bits"),
                                            (dict(threshold=0.5), "--threshold"),
                                            (dict(calib_passes=2, method="whiten"), "--calib-passes")])
def test_settings_that_do_not_nest_are_refused(settings, flag):
    with pytest.raises(WeloreError, match=f"which {flag} does not allow"):
        CompressConfig(budgets=BUDGETS, **settings)


def test_a_budget_fine_tunes_as_its_own_model(model_dir, tmp_path):
    from welore import FinetuneConfig
    from welore.train import finetune

    _compress(model_dir, tmp_path / "elastic", budgets=BUDGETS)
    cfg = FinetuneConfig(steps=2, batch_size=2, seqlen=32, eval_tokens=128, save_every=0)
    finetune(tmp_path / "elastic", tmp_path / "tuned", cfg, budget=0.6, progress=False)
    tuned = load_compressed(tmp_path / "tuned")
    assert tuned.plan.to_dict()["matrices"] == load_compressed(tmp_path / "elastic", budget=0.6).plan.to_dict()["matrices"]
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert "welore_budgets" not in config and "budgets" not in tuned.meta  # one model, no longer elastic


def test_an_elastic_directory_recovers_every_budget_at_once(model_dir, tmp_path):
    from welore import FinetuneConfig
    from welore.elastic import budget_of_step
    from welore.train import finetune

    _compress(model_dir, tmp_path / "elastic", budgets=BUDGETS)
    cfg = FinetuneConfig(steps=8, lr=3e-3, batch_size=2, seqlen=64, eval_tokens=256, save_every=0, keep_best=False)
    res = finetune(tmp_path / "elastic", tmp_path / "tuned", cfg, progress=False)
    trained = {budget_of_step(["0.2", "0.4", "0.6"], cfg.seed, s) for s in range(cfg.steps)}
    assert len(trained) > 1  # the steps sample the budgets
    meta = json.loads((tmp_path / "tuned" / "welore.json").read_text())
    assert meta["budgets"] == json.loads((tmp_path / "elastic" / "welore.json").read_text())["budgets"]
    first, last = res.evals[0], res.evals[-1]
    assert set(last["budgets"]) == {"0.2", "0.4", "0.6"}
    for b in BUDGETS:  # every budget loads from the one recovered directory, and every one has learnt
        k = f"{b:g}"
        assert last["budgets"][k]["c4_ppl"] < first["budgets"][k]["c4_ppl"], (k, first, last)
        before, after = _state(tmp_path / "elastic", b), _state(tmp_path / "tuned", b)
        assert before.keys() == after.keys() and any(not torch.equal(before[n], after[n]) for n in before)
        tuned = load_compressed(tmp_path / "tuned", budget=b)
        assert tuned.plan.to_dict()["matrices"] == load_compressed(tmp_path / "elastic", budget=b).plan.to_dict()["matrices"]
    with pytest.raises(WeloreError, match="pick it with --budget"):
        finetune(tmp_path / "elastic", tmp_path / "lora", FinetuneConfig(mode="lora", steps=1), progress=False)
