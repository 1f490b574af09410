import torch
from transformers.pytorch_utils import Conv1D

from welore import LowRankLinear


def test_factor_product_is_the_best_rank_k_approximation():
    torch.manual_seed(0)
    W = torch.randn(40, 24, dtype=torch.float64).float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for k in (1, 5, 12, 24):
        layer = LowRankLinear.from_svd(U, S, Vh, k, bias=None)
        err = torch.linalg.norm(W - layer.weight().detach())
        # Eckart-Young: the error is the root of the sum of the dropped squared singular values
        assert torch.allclose(err, S[k:].pow(2).sum().sqrt(), atol=1e-4)
        assert layer.down.weight.shape == (k, 24) and layer.up.weight.shape == (40, k)


def test_sqrt_s_balances_the_two_factors():
    torch.manual_seed(0)
    W = torch.randn(64, 32) * 10
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    layer = LowRankLinear.from_svd(U, S, Vh, 8, bias=None)
    assert torch.allclose(layer.up.weight.norm(), layer.down.weight.norm(), rtol=1e-4)


def test_unbalanced_data_aware_factors_are_rebalanced_per_component():
    """(U/D, V^T S^-1) of a data-aware method: each component's two vectors end up with equal norms,
    the product is unchanged, and plain SVD factors keep their exact bits."""
    torch.manual_seed(0)
    W = torch.randn(48, 32)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    d = torch.logspace(-4, 2, 48)[:, None]  # an output weighting spanning six orders of magnitude
    layer = LowRankLinear.from_svd(U / d, S, Vh * 3e3, 10, bias=None)
    up, down = layer.up.weight.detach(), layer.down.weight.detach()
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=0)
    want = (U[:, :10] / d) @ torch.diag(S[:10]) @ (Vh[:10] * 3e3)
    torch.testing.assert_close(up @ down, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    plain = LowRankLinear.from_svd(U, S, Vh, 10, bias=None)
    root = S[:10].sqrt()
    assert torch.equal(plain.down.weight, root[:, None] * Vh[:10]) and torch.equal(plain.up.weight, U[:, :10] * root)


def test_forward_matches_dense_and_keeps_bias():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 20)
    U, S, Vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    layer = LowRankLinear.from_svd(U, S, Vh, 16, bias=dense.bias.detach())  # full rank: exact
    x = torch.randn(3, 7, 16)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    back = layer.to_dense()
    assert isinstance(back, torch.nn.Linear) and torch.allclose(back(x), dense(x), atol=1e-5)


def test_conv1d_round_trip():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=out, nx=in; weight stored (in, out)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    U, S, Vh = torch.linalg.svd(conv.weight.detach().t(), full_matrices=False)
    layer = LowRankLinear.from_svd(U, S, Vh, 8, bias=conv.bias.detach(), kind="conv1d")
    back = layer.to_dense()
    x = torch.randn(4, 8)
    assert isinstance(back, Conv1D)
    assert torch.allclose(back(x), conv(x), atol=1e-5) and torch.allclose(layer(x), conv(x), atol=1e-5)


def test_dtype_follows_the_request():
    U, S, Vh = torch.linalg.svd(torch.randn(8, 8), full_matrices=False)
    layer = LowRankLinear.from_svd(U, S, Vh, 4, bias=None, dtype=torch.bfloat16)
    assert layer.up.weight.dtype == torch.bfloat16 == layer.down.weight.dtype


def test_column_major_factors_survive_building_copying_and_give_the_module_path_result():
    import copy

    torch.manual_seed(0)
    W = torch.randn(40, 24)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    layer = LowRankLinear.from_svd(U, S, Vh, 6, bias=torch.randn(40))
    for f in (layer.down, layer.up, copy.deepcopy(layer).down):
        assert f.weight.t().is_contiguous()  # the fast layout of the forward's mm
    x = torch.randn(3, 5, 24)
    reference = layer.up(layer.down(x))  # the plain two-Linear computation
    assert torch.allclose(layer(x), reference, atol=1e-6)
    assert layer(x).shape == (3, 5, 40)


def test_wrapped_factors_take_the_module_path():
    torch.manual_seed(0)
    W = torch.randn(12, 10)
    layer = LowRankLinear.from_svd(*torch.linalg.svd(W, full_matrices=False), 4, bias=None)
    x = torch.randn(2, 10)
    before = layer(x)
    seen = []
    handle = layer.down.register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 0)  # as a LoRA wrapper would
    assert torch.equal(layer(x), torch.zeros_like(before)) and seen == [(2, 4)]
    handle.remove()
    assert torch.allclose(layer(x), before)
