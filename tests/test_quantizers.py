"""The quantisers (welore.quantizers): round to nearest, HQQ's fit and GPTQ, one matrix at a time, into
HQQ's layout; and what a calibrated quantiser needs."""

import pytest
import torch
from conftest import make_tiny

from welore import CompressConfig, WeloreError
from welore.compress import compress
from welore.layers import LowRankLinear
from welore.qlinear import QuantLinear
from welore.quantize import quantize_model
from welore.quantizers import BITS, group_for, quantize_weight, quantize_widths


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(64, 96), (37, 53)])
def test_round_to_nearest_is_within_half_a_step_of_every_weight(bits, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    q = quantize_weight(w, None, bits, 32)
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
    rtn = quantize_weight(w, None, 3, 64).dequantize()
    hqq = quantize_weight(w, None, 3, 64, "hqq").dequantize()
    assert not torch.equal(rtn, hqq)
    # HQQ minimises an l_p (p = 0.7) error of each group; it never does worse there than rounding
    assert (hqq - w).abs().pow(0.7).sum() <= (rtn - w).abs().pow(0.7).sum() * 1.001


def test_group_sizes_stay_within_rows_where_they_can():
    assert group_for(576, 128) == 96 and group_for(1536, 128) == 128 and group_for(576, 64) == 64
    assert group_for(13, 32) == 32  # no divisor near 32: groups run across rows


def correlated_inputs(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs near a low-dimensional subspace with a few strong channels, as a transformer's are: where
    GPTQ's error feedback pays (a column's error moved onto columns that carry the same signal)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, n, generator=g) + 0.1 * torch.randn(tokens, n, generator=g)
    x[:, :4] *= 5
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error_and_stores_its_own_grid(bits):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    x = correlated_inputs(128)
    out = {q: quantize_weight(w, None, bits, 32, q, hessian=(x.T @ x).double()) for q in ("rtn", "hqq", "gptq")}
    err = {q: ((layer.dequantize() - w) @ x.T).pow(2).sum().item() for q, layer in out.items()}
    assert err["gptq"] < 0.2 * min(err["rtn"], err["hqq"]), err  # measured: 0.04x
    # GPTQ's levels, scales and zeros land in HQQ's layout: every weight on its group's grid
    q = out["gptq"]
    back = q.dequantize().reshape(-1, 32)
    steps = back / q.scale[: len(back)].float() + q.zero[: len(back)].float()  # each weight's level
    assert q.qweight.dtype == (torch.int32 if bits == 3 else torch.uint8)
    torch.testing.assert_close(steps, steps.round(), atol=2e-2, rtol=0)
    assert steps.min() >= -1e-2 and steps.max() <= 2 ** bits - 1 + 1e-2


def test_gptq_without_inputs_is_a_one_line_error():
    with pytest.raises(WeloreError, match="gptq quantizer needs calibration data"):
        quantize_weight(torch.randn(8, 32), None, 4, 32, "gptq")


def test_gptq_where_groups_straddle_rows_stores_hqqs_fit():
    w, x = torch.randn(16, 40), correlated_inputs(40)
    gptq = quantize_weight(w, None, 4, 32, "gptq", hessian=(x.T @ x).double())  # 40 wide rows, groups of 32
    assert torch.equal(gptq.dequantize(), quantize_weight(w, None, 4, 32, "hqq").dequantize())


def test_a_compressed_model_quantised_by_gptq_reads_each_factors_inputs(tokenizer):
    model = make_tiny("llama")
    cfg = CompressConfig(ratio=0.3, min_ratio=0.0, bits=4, group_size=32, quantizer="gptq", calib_samples=4,
                         calib_seqlen=32)
    assert cfg.calibrated  # a data-free method, calibrated for the quantiser
    done = compress(model, tokenizer, cfg, progress=False)
    lrcs = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lrcs and all(isinstance(f, QuantLinear) for m in lrcs for f in (m.down, m.up))
    assert done.quant["bits_per_weight"] < 8 and done.stats is not None  # 4-bit, plus the tiny model's norms


def test_gptq_needs_statistics_for_every_matrix():
    model = make_tiny("llama")
    with pytest.raises(WeloreError, match="needs calibration statistics"):
        quantize_model(model, 4, 32, "gptq", stats={}, progress=False)
    with pytest.raises(WeloreError, match="gptq quantizer needs calibration data"):
        CompressConfig(bits=4, quantizer="gptq", calib_samples=0)


def test_gptq_at_several_widths_in_one_pass_is_each_width_alone():
    w, x = torch.randn(24, 64, generator=torch.Generator().manual_seed(2)), correlated_inputs(64)
    hessian = (x.T @ x).double()
    together = quantize_widths(w, None, (2, 3, 4), 32, "gptq", hessian=hessian)
    for bits, layer in zip((2, 3, 4), together):
        alone = quantize_weight(w, None, bits, 32, "gptq", hessian=hessian)
        assert layer.bits == bits and torch.equal(layer.dequantize(), alone.dequantize())
