"""welore.modes: what each training mode marks trainable, and the registry the config reads."""

import pytest

from welore import FinetuneConfig, WeloreError, apply_plan, plan_model, set_trainable
from welore.modes import MODES, Mode, get_mode


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
    assert list(MODES) == ["lrc", "full", "lora", "galore"] and all(issubclass(c, Mode) for c in MODES.values())
    # a setting one mode declares is read in that mode only: it never makes a resumed run another run
    assert "lora_rank" in FinetuneConfig(mode="lora").read_settings()
    assert "lora_rank" not in FinetuneConfig(mode="lrc").read_settings()
    assert "galore_rank" in FinetuneConfig(mode="galore").read_settings()
    with pytest.raises(WeloreError, match="unknown training mode"):
        get_mode("adapter")
