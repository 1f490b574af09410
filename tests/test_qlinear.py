"""QuantLinear's int4 kernel path (welore.qlinear.Int4Weight): the same product as HQQ's dequantised
weights up to the activations' bfloat16 rounding, for every group and shape the kernel cannot take
as it is; used in inference only, and rebuilt when the stored weight changes."""

import pytest
import torch

from welore.qlinear import Int4Weight, QuantLinear
from welore.quantizers import quantize_weight


def _layer(out_features: int, in_features: int, bits: int, group: int, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    return quantize_weight(w, torch.randn(out_features, generator=g), bits, group, "hqq").eval()


@pytest.mark.parametrize("out_features, in_features, bits, group", [
    (48, 128, 4, 64),    # as the kernel takes it
    (48, 128, 4, 128),
    (72, 192, 4, 96),    # rows padded to 80; groups of 96 as three of 32
    (64, 144, 3, 72),    # groups of 72 padded to 96, the input alike
    (32, 96, 2, 32),
])
def test_the_kernel_computes_what_hqq_dequantises(out_features, in_features, bits, group):
    layer = _layer(out_features, in_features, bits, group)
    x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(1))
    kernel = layer.int4()
    assert isinstance(kernel, Int4Weight)
    # the reference: the dequantised weight against the input as the kernel sees it (bfloat16)
    ref = x.bfloat16().float() @ layer.dequantize().T
    got = kernel(x)
    assert got.dtype == x.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_inference_runs_on_the_kernel_and_training_on_hqq():
    layer = _layer(48, 128, 4, 64)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = layer(x)
    assert layer._int4 is not None and layer._int4[1] is not None
    torch.testing.assert_close(fast, layer.int4()(x) + layer.bias)
    exact = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    assert not torch.equal(fast, exact)  # bfloat16 activations: close, not equal
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
    xg = x.clone().requires_grad_()
    y = layer(xg)  # gradients wanted: HQQ's path, exact, and the gradient flows
    torch.testing.assert_close(y, exact)
    y.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    layer.train()
    assert layer._int4 is None  # training drops the kernel's copy


def test_the_kernel_is_rebuilt_when_the_weight_changes_and_skips_what_it_cannot_run(monkeypatch):
    layer, other = _layer(48, 128, 4, 64, seed=0), _layer(48, 128, 4, 64, seed=2)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)  # built for the first weights
        for name in ("qweight", "scale", "zero", "bias"):
            getattr(layer, name).copy_(getattr(other, name))  # what loading a state dict does
        torch.testing.assert_close(layer(x), other(x))
    assert _layer(48, 128, 8, 64).int4() is None  # 8 bits: HQQ's path
    assert _layer(48, 100, 4, 64).int4() is None  # groups across rows
    monkeypatch.setattr(QuantLinear, "int4_kernel", False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))


def test_training_mode_keeps_hqqs_path_even_without_gradients():
    layer = _layer(48, 128, 4, 64).train()
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    assert layer._int4 is None  # no kernel copy held while training
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dequantize(), layer.bias))
