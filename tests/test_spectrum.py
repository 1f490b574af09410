import pytest
import torch

from welore import Spectra, WeloreError, analyze, find_targets
from welore.spectrum import batched_svds, max_useful_rank, singular_values, thin_svd, truncated_svd
from welore.targets import weight_matrix


def test_singular_values_are_those_of_each_weight(arch, tiny):
    spectra = analyze(tiny, progress=False)
    for t in spectra.targets:
        ref = torch.linalg.svdvals(weight_matrix(tiny.get_submodule(t.name)).double()).float()
        assert torch.allclose(spectra.values[t.name], ref, rtol=1e-4, atol=1e-6)
        assert spectra.values[t.name].dtype == torch.float32


def test_factors_kept_only_up_to_the_useful_rank(llama):
    spectra = analyze(llama, keep_factors=True, progress=False)
    for t in spectra.targets:
        U, S, Vh = spectra.factors[t.name]
        r = max_useful_rank(*t.shape)
        assert r * sum(t.shape) < t.shape[0] * t.shape[1] <= (r + 1) * sum(t.shape)
        assert U.shape == (t.shape[0], r) and S.shape == (r,) and Vh.shape == (r, t.shape[1])
        # the kept factors are never larger than the weight itself
        assert U.numel() + Vh.numel() < t.shape[0] * t.shape[1]


def test_save_load_round_trip_and_stale_detection(tmp_path, llama):
    spectra = analyze(llama, progress=False)
    path = tmp_path / "spectra.safetensors"
    spectra.save(path)
    back = Spectra.load(path)
    assert [t.name for t in back.targets] == [t.name for t in spectra.targets]
    assert all(torch.equal(back.values[k], v) for k, v in spectra.values.items())
    back.check_matches(llama)  # same weights: fine
    with torch.no_grad():
        llama.get_submodule(spectra.targets[3].name).weight[0, 0] += 1e-3
    with pytest.raises(WeloreError, match="stale"):
        back.check_matches(llama)


def test_corrupt_spectra_file(tmp_path):
    bad = tmp_path / "spectra.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeloreError, match="not a valid welore spectra file"):
        Spectra.load(bad)
    with pytest.raises(WeloreError, match="no such spectra file"):
        Spectra.load(tmp_path / "missing.safetensors")


def test_nan_weights_are_refused(llama):
    targets = find_targets(llama)
    with torch.no_grad():
        llama.get_submodule(targets[2].name).weight[1, 1] = float("nan")
    with pytest.raises(WeloreError, match="NaN or Inf"):
        analyze(llama, progress=False)


def test_batched_svds_equal_one_svd_per_matrix(llama):
    """The CUDA path (one batched SVD per shape) gives the per-matrix results, in the input order."""
    ws = [m.weight.detach() for n, m in llama.named_modules() if n.startswith("model.layers.0.") and hasattr(m, "weight")
          and m.weight.dim() == 2]
    assert len({tuple(w.shape) for w in ws}) < len(ws)  # some shapes repeat: batches of several
    ranks = [max_useful_rank(*w.shape) for w in ws]
    for w, r, (U, S, Vh) in zip(ws, ranks, batched_svds(ws, ranks, "cpu")):
        U1, S1, Vh1 = truncated_svd(w, r)
        assert U.shape == U1.shape and Vh.shape == Vh1.shape and U.device.type == "cpu"
        assert torch.allclose(S, S1, atol=1e-5)
        assert torch.allclose(U * S[:r] @ Vh, U1 * S1[:r] @ Vh1, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32), (3, 24, 40)])
def test_thin_svd_is_the_thin_svd_whatever_the_orientation(shape):
    """Wide matrices are decomposed through their transpose (faster on the CPU): still orthonormal
    factors of the thin shapes that multiply back to the matrix, and LAPACK's singular values."""
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = thin_svd(a)
    _, S_ref, _ = torch.linalg.svd(a, full_matrices=False)
    k = min(shape[-2:])
    assert U.shape[-2:] == (shape[-2], k) and Vh.shape[-2:] == (k, shape[-1])
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, a)
    torch.testing.assert_close(U.mT @ U, torch.eye(k, dtype=a.dtype).expand_as(U.mT @ U))
    torch.testing.assert_close(Vh @ Vh.mT, torch.eye(k, dtype=a.dtype).expand_as(Vh @ Vh.mT))
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(singular_values(a), S_ref)
