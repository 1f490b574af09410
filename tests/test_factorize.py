"""Factorisation methods: each is optimal for what it claims (output error, loss estimate), exact at
full rank and robust to degenerate statistics; and the registry: a new method is one class plus one
registration, and the CLI takes it."""

import json

import numpy as np
import pytest
import torch

from welore import find_targets, load_compressed
from welore.cli import main
from welore.factorize import (
    METHODS,
    Factorizer,
    analyze_data_aware,
    attach_loss_tails,
    get_method,
    output_error,
    output_weights,
    refit_up,
    register,
    scaling,
    whitening_factor,
)
from welore.targets import weight_matrix


class RowNormWeighted(Factorizer):
    """A toy data-free method: weight each output row by its norm before the SVD (D = row norms)."""

    needs_stats = False

    def output_weights(self, st):
        return self.norms

    def decompose(self, w, st, rank):
        self.norms = w.double().norm(dim=1).clamp_min(1e-12)
        return super().decompose(w, st, rank)


@pytest.fixture
def toy():
    register("toy", RowNormWeighted())
    yield "toy"
    METHODS.pop("toy")


def test_a_registered_method_runs_through_welore_compress(toy, model_dir, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["compress", str(model_dir), "--method", toy, "--param-ratio", "0.3", "--min-ratio", "0",
                 "-o", str(out), "--no-eval", "-q"]) == 0
    meta = json.loads((out / "welore.json").read_text())
    assert meta["settings"]["method"] == "toy" and meta["plan"]["totals"]["lrc_count"] > 0
    loaded = load_compressed(out)
    assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]])).logits).all()


def test_the_toy_factors_are_its_own_and_exact_at_full_rank(toy, llama):
    from welore import find_targets
    from welore.targets import weight_matrix

    t = find_targets(llama)[0]
    sp = analyze_data_aware(llama, [t], {}, toy, progress=False)
    plain = analyze_data_aware(llama, [t], {}, "svd", progress=False)
    assert not torch.allclose(sp.values[t.name], plain.values[t.name])  # a different spectrum
    w = weight_matrix(llama.get_submodule(t.name)).detach().double()
    U, s, Vh, _ = get_method(toy).decompose(w, None, min(w.shape))
    assert torch.allclose((U * s) @ Vh, w, atol=1e-10)


def test_unknown_method_is_a_clean_error(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit):  # argparse's choices come from the registry
        main(["compress", str(model_dir), "--method", "toy", "-o", str(tmp_path / "x")])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_registry_refuses_what_is_not_a_factorizer():
    with pytest.raises(TypeError):
        register("bad", object())


def _errors(model, spectra, stats, k):
    out = []
    for t in spectra.targets:
        U, s, Vh = spectra.factors[t.name]
        w = weight_matrix(model.get_submodule(t.name)).detach()
        out.append(output_error(w, (U[:, :k] * s[:k]) @ Vh[:k], stats[t.name].gram))
    return out


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
