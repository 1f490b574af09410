"""welore.compare_modes: each mode's settings, a learning rate per mode, checked before any run."""

import pytest

from welore import FinetuneConfig
from welore.compare_modes import mode_configs
from welore.errors import WeloreError


def test_each_mode_at_its_own_rate_where_given_else_the_shared_one():
    cfg = FinetuneConfig(lr=2e-4, steps=7)
    cfgs = mode_configs(cfg, ["lrc", "full", "lora"], {"full": 5e-5})
    assert {m: (c.mode, c.lr) for m, c in cfgs.items()} == {
        "lrc": ("lrc", 2e-4), "full": ("full", 5e-5), "lora": ("lora", 2e-4)}
    assert all(c.steps == 7 for c in cfgs.values())  # everything else shared
    assert mode_configs(cfg, ["lrc"])["lrc"] == cfg


@pytest.mark.parametrize("modes, lrs, needle", [
    (["lrc", "nope"], None, "unknown training mode 'nope'"),
    (["lrc"], {"nope": 1e-4}, "unknown training mode 'nope'"),
    (["lrc"], {"full": 1e-4}, "a learning rate for full, which is not among the modes run"),
    (["lrc", "full"], {"full": 0.0}, "learning rate must be > 0"),
    (["lrc", "full"], {"full": float("nan")}, "learning rate must be > 0"),
])
def test_bad_rates_and_modes_are_refused(modes, lrs, needle):
    with pytest.raises(WeloreError, match=needle):
        mode_configs(FinetuneConfig(), modes, lrs)


def test_welore_compare_is_always_the_function():
    """It was the function on first access and the submodule after (the module shared its name)."""
    import welore

    first = welore.compare
    import welore.compare_modes

    assert first is welore.compare is welore.compare_modes.compare and callable(welore.compare)
