"""Quantised storage (welore.quantize, layers.QuantLinear): the values, the bits counted, the
directories (welore and plain transformers), merge, and bad settings."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny
from test_cli import run
from test_io import BLOCK_WELORE, _logits

from welore import CompressConfig, WeloreError, load_compressed, merge_to_dense, save_compressed, save_dense
from welore.compress import compress
from welore.io import unique_state_dict
from welore.layers import QuantLinear
from welore.modes import set_trainable
from welore.quantize import attach_choices, quantize_model
from welore.quantizers import BITS, group_for, quantize_weight
from welore.targets import count_parameters, find_targets, layer_of, weight_matrix


def test_bits_counted_are_the_bytes_stored_over_the_dense_weights():
    model = make_tiny("llama")
    dense_block_weights = sum(p.numel() for n, p in model.named_parameters() if layer_of(n) is not None)
    done = compress(model, None, CompressConfig(ratio=0.3, min_ratio=0.0, bits=4, group_size=32), progress=False)
    state = unique_state_dict(model)
    stored = sum(t.numel() * t.element_size() for n, t in state.items() if layer_of(n) is not None)
    assert done.quant["block_weights"] == dense_block_weights
    assert done.quant["block_bytes"] == stored
    assert done.quant["bits_per_weight"] == pytest.approx(8 * stored / dense_block_weights, abs=1e-4)
    assert done.quant["outside_blocks"]["embeddings"]["dtype"] == "float32"
    lrc = next(n for n, m in done.quant["matrices"].items() if m["stored"].startswith("rank"))
    assert done.quant["matrices"][lrc]["stored"].endswith("4-bit g32")
    assert count_parameters(model) < count_parameters(make_tiny("llama"))  # the factors count, not W


def _plain_transformers_logits(out, tmp_path) -> torch.Tensor:
    """The logits of `out` loaded by stock transformers in a process without welore on its path."""
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BLOCK_WELORE, str(out), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "logits.pt")


def test_a_quantised_compressed_dir_loads_the_same_in_welore_and_plain_transformers(tmp_path):
    model = make_tiny("llama")
    cfg = CompressConfig(ratio=0.3, min_ratio=0.0, bits=3, group_size=32, quantizer="hqq")
    done = compress(model, None, cfg, progress=False)
    out = save_compressed(model, tmp_path / "q", done.plan, settings=cfg.to_dict())
    model.eval()  # inference, as the loaded models are: the int4 kernel's path
    meta = json.loads((out / "welore.json").read_text())
    assert meta["quantization"]["bits_per_weight"] == done.quant["bits_per_weight"]
    assert meta["settings"]["bits"] == 3 and meta["settings"]["quantizer"] == "hqq"
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert torch.equal(_plain_transformers_logits(out, tmp_path), _logits(model))


def test_merge_dequantises_into_plain_modules_of_the_original_type(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = make_tiny("gpt2")  # Conv1D N-LRCs: merged back as Conv1D
    done = compress(model, None, CompressConfig(ratio=0.3, bits=4, group_size=32), progress=False)
    assert done.plan.lrcs and len(done.plan.lrcs) < len(done.plan.matrices)
    monkeypatch.setattr(QuantLinear, "int4_kernel", False)  # fp32 activations, as the merged model has
    before = _logits(model)
    merge_to_dense(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-4)
    save_dense(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(plain), before, atol=1e-5, rtol=1e-4)


def test_quantised_factors_are_not_trained_and_say_why():
    model = make_tiny("llama")
    compress(model, None, CompressConfig(ratio=0.3, min_ratio=0.0, bits=4, group_size=32), progress=False)
    with pytest.raises(WeloreError, match="quantised"):
        set_trainable(model, "lrc")


def test_plain_quantisation_of_a_dense_model():
    model = make_tiny("opt")
    before = _logits(model)
    report = quantize_model(model, 8, 32, progress=False)
    # 8 bits + 32 bits of fp16 scale and zero per 32 weights, and OPT's biases and norms in 32 bits
    assert 9 < report["bits_per_weight"] < 10.5
    torch.testing.assert_close(_logits(model), before, atol=5e-2, rtol=0)


@pytest.mark.parametrize("flags, message", [
    (["--bits", "5"], "bits must be one of 2, 3, 4, 8"),
    (["--bits", "4", "--group-size", "12"], "group size must be a positive multiple of 8"),
    (["--bits", "4", "--stream"], "quantising needs the model in memory"),
    (["--bits-per-weight", "0.5"], "below the smallest setting"),
    (["--bits-per-weight", "3", "--bits", "4"], "drop --bits"),
    (["--bits-per-weight", "3", "--allocation", "loss"], "drop --allocation loss"),
    (["--bits-per-weight", "17"], "bits per weight must be in (0, 16]"),
    (["--allocation", "bits"], "needs a budget"),
    (["--bits", "4", "--quantizer", "gptq", "--calib-samples", "0"], "the gptq quantizer needs calibration data"),
])
def test_bad_quantisation_flags_are_one_line(capsys, model_dir, tmp_path, flags, message):
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--no-eval", "-q", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_unknown_quantizer_is_refused_by_the_parser(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's own error: usage, then the line
        run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--bits", "4", "--quantizer", "awq")
    assert e.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_storage_choices_measure_what_each_choice_stores_and_loses():
    from welore.spectrum import analyze

    model = make_tiny("llama")
    targets = find_targets(model)
    spectra = attach_choices(model, analyze(model, targets, keep_factors=True, progress=False), group=32,
                             progress=False)
    t = targets[0]
    c = spectra.choices[t.name]
    full, (m, n) = min(t.shape), t.shape
    dense = c["rank"] == full
    assert sorted(c["bits"][dense]) == [*BITS, 32] and c["err"][dense & (c["bits"] == 32)] == 0
    errs = [c["err"][dense & (c["bits"] == b)][0] for b in BITS]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3  # more bits, less error
    q = quantize_weight(weight_matrix(model.get_submodule(t.name)), None, 4, group_for(n, 32))
    assert c["nbytes"][dense & (c["bits"] == 4)][0] == sum(b.numel() * b.element_size() for b in q.buffers())
    low = ~dense
    assert low.any() and (c["rank"][low] * (m + n) < m * n).all()
    # at the same rank, factors in fewer bits lose more
    k = c["rank"][low].max()
    assert (np.diff(c["err"][(c["rank"] == k)][np.argsort(-c["bits"][c["rank"] == k])]) >= 0).all()


@pytest.mark.parametrize("method, quantizer", [("svd", "rtn"), ("whiten-fisher", "gptq")])  # data-free; the default
def test_a_bits_per_weight_budget_is_met_and_stored_as_planned(tmp_path, tokenizer, method, quantizer):
    model = make_tiny("llama")
    cfg = CompressConfig(bits_per_weight=5.0, group_size=32, method=method, quantizer=quantizer, calib_samples=2,
                         calib_seqlen=32)
    assert cfg.allocation == "bits" and cfg.target == "bits"
    tok = tokenizer if method != "svd" else None
    done = compress(model, tok, cfg, progress=False)
    plan = done.plan
    assert plan.bits_per_weight <= 5.0 and done.quant["bits_per_weight"] <= 5.0 + 1e-9
    assert done.quant["bits_per_weight"] > 4.0  # the budget is spent, not wasted
    assert len({m.bits for m in plan.matrices}) > 1  # mixed widths: the point of a joint rule
    for mp in plan.matrices:  # the bytes the plan counted are the bytes stored
        stored = done.quant["matrices"][mp.name]
        assert stored["bits"] == pytest.approx(8 * mp.nbytes / mp.params_before, abs=1e-3), mp.name
    out = save_compressed(model, tmp_path / "q", plan, settings=cfg.to_dict())
    model.eval()  # inference, as the loaded model is: the int4 kernel's path
    assert torch.equal(_logits(load_compressed(out, device="cpu").model), _logits(model))
    assert json.loads((out / "welore.json").read_text())["plan"]["totals"]["bits_per_weight"] == plan.bits_per_weight


def test_storage_reuses_the_tables_gptq_fits_and_stores_what_it_would_have_fitted(tokenizer):
    from dataclasses import replace

    from welore.compress import _quantize, apply_plan

    cfg = CompressConfig(bits_per_weight=4.0, group_size=32, calib_samples=2, calib_seqlen=32)
    assert cfg.quantizer == "gptq"
    done = compress(make_tiny("llama"), tokenizer, cfg, progress=False)
    fits = done.first_pass[1].fits
    dense_gptq = [m for m in done.plan.matrices if not m.lrc and not m.correction and m.bits < 8]
    assert dense_gptq and all(m.bits in fits[m.name] for m in dense_gptq)
    again = apply_plan(make_tiny("llama"), done.plan, done.first_pass[0], progress=False)
    _quantize(again, cfg, done.plan, done.stats, replace(done.first_pass[1], fits={}), False)  # every matrix fitted anew
    ours, theirs = unique_state_dict(done.model), unique_state_dict(again)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_larger_budget_never_plans_a_worse_model():
    from welore.allocate import allocate
    from welore.spectrum import analyze

    model = make_tiny("llama")
    spectra = attach_choices(model, analyze(model, find_targets(model), keep_factors=True, progress=False),
                             group=32, progress=False)

    def err(plan):
        total = 0.0
        for mp in plan.matrices:
            c = spectra.choices[mp.name]
            total += c["err"][(c["rank"] == mp.kept_rank) & (c["bits"] == mp.bits)].min()
        return total

    plans = [allocate(spectra, ratio=b, target="bits", allocation="bits", min_ratio=0.0) for b in (3, 4, 6, 10)]
    assert all(p.bits_per_weight <= b for p, b in zip(plans, (3, 4, 6, 10)))
    errs = [err(p) for p in plans]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    assert any(p.lrcs for p in plans[:2])  # at tight budgets low rank is among the choices taken


def test_the_main_job_with_a_budget_compares_plain_quantisation_around_it(capsys, model_dir, tmp_path):
    code, out, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--bits-per-weight", "4.5",
                         "--group-size", "32", "--eval-tokens", "256", "--seqlen", "64", "--new-tokens", "0", "-q")
    assert code == 0, err
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("plain", "rank+bits"))}
    # the tiny model's 32-wide rows pay a bit per weight for scales and zeros: 2 bits fit, 3 do not
    assert list(rows) == ["plain gptq 2-bit", "plain gptq 3-bit", "rank+bits"], out  # gptq: the default with a budget
    bits = {k: float(v[-2]) for k, v in rows.items()}  # the columns end: bits/weight, wikitext2 ppl
    assert bits["plain gptq 2-bit"] <= bits["rank+bits"] <= 4.5 < bits["plain gptq 3-bit"]
    meta = json.loads((tmp_path / "o" / "welore.json").read_text())
    assert meta["quantization"]["bits_per_weight"] == pytest.approx(bits["rank+bits"], abs=0.005)


@pytest.mark.parametrize("whitened", [False, True])
def test_q_plus_lr_corrects_what_the_quantiser_loses(whitened):
    """W ~ Q(W - LR) + LR: the correction takes back most of a 2-bit quantiser's loss in the norm it is
    fitted in (the output error on given inputs, when whitened), and more rank takes back more."""
    from welore.factorize import whitening_factor
    from welore.quantize import fit_q_plus_lr

    g = torch.Generator().manual_seed(0)
    # a heavy-tailed weight (a few strong directions over noise), as trained matrices have
    w = torch.randn(96, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.3 * torch.randn(96, 128, generator=g)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 3, 128)  # uneven input channels
    scaling = tuple(f.float() for f in whitening_factor((x.T @ x).double())[:2]) if whitened else None

    def error(approx):
        d = w - approx
        return float((x @ d.T).norm() if whitened else d.norm())

    plain = error(quantize_weight(w, None, 2, 32).dequantize())
    errs = [error(fit_q_plus_lr(w, 2, 32, k, scaling=scaling).dense()) for k in (4, 8, 16)]
    assert errs[1] < 0.2 * plain and errs == sorted(errs, reverse=True)  # rank 8: the planted directions
    q = fit_q_plus_lr(w, 2, 32, 8, scaling=scaling, bias=torch.zeros(96))
    x1 = torch.randn(3, 128, generator=g)
    torch.testing.assert_close(q(x1), x1 @ q.dense().T, atol=1e-4, rtol=1e-4)


def test_a_q_plus_lr_layer_saves_loads_and_merges(tmp_path, monkeypatch):
    """A model holding Q + LR layers (what the bits rule picks at low budgets on larger matrices than a
    tiny model has) loads in welore and plain transformers with the same logits, and merges."""
    from welore.quantize import fit_q_plus_lr

    model = make_tiny("llama")
    done = compress(model, None, CompressConfig(ratio=0.3, min_ratio=0.0), progress=False)
    dense = [mp.name for mp in done.plan.matrices if not mp.lrc][:2]
    for name in dense:
        module = model.get_submodule(name)
        model.set_submodule(name, fit_q_plus_lr(module.weight, 3, 32, 4, bias=module.bias))
    out = save_compressed(model, tmp_path / "q", done.plan, settings={})
    model.eval()  # inference, as the loaded models are: the int4 kernel's path
    meta = json.loads((out / "welore.json").read_text())
    assert meta["quantization"]["matrices"][dense[0]]["stored"] == (
        "3-bit g32 + rank 4 fp16 correction")
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert torch.equal(_plain_transformers_logits(out, tmp_path), _logits(model))
    monkeypatch.setattr(QuantLinear, "int4_kernel", False)  # fp32 activations, as the merged model has
    before = _logits(model)
    merge_to_dense(model)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-4)


def test_a_budget_alone_picks_the_benchmarks_best_configuration():
    cfg = CompressConfig(bits_per_weight=4.25)
    assert (cfg.allocation, cfg.method, cfg.quantizer, cfg.target, cfg.ratio) == (
        "bits", "whiten-fisher", "gptq", "bits", 4.25)
    assert {CompressConfig(bits_per_weight=b).quantizer for b in (2.5, 3.0, 3.5, 4.5)} == {"gptq"}  # ranked first at each
    assert CompressConfig(bits_per_weight=3.25, method="svd", quantizer="rtn").method == "svd"  # as asked
    assert (CompressConfig().method, CompressConfig(bits=4).quantizer) == ("svd", "rtn")  # without a budget
