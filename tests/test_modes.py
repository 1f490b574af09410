"""welore.modes: what each training mode marks trainable, and the registry the config reads."""

import pytest
import torch

from welore import FinetuneConfig, WeloreError, apply_plan, load_compressed, plan_model, set_trainable
from welore.layers import LowRankLinear, QuantLinear
from welore.modes import FROZEN_GROUP, MODES, Mode, get_mode, prepare_mode
from welore.quantizers import quantize_weight
from welore.train import finetune


def test_set_trainable_modes(llama):
    plan, spectra = plan_model(llama, ratio=0.5, progress=False)
    apply_plan(llama, plan, spectra, progress=False)
    trainable, total = set_trainable(llama, "lrc")
    names = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("down.weight", "up.weight")) for n in names)
    assert len(names) == 2 * len(plan.lrcs)
    assert trainable == sum(p.numel() for n, p in llama.named_parameters() if n in names) < total
    assert set_trainable(llama, "full")[0] == total
    assert set_trainable(llama, "none")[0] == 0
    with pytest.raises(WeloreError, match="unknown train mode"):
        set_trainable(llama, "most")


def test_the_registry_is_what_the_config_reads():
    assert list(MODES) == ["lrc", "full", "lora", "galore", "qlrc", "qlora", "qlrc-complement", "scales"]
    assert all(issubclass(c, Mode) for c in MODES.values())
    # a setting one mode declares is read in that mode only: it never makes a resumed run another run
    assert "lora_rank" in FinetuneConfig(mode="lora").read_settings()
    assert "lora_rank" not in FinetuneConfig(mode="lrc").read_settings()
    assert "galore_rank" in FinetuneConfig(mode="galore").read_settings()
    # one setting of two modes is read by both (and by neither of the others)
    assert all("frozen_bits" in FinetuneConfig(mode=m).read_settings() for m in ("qlrc", "qlora", "qlrc-complement"))
    assert "frozen_bits" not in FinetuneConfig(mode="lora").read_settings()
    with pytest.raises(WeloreError, match="bits must be one of"):
        FinetuneConfig(mode="qlrc", frozen_bits=5)
    with pytest.raises(WeloreError, match="unknown training mode"):
        get_mode("adapter")


def _frozen(model) -> dict:
    """The quantised matrices' stored tensors (what must not change in training)."""
    return {f"{n}.{k}": t.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for k, t in (("qweight", m.qweight), ("scale", m.scale), ("zero", m.zero))}


def test_qlrc_trains_the_factors_over_quantised_n_lrcs(compressed_dir, tmp_path):
    model, _, info = prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="qlrc", frozen_bits=3))
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    lrcs = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert quant and info["frozen_matrices"] == len(quant)
    assert all(m.bits == 3 and m.group == FROZEN_GROUP // 2 for m in quant.values())  # 32-wide rows: groups of 32
    assert not any(n.rpartition(".")[0] in lrcs for n in quant)  # the factors stay in full precision
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{f}.weight" for n in lrcs for f in ("down", "up")}
    res = finetune(compressed_dir, tmp_path / "out", FinetuneConfig(mode="qlrc", frozen_bits=3, steps=6, lr=3e-3,
                                                                    batch_size=2, seqlen=64, eval_tokens=256,
                                                                    save_every=0), progress=False)
    saved = load_compressed(tmp_path / "out").model
    assert _frozen(saved).keys() == _frozen(model).keys()
    assert all(torch.equal(a, b) for a, b in zip(_frozen(saved).values(), _frozen(model).values()))
    assert res.metrics["frozen_bits"] == 3


def test_qlora_is_peft_lora_over_a_quantised_model_saved_as_q_plus_lr(compressed_dir, tmp_path):
    cfg = FinetuneConfig(mode="qlora", steps=6, lr=3e-3, batch_size=2, seqlen=64, eval_tokens=256, save_every=0)
    model, _, info = prepare_mode(load_compressed(compressed_dir).model, cfg)
    frozen = _frozen(model)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == info["lora_matrices"] and {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{x}.default.weight" for n in adapted for x in "AB"}
    res = finetune(compressed_dir, tmp_path / "out", cfg, progress=False)
    saved = load_compressed(tmp_path / "out").model
    quant = {n: m for n, m in saved.named_modules() if isinstance(m, QuantLinear)}
    # every block linear (N-LRCs and both factors of each LRC) is 4-bit with the adapter as its correction
    assert len(quant) == info["lora_matrices"] and all(m.bits == 4 and m.rank == info["lora_rank"] for m in quant.values())
    assert all(m.lr_up.abs().max() > 0 for m in quant.values())  # LoRA's B starts at zero: these trained
    renamed = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in frozen.items()}
    assert all(torch.equal(renamed[k], v) for k, v in _frozen(saved).items())  # the quantised base never moved
    assert res.evals[-1]["c4_ppl"] < res.evals[0]["c4_ppl"]


@pytest.fixture
def complemented_dir(model_dir, tokenizer, tmp_path):
    """The tiny llama of `model_dir` compressed, with `model_dir` recorded as its base model."""
    from welore import save_compressed
    from welore.models import load_model

    model = load_model(model_dir, tokenizer=False).model
    plan, spectra = plan_model(model, ratio=0.5, min_ratio=0.3, progress=False)
    apply_plan(model, plan, spectra, progress=False)
    return save_compressed(model, tmp_path / "compressed", plan, tokenizer=tokenizer, base_model=str(model_dir))


def test_qlrc_complement_trains_the_factors_over_a_quantised_copy_of_what_they_leave_out(
        complemented_dir, model_dir, tmp_path):
    from welore.models import load_model
    from welore.modes import Complemented

    base = load_model(model_dir, tokenizer=False).model
    cfg = FinetuneConfig(mode="qlrc-complement", frozen_bits=4, steps=6, lr=3e-3, batch_size=2, seqlen=64,
                         eval_tokens=256, save_every=0)
    model, _, info = prepare_mode(load_compressed(complemented_dir).model, cfg, base=str(model_dir))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, Complemented)}
    assert wrapped and info["complement_matrices"] == len(wrapped)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lrc.{f}.weight" for n in wrapped for f in ("down", "up")}
    for name, m in wrapped.items():  # the complement brings back most of what the factors dropped
        w = base.get_submodule(name).weight
        factored = m.lrc.up.weight @ m.lrc.down.weight
        assert (w - factored - m.rest.dequantize()).norm() < 0.25 * (w - factored).norm(), name
    res = finetune(complemented_dir, tmp_path / "out", cfg, progress=False)
    assert res.metrics["complement_matrices"] == len(wrapped)
    saved = load_compressed(tmp_path / "out").model
    quant = {n: m for n, m in saved.named_modules() if isinstance(m, QuantLinear)}
    assert all(quant[n].rank == m.lrc.rank for n, m in wrapped.items())  # each a Q + LR layer, the factors its LR
    # the frozen complements never moved; the factors trained
    assert all(torch.equal(quant[n].qweight, m.rest.qweight) for n, m in wrapped.items())
    assert any(not torch.equal(quant[n].lr_up, m.lrc.up.weight.half()) for n, m in wrapped.items())
    assert res.evals[-1]["c4_ppl"] < res.evals[0]["c4_ppl"]
    x = torch.randint(0, 100, (1, 12))  # plain transformers loads it, to the same logits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(plain(x).logits, saved(x).logits)


def test_frozen_scales_train_the_quantised_rest_and_keep_its_levels(complemented_dir, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from welore.qtrain import Complemented, TrainedScales

    cfg = FinetuneConfig(mode="qlrc-complement", frozen_scales=True, steps=6, lr=3e-3, batch_size=2, seqlen=64,
                         eval_tokens=256, save_every=0)
    assert "frozen_scales" in cfg.read_settings() and "frozen_scales" not in FinetuneConfig().read_settings()
    model, _, _ = prepare_mode(load_compressed(complemented_dir).model, cfg, base=str(model_dir))
    scaled = {n: m for n, m in model.named_modules() if isinstance(m, TrainedScales)}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, Complemented)}
    assert {n for n in scaled if n.endswith(".rest")} == {f"{n}.rest" for n in wrapped}  # every complement
    assert len(scaled) > len(wrapped)  # and every N-LRC
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lrc.{f}.weight" for n in wrapped for f in ("down", "up")} | {
        f"{n}.{p}" for n in scaled for p in ("scale", "zero")}
    levels = {n: m.q.qweight.clone() for n, m in scaled.items()}
    scales = {n: m.q.scale.clone() for n, m in scaled.items()}
    res = finetune(complemented_dir, tmp_path / "out", cfg, progress=False)
    saved = load_compressed(tmp_path / "out").model
    stored = {n.removesuffix(".rest"): saved.get_submodule(n.removesuffix(".rest")) for n in scaled}
    assert all(isinstance(m, QuantLinear) for m in stored.values())
    assert all(torch.equal(stored[n.removesuffix(".rest")].qweight, v) for n, v in levels.items())  # same levels
    assert sum(not torch.equal(stored[n.removesuffix(".rest")].scale, v) for n, v in scales.items()) > len(wrapped)
    assert res.evals[-1]["c4_ppl"] < res.evals[0]["c4_ppl"]
    x = torch.randint(0, 100, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(plain(x).logits, saved(x).logits)


def test_qlrc_complement_needs_the_base_model(compressed_dir, tmp_path):
    from conftest import make_tiny

    make_tiny("gpt2").save_pretrained(tmp_path / "other")
    with pytest.raises(WeloreError, match="not this model's base"):
        prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="qlrc-complement"),
                     base=str(tmp_path / "other"))
    with pytest.raises(WeloreError, match="cannot load model"):  # "tiny": the fixture's record, not a model
        prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="qlrc-complement"), base="tiny")
    with pytest.raises(WeloreError, match="records none"):
        prepare_mode(load_compressed(compressed_dir).model, FinetuneConfig(mode="qlrc-complement"))


def test_scales_train_a_quantised_model_and_keep_its_levels(tmp_path, tokenizer):
    from conftest import make_tiny

    from welore import CompressConfig, save_compressed
    from welore.compress import compress
    from welore.quantize import bits_report

    model = make_tiny("llama")
    with torch.no_grad():  # as compressed_dir's: a head that can express a confident prediction
        model.get_output_embeddings().weight.mul_(20)
    cfg = CompressConfig(ratio=0.3, min_ratio=0.0, bits=2, group_size=32, quantizer="hqq")
    done = compress(model, None, cfg, progress=False)
    src = save_compressed(model, tmp_path / "q", done.plan, tokenizer=tokenizer, settings=cfg.to_dict())
    train = FinetuneConfig(mode="scales", steps=8, lr=1e-3, batch_size=2, seqlen=64, eval_tokens=256, save_every=0)
    prepared, _, info = prepare_mode(load_compressed(src).model, train)
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert info["quantised_matrices"] == len(_frozen(model)) // 3
    assert trainable and all(n.endswith((".scale", ".zero")) for n in trainable)
    res = finetune(src, tmp_path / "out", train, progress=False)
    saved = load_compressed(tmp_path / "out").model
    before, after = _frozen(model), _frozen(saved)
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.endswith(".qweight"))  # the same levels
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(".scale"))
    assert bits_report(saved)["block_bytes"] == bits_report(model)["block_bytes"]  # exactly as small
    assert res.evals[-1]["c4_ppl"] < res.evals[0]["c4_ppl"]
    with pytest.raises(WeloreError, match="no quantised matrix"):
        prepare_mode(make_tiny("llama"), train)


def test_a_frozen_quantised_matrix_keeps_no_full_precision_copy_for_the_backward():
    w = torch.randn(96, 64)
    q = quantize_weight(w, None, 4, 64)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = q(x)
    assert torch.Size([96, 64]) not in saved and x.shape in saved  # the input only: W is dequantised again
    y.pow(2).sum().backward()
    w_q = q.dequantize()
    assert torch.allclose(x.grad, 2 * (x @ w_q.t()) @ w_q, atol=1e-5)
