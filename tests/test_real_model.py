"""The embedded default (SmolLM2-135M-Instruct, GGUF) end to end: analyze, compress, evaluate, reload.
Marked slow (about a minute on 2 CPU cores); CI runs it."""

import json

import pytest
import torch

from welore import (
    CompressConfig,
    CompressJob,
    find_targets,
    load_compressed,
    load_model,
    perplexity,
    run_compress,
)
from welore.models import default_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "smollm2-welore"
    return run_compress(None, CompressConfig(ratio=0.5), CompressJob(output=str(out), eval_tokens=1024, recipe=False, quiet=True))


def test_default_model_is_found_and_loads(capfd):
    """The first load converts the GGUF file and caches the result (conftest points the cache at a
    fresh directory), with every bar hidden by the one switch (-q), transformers' de-quantizing bar
    included; the second reads the cache: the same tensors, tokenizer and chat template."""
    import shutil

    from welore.models import _gguf_cache_entry
    from welore.progress import shown

    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    entry = _gguf_cache_entry(path)
    shutil.rmtree(entry, ignore_errors=True)
    capfd.readouterr()
    with shown(False):
        converted = load_model(None, device="cpu")
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "%|" not in err  # no bar of any library
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    loaded = load_model(None, device="cpu")
    assert loaded.source == converted.source == str(path) and loaded.name == converted.name
    want, got = converted.model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    text = "WeLore: low-rank weights, from GaLore's low-rank gradients. 123 éà"
    assert loaded.tokenizer(text).input_ids == converted.tokenizer(text).input_ids
    assert loaded.tokenizer.chat_template == converted.tokenizer.chat_template is not None
    assert loaded.model.config.model_type == "llama" and loaded.tokenizer is not None
    targets = find_targets(loaded.model)
    assert len(targets) == 30 * 7  # 30 blocks x (q, k, v, o, gate, up, down)
    assert "lm_head" not in {t.name for t in targets}


def test_main_job_compares_dense_uniform_welore(compressed):
    rows = {r["model"]: r for r in compressed.rows}
    assert set(rows) == {"dense", "uniform", "WeLore"}
    assert 10 < rows["dense"]["wikitext2 ppl"] < 60  # SmolLM2-135M on WikiText-2 is about 30
    assert rows["WeLore"]["params"] < rows["dense"]["params"]
    assert abs(compressed.plan.effective_rank_reduction - 0.5) < 0.01
    # the point of WeLore's non-uniform allocation: better than uniform at the same rank reduction
    assert rows["WeLore"]["wikitext2 ppl"] < rows["uniform"]["wikitext2 ppl"]
    # ranks really are non-uniform across matrices
    assert len({m.reduction for m in compressed.plan.lrcs}) > 20


def test_saved_model_reloads_with_the_same_perplexity(compressed):
    out = compressed.output
    meta = json.loads((out / "welore.json").read_text())
    assert meta["plan"]["totals"]["lrc_count"] == len(compressed.plan.lrcs)
    assert {"report.md", "spectra.png", "reduction.png", "spectra.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = load_compressed(out)
    r = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=512, max_tokens=1024, progress=False)
    reported = next(row for row in compressed.rows if row["model"] == "WeLore")["wikitext2 ppl"]
    assert r.ppl == pytest.approx(reported, rel=1e-4)
    assert torch.isfinite(torch.tensor(r.nll))


def test_recovery_recipe_improves_the_real_model(compressed):
    """welore.recover on the real default: 10 steps of the recipe already cut held-out C4 perplexity
    (measured 105,329 -> 1,576 after 100 steps in benchmarks/recovery.py)."""
    from welore import recover

    res = recover(compressed.output, steps=10, eval_every=10, eval_tokens=1024, progress=False)
    first, last = res.evals[0]["c4_ppl"], res.evals[-1]["c4_ppl"]
    assert res.metrics["returned_step"] == 10 and last < 0.5 * first


def test_loss_allocation_with_whiten_fisher_stays_usable(compressed):
    """Issue 4's recipe on the real model: 20% fewer target parameters, calibrated on C4 training text.
    Plain WeLore truncation at this budget is above 1e5 perplexity and uniform at 320
    (benchmarks/quality.py). The main job's weight spectra are reused (checked against the weights)."""
    from welore import Spectra
    from welore.compress import compress

    loaded = load_model(None, device="cpu")
    cfg = CompressConfig(ratio=0.2, target="params", allocation="loss", method="whiten-fisher", calib_samples=16,
                         calib_seqlen=256)
    done = compress(loaded.model, loaded.tokenizer, cfg, spectra=Spectra.load(compressed.output / "spectra.safetensors"),
                    progress=False)
    assert abs(done.plan.param_reduction - 0.2) < 0.01
    ppl = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=512, max_tokens=1024, progress=False).ppl
    dense = next(row for row in compressed.rows if row["model"] == "dense")["wikitext2 ppl"]
    # measured 46.7 vs dense 27.5 (1.70x) on these 1,024 tokens; 2.5x leaves room for BLAS noise
    assert ppl < 2.5 * dense


def test_quiet_hides_the_bars_and_generate_uses_the_chat_template(capfd):
    import subprocess
    import sys

    from welore.cli import main

    cmd = ["generate", "default", "What is the capital of France?", "--max-new-tokens", "8"]
    # from the session's converted cache (the conversion's own bar: test_default_model_is_found_and_loads);
    # quiet in a process of its own, where no earlier test has touched a library's bar settings
    quiet = subprocess.run([sys.executable, "-m", "welore", *cmd, "-q"], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "%|" not in quiet.stderr  # no bar of any library
    assert "Paris" in quiet.stdout  # the instruct model answers through its chat template
    capfd.readouterr()
    assert main(cmd) == 0  # the same, loud: from the cache, with its loading bar
    out, err = capfd.readouterr()
    assert "%|" in err, err  # the switch is what hides it
    assert "Paris" in out
