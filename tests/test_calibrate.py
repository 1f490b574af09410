import pytest
import torch

from welore import WeloreError, find_targets
from welore.calibrate import calibration_batches, collect_stats
from welore.factorize import (
    analyze_data_aware,
)


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


def test_the_models_own_samples_calibrate_without_data(tokenizer):
    from conftest import make_tiny

    from welore import CompressConfig
    from welore.compress import compress

    model, rng = make_tiny("llama"), torch.random.get_rng_state()
    ids = calibration_batches(tokenizer, 3, 16, "self", seed=1, model=model)
    assert ids.shape == (3, 16) and torch.equal(ids, calibration_batches(tokenizer, 3, 16, "self", seed=1, model=model))
    assert not torch.equal(ids, calibration_batches(tokenizer, 3, 16, "self", seed=2, model=model))
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded apart from the caller's random state
    assert not set(ids[:, 0].tolist()) & set(tokenizer.all_special_ids)
    cfg = CompressConfig(ratio=0.3, method="whiten-fisher", calib_data="self", calib_samples=2, calib_seqlen=16)
    done = compress(model, tokenizer, cfg, progress=False)
    assert done.stats and cfg.to_dict()["calibration"]["corpus"] == "self"


def test_sampling_calibration_text_needs_the_model_in_memory(model_dir, tmp_path, tokenizer, capsys):
    from conftest import make_tiny

    from welore.calibrate import sampled_batches
    from welore.cli import main

    with pytest.raises(WeloreError, match="needs the model in memory"):
        calibration_batches(tokenizer, 2, 16, "self")
    with pytest.raises(WeloreError, match="needs a tokenizer"):
        sampled_batches(make_tiny("llama"), None, 2, 16)
    out = tmp_path / "o"
    assert main(["compress", str(model_dir), "--stream", "--method", "whiten", "--calib-data", "self", "-o", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the model in memory" in err and len(err.splitlines()) == 1 and not out.exists()
