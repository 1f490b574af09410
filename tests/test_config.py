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
                                      "0.01", "--grad_accum", "2", "--gradient-checkpointing", "--loss-chunk", "512"])
    assert from_namespace(FinetuneConfig, args) == FinetuneConfig(mode="lora", lora_rank=3, lr=0.01, grad_accum=2,
                                                                  activation_checkpointing=True, loss_chunk=512)
    args = build_parser().parse_args(["finetune", "M", "-o", "O", "--loss-chunk"])  # the flag alone
    assert from_namespace(FinetuneConfig, args).loss_chunk == 1024
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
