import pytest

from welore import WeloreError
from welore.finetune_config import FinetuneConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="adapter"), "unknown training mode"),
    (dict(galore_rank=0), "galore rank must be > 0"),
    (dict(galore_scale=0.0), "galore scale must be > 0"),
    (dict(galore_scale=float("nan")), "galore scale must be > 0"),
    (dict(weight_decay=-1.0), "weight decay"),
    (dict(seqlen=4), "at least 8"),
    (dict(loss_chunk=-1), "loss chunk must be >= 0"),
    (dict(mode="lora", lora_targets="(down"), "not a valid regex"),
])
def test_finetune_config_is_validated_on_construction(kwargs, message):
    with pytest.raises(WeloreError, match=message):
        FinetuneConfig(**kwargs)


def test_resume_identity_leaves_out_the_stop():
    assert FinetuneConfig(stop_after=3).to_dict() == FinetuneConfig().to_dict()


def test_a_record_without_a_later_setting_matches_at_its_default():
    old = FinetuneConfig(mode="lora").to_dict()
    del old["lora_targets"]  # written before the setting existed
    assert FinetuneConfig(mode="lora").same_settings(old)
    assert not FinetuneConfig(mode="lora", lora_targets="down").same_settings(old)
    assert not FinetuneConfig(mode="lora", lr=1.0).same_settings(old)


@pytest.mark.parametrize("run, unread, read", [
    ({"mode": "lrc"}, {"galore_scale": 0.25, "lora_rank": 8}, {"lr": 1.0}),
    ({"mode": "lora"}, {"galore_rank": 8}, {"lora_rank": 8}),
    ({"mode": "galore"}, {"lora_targets": "down"}, {"galore_scale": 0.25}),
    ({"mode": "lrc"}, {"kd_weight": 0.5, "kd_temperature": 1.0}, {"teacher": "base"}),
    ({"mode": "lrc", "teacher": "base"}, {"galore_update_gap": 7}, {"kd_weight": 0.5}),
    ({"data": "c4"}, {"eval_examples": 300, "val_examples": 40}, {"eval_tokens": 2048}),
    ({"data": "coinflip"}, {"eval_tokens": 2048}, {"eval_examples": 300, "val_examples": 40}),
    ({"data": "coinflip", "keep_best": False}, {"val_examples": 40}, {"eval_examples": 300}),
    ({"mode": "lrc"}, {"activation_checkpointing": True, "loss_chunk": 256}, {"batch_size": 8}),
])
def test_a_run_is_the_settings_it_reads(run, unread, read):
    # a setting the run never reads (GaLore's scale in an lrc run) does not make it another run, for
    # resume and for benchmarks that find finished runs; one it reads does
    recorded = FinetuneConfig(**run).to_dict()
    assert FinetuneConfig(**run, **unread).same_settings(recorded)
    assert not FinetuneConfig(**run, **read).same_settings(recorded)
