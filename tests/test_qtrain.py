"""welore.qtrain: the layers that train over quantised weights."""

import pytest
import torch

from welore.qtrain import TrainedScales, finish_all
from welore.quantizers import quantize_weight


@pytest.mark.parametrize("bits,shape,group", [(2, (40, 64), 32), (3, (24, 48), 16), (4, (33, 64), 64)])
def test_trained_scales_compute_the_stored_matrix_and_its_exact_gradients(bits, shape, group):
    # 3-bit packing pads rows, 33 x 64 in groups of 64 pads groups (a multiple of 8): both cut away
    torch.manual_seed(0)
    bias = torch.randn(shape[0])
    q = quantize_weight(torch.randn(shape), bias, bits, group, "hqq")
    layer = TrainedScales(q)
    x = torch.randn(2, 5, shape[1], requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ q.dequantize().t() + bias, rtol=1e-5, atol=1e-5)  # what is stored
    g = torch.randn_like(y)
    y.backward(g)
    # the reference: autograd through the dequantised matrix built from the same leaves
    scale, zero = layer.scale.detach().clone().requires_grad_(), layer.zero.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = ((q.group_levels().float() - zero) * scale).reshape(-1)[: shape[0] * shape[1]].view(shape)
    (x2 @ w.t() + bias).backward(g)
    for ours, ref in ((x.grad, x2.grad), (layer.scale.grad, scale.grad), (layer.zero.grad, zero.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert layer.scale.grad.abs().sum() > 0


def test_trained_scales_finish_as_the_quantlinear_they_came_from_with_new_scales():
    q = quantize_weight(torch.randn(16, 32), None, 4, 16, "hqq")
    levels = q.levels().clone()
    model = torch.nn.Sequential(TrainedScales(q))
    with torch.no_grad():
        model[0].scale.mul_(1.5)
        model[0].zero.add_(0.25)
    expected = model[0](torch.eye(32)).t()
    finish_all(model, TrainedScales)
    assert model[0] is q and torch.equal(q.levels(), levels)  # the levels never move: the same bytes, rescaled
    torch.testing.assert_close(q.dequantize(), expected, rtol=2e-3, atol=2e-3)  # fp16 scales and zeros
