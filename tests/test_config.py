from dataclasses import fields

import pytest

from welore.cli import build_parser
from welore.config import CompressConfig, from_namespace
from welore.finetune_config import FinetuneConfig


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
