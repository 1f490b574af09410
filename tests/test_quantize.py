"""Quantised storage (welore.quantize, layers.QuantLinear): the values, the bits counted, the
directories (welore and plain transformers), merge, and bad settings."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny
from test_cli import run
from test_io import BLOCK_WELORE, _logits

from welore import CompressConfig, WeloreError, load_compressed, merge_to_dense, save_compressed, save_dense
from welore.compress import compress
from welore.io import unique_state_dict
from welore.layers import QuantLinear, count_parameters
from welore.modes import set_trainable
from welore.quantize import BITS, group_for, quantize_model
from welore.targets import layer_of


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(64, 96), (37, 53)])
def test_round_to_nearest_is_within_half_a_step_of_every_weight(bits, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    q = QuantLinear.from_weight(w, None, bits, 32)
    back = q.dequantize()
    # the reference: groups of 32 consecutive weights (row-major), min/max asymmetric rounding
    flat = torch.cat([w.reshape(-1), w.reshape(-1)[-1:].expand(-w.numel() % 32)]).view(-1, 32)
    step = (flat.max(1).values - flat.min(1).values) / (2 ** bits - 1)
    err = (back.reshape(-1) - w.reshape(-1)).abs()
    # half a step, plus what fp16 scale and zero cost: relative 2^-11 of up to 2^bits steps each
    bound = step.repeat_interleave(32)[: w.numel()] * (0.5 + 2 ** bits / 1024)
    assert back.shape == w.shape and bool((err <= bound).all())
    assert q.qweight.dtype == (torch.int32 if bits == 3 else torch.uint8)


def test_hqq_fits_at_least_as_well_as_rounding_in_its_own_norm():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    rtn = QuantLinear.from_weight(w, None, 3, 64).dequantize()
    hqq = QuantLinear.from_weight(w, None, 3, 64, optimize=True).dequantize()
    assert not torch.equal(rtn, hqq)
    # HQQ minimises an l_p (p = 0.7) error of each group; it never does worse there than rounding
    assert (hqq - w).abs().pow(0.7).sum() <= (rtn - w).abs().pow(0.7).sum() * 1.001


def test_group_sizes_stay_within_rows_where_they_can():
    assert group_for(576, 128) == 96 and group_for(1536, 128) == 128 and group_for(576, 64) == 64
    assert group_for(13, 32) == 32  # no divisor near 32: groups run across rows


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


def test_a_quantised_compressed_dir_loads_the_same_in_welore_and_plain_transformers(tmp_path):
    model = make_tiny("llama")
    cfg = CompressConfig(ratio=0.3, min_ratio=0.0, bits=3, group_size=32, quantizer="hqq")
    done = compress(model, None, cfg, progress=False)
    out = save_compressed(model, tmp_path / "q", done.plan, settings=cfg.to_dict())
    meta = json.loads((out / "welore.json").read_text())
    assert meta["quantization"]["bits_per_weight"] == done.quant["bits_per_weight"]
    assert meta["settings"]["bits"] == 3 and meta["settings"]["quantizer"] == "hqq"
    loaded = load_compressed(out, device="cpu")
    assert torch.equal(_logits(loaded.model), _logits(model))
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BLOCK_WELORE, str(out), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(model))


def test_merge_dequantises_into_plain_modules_of_the_original_type(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = make_tiny("gpt2")  # Conv1D N-LRCs: merged back as Conv1D
    done = compress(model, None, CompressConfig(ratio=0.3, bits=4, group_size=32), progress=False)
    assert done.plan.lrcs and len(done.plan.lrcs) < len(done.plan.matrices)
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
    (["--bits", "4", "--recover", "10"], "--recover trains the LRC factors"),
    (["--bits", "4", "--stream"], "--bits needs the model in memory"),
])
def test_bad_quantisation_flags_are_one_line(capsys, model_dir, tmp_path, flags, message):
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--no-eval", "-q", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_unknown_quantizer_is_refused_by_the_parser(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's own error: usage, then the line
        run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--bits", "4", "--quantizer", "gptq")
    assert e.value.code == 2 and "invalid choice: 'gptq'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
