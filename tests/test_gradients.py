import json

import numpy as np
import pytest
import torch

from welore import WeloreError
from welore.gradients import (
    correlations,
    cosine,
    matrix_summary,
    pretrain_model,
    record_gradients,
    spearman,
    stable_rank,
    subspace_overlap,
    text_batches,
    top_svd,
    write_report,
)


def test_stable_rank_known_answers():
    g = torch.randn(20, 1) @ torch.randn(1, 30)
    assert stable_rank(g) == pytest.approx(1.0, rel=1e-6)  # rank 1
    assert stable_rank(torch.eye(12)) == pytest.approx(12.0)  # flat spectrum: min(m, n)
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.25)


def test_subspace_overlap_known_answers():
    q, _ = torch.linalg.qr(torch.randn(16, 6))
    a, b = q[:, :3], q[:, 3:]
    assert subspace_overlap(a, a) == pytest.approx(1.0)
    assert subspace_overlap(a, b) == pytest.approx(0.0, abs=1e-6)
    rot, _ = torch.linalg.qr(torch.randn(3, 3))
    assert subspace_overlap(a, a @ rot) == pytest.approx(1.0)  # same span, other basis
    assert subspace_overlap(a, torch.cat([a[:, :1], b[:, :2]], 1)) == pytest.approx(1 / 3)


def test_cosine_and_spearman():
    x = torch.randn(5, 4)
    assert cosine(x, 2 * x) == pytest.approx(1.0) and cosine(x, -x) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


def test_randomized_svd_matches_exact_within_tolerance():
    # a realistic gradient: a few strong directions over a noise floor
    torch.manual_seed(0)
    g = torch.randn(200, 6) @ torch.diag(torch.tensor([50.0, 30, 20, 10, 5, 3])) @ torch.randn(6, 150)
    g += 0.5 * torch.randn(200, 150)
    Ue, Se, Ve = top_svd(g, 4, exact=True)
    Ur, Sr, Vr = top_svd(g, 4, exact=False)
    # stated tolerance: top-4 singular values within 1%, subspaces overlap > 0.99
    assert torch.allclose(Sr, Se, rtol=1e-2)
    assert subspace_overlap(Ue, Ur) > 0.99 and subspace_overlap(Ve, Vr) > 0.99


@pytest.fixture
def short_run(tokenizer):
    model = pretrain_model("llama-tiny", vocab_size=256)
    batches, measure = text_batches(tokenizer, seqlen=32, batch_size=2)
    return record_gradients(model, batches, measure, steps=6, every=2, lr=1e-3, top_k=4, rank=2, progress=False)


def test_short_run_produces_every_series_and_plot(short_run, tmp_path):
    rec = short_run
    assert rec.steps == [0, 2, 4, 6] and len(rec.losses) == 6
    for name, s in rec.series.items():
        assert len(s["stable_rank"]) == len(s["top_sv"]) == len(s["cosine_first"]) == 4
        assert len(s["overlap_left"]) == len(s["overlap_right"]) == len(s["cosine_prev"]) == 3
        assert all(0 <= o <= 1 + 1e-9 for o in s["overlap_left"])
        assert all(1 - 1e-6 <= r for r in s["stable_rank"])
        assert rec.weight_spectra[name]["start"] != rec.weight_spectra[name]["end"]  # it trained
    corr = write_report(rec, tmp_path, "tiny")
    assert -1 <= corr["overall"]["lowrank_vs_reduction"] <= 1
    for f in ("gradients.json", "report.md", "grad_stable_rank.png", "grad_overlap.png", "weight_spectra.png",
              "grad_vs_reduction.png"):
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "gradients.json").read_text())
    assert set(data) == {"record", "summary", "correlations"}


def test_summary_and_correlations(short_run):
    summary = matrix_summary(short_run)
    assert len(summary) == 4 * 7 and all(0 <= r["weight_reduction"] < 1 for r in summary)
    corr = correlations(summary)
    assert set(corr["by_type"]) == {r["type"] for r in summary} and corr["overall"]["n"] == 28
    assert all(-1 <= corr["overall"][k] <= 1 for k in ("lowrank_vs_update", "stability_vs_update"))


def test_update_spectrum_is_that_of_the_weight_change(tokenizer):
    """The recorded update spectrum is the SVD of W_end - W_start, checked on a direct copy."""
    model = pretrain_model("llama-tiny", vocab_size=256)
    name = "model.layers.0.self_attn.o_proj"
    before = model.get_submodule(name).weight.detach().clone()
    batches, measure = text_batches(tokenizer, seqlen=16, batch_size=1)
    rec = record_gradients(model, batches, measure, steps=2, every=2, lr=1e-3, top_k=4, rank=2, progress=False)
    expected = torch.linalg.svdvals(model.get_submodule(name).weight.detach() - before)
    assert torch.allclose(torch.tensor(rec.weight_spectra[name]["update"]), expected, rtol=1e-4, atol=1e-7)
    summary = {r["name"]: r for r in matrix_summary(rec)}
    s = expected.double()
    assert summary[name]["update_stable_rank_rel"] == pytest.approx((s.pow(2).sum() / s[0] ** 2).item() / 128)


def test_spearman_leaves_out_nan_pairs():
    assert spearman([1, 2, float("nan"), 3, 4], [10, 20, 5, 30, 40]) == pytest.approx(1.0)
    assert np.isnan(spearman([float("nan")] * 4, [1, 2, 3, 4]))


def test_bad_input(tokenizer):
    model = pretrain_model("llama-tiny", vocab_size=256)
    batches, measure = text_batches(tokenizer, seqlen=16, batch_size=1)
    with pytest.raises(WeloreError, match="steps must be > 0"):
        record_gradients(model, batches, measure, steps=0, every=1)
    with pytest.raises(WeloreError, match="sampling interval"):
        record_gradients(model, batches, measure, steps=4, every=5)
    with pytest.raises(WeloreError, match="unknown preset"):
        pretrain_model("gpt-5", vocab_size=256)
    with pytest.raises(WeloreError, match="no linear target"):
        record_gradients(torch.nn.Sequential(torch.nn.ReLU()), batches, measure, steps=2, every=1)
