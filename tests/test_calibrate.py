import numpy as np
import pytest
import torch
from conftest import make_tiny

from welore import WeloreError, find_targets
from welore.calibrate import calibration_batches, collect_stats
from welore.factorize import (
    analyze_data_aware,
    attach_loss_tails,
    output_error,
    output_weights,
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
                         gradients=True, progress=False)


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


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten", "whiten-fisher"])
def test_full_rank_reproduces_the_dense_layer(method, stats, outlier_llama):
    t = find_targets(outlier_llama)[0]
    w = weight_matrix(outlier_llama.get_submodule(t.name)).detach().double()
    if method == "svd":
        S = S_inv = torch.eye(w.shape[1], dtype=torch.float64)
    else:
        S, S_inv, _ = scaling(method, stats[t.name])
    d = output_weights(stats[t.name]) if method == "whiten-fisher" else torch.ones(w.shape[0], dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(d[:, None] * (w @ S), full_matrices=False)
    assert torch.allclose((U / d[:, None] * s) @ (Vh @ S_inv), w, atol=1e-10)


def test_loss_gradients_match_autograd(outlier_llama, tokenizer, stats):
    """grad_sq is the mean over tokens of (dLoss/dy)^2 per output channel, one backward per sequence."""
    name = "model.layers.1.mlp.down_proj"
    module = outlier_llama.get_submodule(name)
    total, n, outs = 0, 0, []

    def keep(m, a, o):
        o.retain_grad()
        outs.append(o)
    for seq in calibration_batches(tokenizer, 8, 64):
        outs.clear()
        h = module.register_forward_hook(keep)
        outlier_llama.zero_grad()
        outlier_llama(input_ids=seq[None], labels=seq[None]).loss.backward()
        h.remove()
        total = total + outs[0].grad.reshape(-1, outs[0].shape[-1]).double().pow(2).sum(0)
        n += seq.numel()
    assert torch.allclose(stats[name].grad_sq, total / n, rtol=1e-4, atol=1e-12)


def test_statistics_without_gradients_have_none(outlier_llama, tokenizer, stats):
    plain = collect_stats(outlier_llama, find_targets(outlier_llama), calibration_batches(tokenizer, 8, 64),
                          progress=False)
    name = find_targets(outlier_llama)[3].name
    assert plain[name].grad_sq is None
    assert torch.allclose(plain[name].gram, stats[name].gram, rtol=1e-9)  # the backward changes no Gram
    with pytest.raises(WeloreError, match="needs loss gradients"):
        analyze_data_aware(outlier_llama, find_targets(outlier_llama), plain, "whiten-fisher", progress=False)


def _weighted_error(w, w_approx, st, fisher: bool) -> float:
    """||D (W - W') X^T||_F^2 with D^2 = the method's output weights (scalar mean grad_sq unless fisher)."""
    d2 = output_weights(st).pow(2) if fisher else st.grad_sq.double().mean() * torch.ones(w.shape[0])
    diff = (w - w_approx).double()
    return torch.einsum("i,ij,jk,ik->", d2.double(), diff, st.gram, diff).item()


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten", "whiten-fisher"])
def test_loss_tails_are_the_weighted_output_error(outlier_llama, stats, method):
    """tails[k] is the (Fisher-)weighted output error of keeping k triplets: checked against the direct
    computation, which also checks that the error terms of different triplets add up."""
    targets = find_targets(outlier_llama)
    sp = attach_loss_tails(outlier_llama, analyze_data_aware(outlier_llama, targets, stats, method, progress=False),
                           stats, method)
    for t in (targets[0], targets[6]):
        w = weight_matrix(outlier_llama.get_submodule(t.name)).detach().double()
        U, s, Vh = (f.double() for f in sp.factors[t.name])
        tails = sp.tails[t.name]
        assert len(tails) == s.numel() + 1 and np.all(np.diff(tails) <= 1e-9 * tails[0])
        for k in (0, 3, s.numel()):
            direct = _weighted_error(w, (U[:, :k] * s[:k]) @ Vh[:k], stats[t.name], method == "whiten-fisher")
            assert tails[k] == pytest.approx(direct, rel=1e-3, abs=1e-9 * tails[0])


def test_whiten_fisher_protects_loss_sensitive_channels(outlier_llama, stats):
    """At equal rank, whiten-fisher has the lowest Fisher-weighted error of all methods (it is optimal for
    it), and whiten the lowest plain output error."""
    targets = find_targets(outlier_llama)
    sps = {m: analyze_data_aware(outlier_llama, targets, stats, m, progress=False) for m in METHODS_ALL}
    for t in targets:
        w = weight_matrix(outlier_llama.get_submodule(t.name)).detach().double()
        errs = {}
        for m, sp in sps.items():
            U, s, Vh = (f.double() for f in sp.factors[t.name])
            errs[m] = _weighted_error(w, (U[:, :4] * s[:4]) @ Vh[:4], stats[t.name], fisher=True)
        assert errs["whiten-fisher"] <= min(errs.values()) * (1 + 1e-4)


METHODS_ALL = ["svd", "asvd", "whiten", "whiten-fisher"]


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


def test_every_architecture_calibrates_with_gradients(tiny, tokenizer):
    """Loss gradients reach every target of every architecture (GPT-2's Conv1D, OPT, NeoX, Gemma's
    scaled embeddings), and the loss recipe (whiten-fisher factors + loss tails) runs end to end."""
    import welore  # the README's Python recipe, through the public API

    targets = welore.find_targets(tiny)
    st = welore.collect_stats(tiny, targets, welore.calibration_batches(tokenizer, 2, 32), gradients=True,
                              progress=False)
    assert all(st[t.name].grad_sq.shape == (t.out_features,) and st[t.name].grad_sq.sum() > 0 for t in targets)
    factors = welore.analyze_data_aware(tiny, targets, st, "whiten-fisher", progress=False)
    welore.attach_loss_tails(tiny, factors, st, "whiten-fisher")
    plan = welore.allocate(factors, ratio=0.3, target="params", allocation="loss", min_ratio=0.0)
    welore.apply_plan(tiny, plan, factors, progress=False)
    assert abs(plan.param_reduction - 0.3) < 0.1
    ids = calibration_batches(tokenizer, 1, 32)
    assert torch.isfinite(tiny(input_ids=ids).logits).all()
