from dataclasses import fields

import pytest

from welore import WeloreError
from welore.cli import build_parser
from welore.config import CompressConfig, FinetuneConfig, from_namespace


@pytest.mark.parametrize("command, cls", [("finetune", FinetuneConfig), ("compare", FinetuneConfig),
                                          ("compress", CompressConfig)])
def test_every_field_is_a_flag_with_the_dataclass_default(command, cls):
    args = build_parser().parse_args([command, "MODEL", "-o", "OUT"])
    if command == "compress":
        args.ratio = 0.5  # the CLI leaves --ratio unset to catch two of --ratio/--param-ratio/--threshold
    assert from_namespace(cls, args) == cls()
    assert all(hasattr(args, f.name) for f in fields(cls))


def test_flags_map_onto_the_config():
    args = build_parser().parse_args(["finetune", "M", "-o", "O", "--train", "lora", "--lora-rank", "3", "--lr",
                                      "0.01", "--grad_accum", "2"])
    assert from_namespace(FinetuneConfig, args) == FinetuneConfig(mode="lora", lora_rank=3, lr=0.01, grad_accum=2)
    args = build_parser().parse_args(["compress", "M", "--method", "whiten", "--targets", "q_proj", "k_proj",
                                      "--refit", "--calib-samples", "8"])
    args.ratio = 0.5
    cfg = from_namespace(CompressConfig, args)
    assert (cfg.method, cfg.targets, cfg.refit, cfg.calib_samples) == ("whiten", ["q_proj", "k_proj"], True, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="adapter"), "unknown training mode"),
    (dict(galore_rank=0), "galore rank must be > 0"),
    (dict(galore_scale=0.0), "galore scale must be > 0"),
    (dict(galore_scale=float("nan")), "galore scale must be > 0"),
    (dict(weight_decay=-1.0), "weight decay"),
    (dict(seqlen=4), "at least 8"),
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
