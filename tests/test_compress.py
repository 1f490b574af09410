import copy

import pytest
import torch

from welore import (
    LowRankLinear,
    WeloreError,
    allocate,
    analyze,
    apply_plan,
    count_parameters,
    merge_to_dense,
    plan_model,
    set_trainable,
)
from welore.targets import weight_matrix


def _ids(n=2, t=11):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


def test_compressed_model_equals_dense_model_with_truncated_weights(arch, tiny):
    plan, spectra = plan_model(tiny, ratio=0.4, min_ratio=0.0, progress=False)
    assert plan.lrcs, "the plan should factorise something"
    reference = copy.deepcopy(tiny)
    with torch.no_grad():  # the dense model with each LRC replaced by its best rank-k approximation
        for mp in plan.lrcs:
            mod = reference.get_submodule(mp.name)
            w = weight_matrix(mod)
            U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
            wk = (U[:, :mp.alloc_rank] * S[:mp.alloc_rank]) @ Vh[:mp.alloc_rank]
            w.copy_(wk.to(w.dtype))
    apply_plan(tiny, plan, spectra, progress=False)
    for mp in plan.matrices:
        assert isinstance(tiny.get_submodule(mp.name), LowRankLinear) == mp.lrc
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(tiny(ids).logits, reference(ids).logits, atol=1e-4)


def test_compression_reuses_the_analysis_svd(llama, monkeypatch):
    plan, spectra = plan_model(llama, ratio=0.5, min_ratio=0.0, progress=False)
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    apply_plan(llama, plan, spectra, progress=False)
    assert calls == []  # never decomposed twice


def test_plan_without_factors_decomposes_once_per_lrc(llama, monkeypatch):
    spectra = analyze(llama, progress=False)  # values only (e.g. loaded from a cache)
    plan = allocate(spectra, ratio=0.5, min_ratio=0.0)
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    apply_plan(llama, plan, None, progress=False)
    assert len(calls) == len(plan.lrcs)


def test_parameter_count_matches_the_plan(arch, tiny):
    before = count_parameters(tiny)
    plan, spectra = plan_model(tiny, ratio=0.5, min_ratio=0.0, progress=False)
    apply_plan(tiny, plan, spectra, progress=False)
    assert before - count_parameters(tiny) == plan.params_before - plan.params_after


def test_merge_to_dense_restores_module_types(arch, tiny):
    kinds = {n: type(m) for n, m in tiny.named_modules()}
    plan, spectra = plan_model(tiny, ratio=0.5, min_ratio=0.0, progress=False)
    apply_plan(tiny, plan, spectra, progress=False)
    ids = _ids()
    with torch.no_grad():
        low = tiny(ids).logits
    merge_to_dense(tiny)
    assert {n: type(m) for n, m in tiny.named_modules()} == kinds
    with torch.no_grad():
        assert torch.allclose(tiny(ids).logits, low, atol=1e-5)


def test_apply_plan_errors(llama):
    plan, spectra = plan_model(llama, ratio=0.5, progress=False)
    apply_plan(llama, plan, spectra, progress=False)
    with pytest.raises(WeloreError, match="already compressed"):
        apply_plan(llama, plan, spectra, progress=False)
    with pytest.raises(WeloreError, match="no low-rank"):
        set_trainable(merge_to_dense(llama), "lrc")


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_reusing_a_first_pass_gives_the_fresh_result(llama, tokenizer, method):
    """compress(..., reuse=) replans over an earlier run's factors: the same plan and weights as a
    fresh compress() with that config, without a second SVD or calibration."""
    from welore import CompressConfig
    from welore.compress import compress

    calib = dict(calib_samples=2, calib_seqlen=32)
    first = compress(copy.deepcopy(llama), tokenizer, CompressConfig(ratio=0.4, method=method, **calib), progress=False)
    uni = CompressConfig(ratio=0.3, allocation="uniform", method=method, **calib)
    fresh = compress(copy.deepcopy(llama), tokenizer, uni, progress=False)
    reused = compress(copy.deepcopy(llama), tokenizer, uni, reuse=first, progress=False)
    assert reused.plan.to_dict() == fresh.plan.to_dict() and reused.plan.lrcs
    for a, b in zip(fresh.model.state_dict().values(), reused.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeloreError, match="other settings"):
        compress(copy.deepcopy(llama), tokenizer, CompressConfig(ratio=0.3, method="asvd", **calib), reuse=first,
                 progress=False)
