import pytest
import torch
from conftest import make_tiny

from welore import WeloreError, find_targets
from welore.calibrate import (
    analyze_data_aware,
    calibration_batches,
    collect_stats,
    output_error,
    refit_up,
    scaling,
    whitening_factor,
)
from welore.targets import weight_matrix


@pytest.fixture
def outlier_llama():
    """Tiny llama whose embeddings have a few large channels, like the outlier features of real LLMs."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :3] *= 30
    return model


@pytest.fixture
def stats(outlier_llama, tokenizer):
    return collect_stats(outlier_llama, find_targets(outlier_llama), calibration_batches(tokenizer, 8, 64),
                         progress=False)


def _errors(model, spectra, stats, k):
    out = []
    for t in spectra.targets:
        U, s, Vh = spectra.factors[t.name]
        w = weight_matrix(model.get_submodule(t.name)).detach()
        out.append(output_error(w, (U[:, :k] * s[:k]) @ Vh[:k], stats[t.name].gram))
    return out


def test_shared_inputs_share_statistics(outlier_llama, tokenizer, stats):
    q, k, v, o = (f"model.layers.0.self_attn.{n}_proj" for n in "qkvo")
    assert stats[q].gram is stats[k].gram is stats[v].gram  # one input tensor, one Gram matrix
    assert stats[o].gram is not stats[q].gram
    assert stats[q].tokens == 8 * 64
    # the Gram matrix is X^T X of the real inputs: check against a direct capture
    seen = []
    h = outlier_llama.get_submodule(o).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for seq in calibration_batches(tokenizer, 8, 64):
            outlier_llama(input_ids=seq[None])
    h.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(stats[o].gram, x.T @ x, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats[o].abs_mean, x.abs().mean(0), rtol=1e-5)


def test_grouped_passes_give_the_same_statistics(outlier_llama, tokenizer, stats):
    batches = calibration_batches(tokenizer, 8, 64)
    small = collect_stats(outlier_llama, find_targets(outlier_llama), batches, max_stats_gib=1e-9, progress=False)
    for name, st in stats.items():
        assert torch.allclose(small[name].gram, st.gram, rtol=1e-9, atol=1e-9)


def test_data_aware_methods_reconstruct_outputs_better_than_svd(outlier_llama, stats):
    targets = find_targets(outlier_llama)
    svd = _errors(outlier_llama, analyze_data_aware(outlier_llama, targets, stats, "svd", progress=False), stats, 8)
    asvd = _errors(outlier_llama, analyze_data_aware(outlier_llama, targets, stats, "asvd", progress=False), stats, 8)
    white = _errors(outlier_llama, analyze_data_aware(outlier_llama, targets, stats, "whiten", progress=False),
                    stats, 8)
    # whitening is optimal for the output error at a given rank: never worse, matrix by matrix
    assert all(w <= s + 1e-6 for w, s in zip(white, svd))
    assert sum(white) < 0.5 * sum(svd)
    assert sum(asvd) < sum(svd)


def test_whitened_spectrum_is_the_output_error(outlier_llama, stats):
    t = find_targets(outlier_llama)[4]
    sp = analyze_data_aware(outlier_llama, [t], stats, "whiten", progress=False)
    U, s, Vh = sp.factors[t.name]
    w = weight_matrix(outlier_llama.get_submodule(t.name)).detach()
    err = output_error(w, (U[:, :5] * s[:5]) @ Vh[:5], stats[t.name].gram)
    full = sp.values[t.name].double()
    assert err == pytest.approx((full[5:].pow(2).sum() / full.pow(2).sum()).sqrt().item(), rel=1e-3)


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_reproduces_the_dense_layer(method, stats, outlier_llama):
    t = find_targets(outlier_llama)[0]
    w = weight_matrix(outlier_llama.get_submodule(t.name)).detach().double()
    if method == "svd":
        S = S_inv = torch.eye(w.shape[1], dtype=torch.float64)
    else:
        S, S_inv, _ = scaling(method, stats[t.name])
    U, s, Vh = torch.linalg.svd(w @ S, full_matrices=False)
    assert torch.allclose((U * s) @ (Vh @ S_inv), w, atol=1e-10)


def test_rank_deficient_gram_falls_back(tokenizer):
    x = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 6, dtype=torch.float64)  # rank 3 of 6
    gram = x.T @ x
    gram[5, :] = gram[:, 5] = 0  # a dead channel: plain Cholesky fails
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(gram)
    S, S_inv, how = whitening_factor(gram)
    assert torch.isfinite(S).all() and torch.isfinite(S_inv).all()
    assert torch.allclose(S @ S_inv, torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(S @ S.T, gram, atol=1e-3 * gram.diagonal().mean().item())
    # a negative-definite-looking matrix cannot be Cholesky-factored even with ridge: eigh takes over
    S, S_inv, how = whitening_factor(-torch.eye(4, dtype=torch.float64))
    assert how == "eigh" and torch.isfinite(S).all()


def test_refit_never_increases_the_output_error(outlier_llama, stats):
    t = find_targets(outlier_llama)[5]
    sp = analyze_data_aware(outlier_llama, [t], stats, "svd", progress=False)
    U, s, Vh = sp.factors[t.name]
    w = weight_matrix(outlier_llama.get_submodule(t.name)).detach()
    k = 6
    down, up = s[:k].sqrt()[:, None] * Vh[:k], U[:, :k] * s[:k].sqrt()
    before = output_error(w, up @ down, stats[t.name].gram)
    after = output_error(w, refit_up(w, down, stats[t.name].gram).float() @ down, stats[t.name].gram)
    assert after <= before + 1e-6 and after < 0.9 * before


def test_bad_calibration_input(outlier_llama, tokenizer):
    targets = find_targets(outlier_llama)
    with pytest.raises(WeloreError, match="needs calibration data"):
        analyze_data_aware(outlier_llama, targets, {}, "whiten", progress=False)
    with pytest.raises(WeloreError, match="too few calibration tokens"):
        calibration_batches(tokenizer, 10**6, 512)
    with pytest.raises(WeloreError, match="evaluation text"):
        calibration_batches(tokenizer, 4, 64, corpus="wikitext2")
    with pytest.raises(WeloreError, match="samples > 0"):
        calibration_batches(tokenizer, 0, 64)
    with pytest.raises(WeloreError, match="unknown method"):
        analyze_data_aware(outlier_llama, targets, {}, "magic", progress=False)
