"""welore.jobs: every flag group's bad input is one line and exit 2 through the CLI's dataclass
parsing, before any model loads; the dataclasses validate the same when built from Python."""

import pytest
import torch
from safetensors.torch import save_file

from welore import WeloreError
from welore.cli import build_parser, main
from welore.jobs import CompareJob, CompressJob, EvaluateJob, FinetuneJob, GenerateJob, GradientsConfig


def _one_line(capsys, argv, needle):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("welore: error:") and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, needle", [
    # CompressJob
    (["compress", "--eval-tokens", "0"], "eval tokens must be > 0"),
    (["compress", "--seqlen", "-4"], "seqlen must be > 0"),
    (["compress", "--recipe-samples", "0"], "recipe samples must be > 0"),
    (["compress", "--new-tokens", "-1"], "new tokens must be >= 0"),
    (["compress", "--recover", "3", "--stream"], "--recover trains in memory"),
    (["compress", "--resume", "--no-stream"], "drop --no-stream"),
    # CompressConfig (through the same parser)
    (["compress", "--method", "whiten", "--calib-samples", "0"], "needs calibration data"),
    # Loading (--dtype) and Runtime (--device): checked where the model loads, still one line
    (["compress", "--dtype", "float7", "--no-eval"], "dtype"),
    (["generate", "default", "hi", "--device", "tpu"], "device"),
    # AnalyzeConfig and Selection
    (["analyze", "--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["analyze", "--min-ratio", "-1"], "min_ratio"),
    # EvaluateJob
    (["evaluate", "--seqlen", "0"], "seqlen must be > 0"),
    (["evaluate", "--max-tokens", "0"], "max tokens must be > 0"),
    # GenerateJob
    (["generate", "default", "hi", "--max-new-tokens", "0"], "max new tokens must be > 0"),
    (["generate", "default", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    # GradientsConfig
    (["gradients", "--steps", "0"], "steps must be > 0"),
    (["gradients", "--rank", "9", "--top-k", "8"], "rank must be in [1, top_k=8]"),
    (["gradients", "--lr", "-1"], "learning rate must be > 0"),
    # FinetuneJob / CompareJob (Output)
    (["finetune", "DIR"], "name the output directory with -o OUTPUT"),
    (["compare", "DIR", "-o", "O", "--mode-lr", "full"], "expected MODE=LR"),
])
def test_bad_flags_are_one_line(capsys, tmp_path, args, needle):
    args = [str(tmp_path / "dir") if a == "DIR" else str(tmp_path / "o") if a == "O" else a for a in args]
    out = [] if args[0] in ("generate", "evaluate", "finetune", "compare") else ["-o", str(tmp_path / "out")]
    _one_line(capsys, [*args, *out, "-q"], needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_directory_that_is_neither_streamable_nor_loadable(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(capsys, ["compress", str(empty), "-o", str(tmp_path / "a"), "-q"], "not a model directory")
    weights = tmp_path / "weights-only"  # safetensors but no config.json: the streamed path refuses it
    weights.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(weights / "model.safetensors"))
    _one_line(capsys, ["compress", str(weights), "-o", str(tmp_path / "b"), "-q"], "config.json")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_dataclasses_check_themselves():
    for make in (lambda: CompressJob(eval_tokens=100, seqlen=512), lambda: EvaluateJob(batch_size=0),
                 lambda: GenerateJob(max_new_tokens=0), lambda: GradientsConfig(every=50),
                 lambda: FinetuneJob(), lambda: CompareJob(output="o", mode_lr=["full=1", "full=2"])):
        with pytest.raises(WeloreError):
            make()
    assert GradientsConfig(preset="llama-tiny").steps == 300 and GradientsConfig().lr == 1e-4
    assert CompareJob(output="o", mode_lr=["full=5e-5"]).lrs == {"full": 5e-5}


def test_flags_come_from_dataclasses():
    """cli.py declares only the positional arguments and two flags that are not fields (--param-ratio,
    --no-stream) by hand: every other flag is a dataclass field, declared once."""
    import inspect

    import welore.cli

    assert inspect.getsource(welore.cli).count(".add_argument(") <= 15
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"--device", "-q", "--dtype", "-o", "--overwrite", "--targets"} <= {
        s for a in sub.choices["analyze"]._actions for s in a.option_strings}
