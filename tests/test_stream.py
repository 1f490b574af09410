import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, same_output

from welore import CompressConfig, CompressJob, WeloreError, load_compressed, run_compress
from welore.cli import main
from welore.shards import INDEX, ShardReader
from welore.stream import compress_streaming


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_in_memory(arch, dtype, tmp_path, tokenizer):
    src = tmp_path / "src"
    make_tiny(arch).to(dtype).save_pretrained(src, max_shard_size="100KB")  # several input shards
    cfg = CompressConfig(ratio=0.4, min_ratio=0.0)
    run_compress(src, cfg, CompressJob(output=str(tmp_path / "mem"), eval=False, stream=False, quiet=True))
    res = compress_streaming(src, tmp_path / "stream", cfg, progress=False)
    assert (tmp_path / "stream" / INDEX).is_file() and res.metrics["shards"] == res.metrics["blocks"] + 1
    assert res.plan.lrcs and res.metrics["peak_memory_gib"] > 0
    same_output(tmp_path / "mem", tmp_path / "stream")
    assert not (tmp_path / ".stream.partial").exists()


def _killed_run(src, out, cfg):
    """A run that dies (os._exit, as under SIGKILL) after writing its third file."""
    import os

    import welore.stream as stream

    real, count = stream.write_shard, [0]

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == 3:
            os._exit(9)

    stream.write_shard = write_then_die
    compress_streaming(src, out, cfg, progress=False)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, tokenizer):
    src = tmp_path / "src"
    make_tiny("llama").save_pretrained(src)
    cfg = CompressConfig(ratio=0.5, min_ratio=0.0)
    compress_streaming(src, tmp_path / "whole", cfg, progress=False)
    child = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(src, tmp_path / "cut", cfg))
    child.start()
    child.join()
    assert child.exitcode == 9 and not (tmp_path / "cut").exists()
    partial = tmp_path / ".cut.partial"
    # both blocks' spectra and the first output shard were finished when it died
    assert len(list((partial / "spill").glob("*.safetensors"))) == 2 and len(list(partial.glob("model-*"))) == 1
    with pytest.raises(WeloreError, match="unfinished job"):
        compress_streaming(src, tmp_path / "cut", cfg, progress=False)
    with pytest.raises(WeloreError, match="another job"):
        compress_streaming(src, tmp_path / "cut", CompressConfig(ratio=0.3), resume=True, progress=False)
    compress_streaming(src, tmp_path / "cut", cfg, resume=True, progress=False)
    for name in ShardReader(tmp_path / "whole").files():
        assert (tmp_path / "cut" / name.name).read_bytes() == name.read_bytes()


def test_streaming_refuses_what_it_cannot_do(tmp_path, model_dir):
    with pytest.raises(WeloreError, match="nothing to resume"):
        compress_streaming(model_dir, tmp_path / "o", CompressConfig(), resume=True, progress=False)
    with pytest.raises(WeloreError, match="no safetensors weights"):
        compress_streaming(tmp_path, tmp_path / "o", CompressConfig(), progress=False)


def test_a_streamed_output_fine_tunes_like_any_other(model_dir, tmp_path):
    from welore import FinetuneConfig, finetune

    compress_streaming(model_dir, tmp_path / "s", CompressConfig(ratio=0.4), progress=False)
    cfg = FinetuneConfig(steps=2, seqlen=32, batch_size=2, eval_tokens=64, save_every=0, warmup=0)
    res = finetune(tmp_path / "s", tmp_path / "ft", cfg, progress=False)
    assert res.log[-1]["loss"] > 0
    assert load_compressed(tmp_path / "ft").plan.to_dict() == load_compressed(tmp_path / "s").plan.to_dict()


CALIBRATED = ["--method", "whiten-fisher", "--allocation", "loss", "--calib-passes", "2", "--calib-samples", "3",
              "--calib-seqlen", "24"]


# welore's CLI with every process but the first lagging 0.2 s behind each barrier: a process that
# acts on a file before a slower one has checked or read it fails every time, not one CI run in ten
LAGGING_CLI = """
import sys, time
from accelerate import PartialState
barrier = PartialState.wait_for_everyone
def lagging(self):
    barrier(self)
    time.sleep(0.2 * self.process_index)
PartialState.wait_for_everyone = lagging
import os
if os.environ.get("WELORE_SYNTHETIC_COSTS"):  # --speed untimed, each process with other costs: only a handoff agrees
    sys.path.insert(0, os.environ["WELORE_SYNTHETIC_COSTS"])
    from conftest import synthetic_costs
    import welore.stream
    rank = int(os.environ["RANK"])
    welore.stream.for_shapes = lambda shapes, *a, **k: synthetic_costs(shapes, multiple=4 * (1 + rank))
from welore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("calibration", [[], CALIBRATED, ["--speed"]], ids=["svd", "calibrated", "speed"])
def test_two_processes_write_thesame_output(tmp_path, model_dir, calibration, request):
    """Work split over 2 CPU processes (gloo, launched by accelerate's torchrun launcher, one thread
    each) gives the bytes one process with one thread gives: LAPACK's rounding depends on the thread
    count, not on how the work is shared out. Plain SVD splits the blocks; calibration (two passes,
    with gradients) splits each block's targets; with --speed process 0's cost model is every
    process' (here each would time other costs). The second process lags behind every barrier."""
    import os
    import subprocess
    import sys

    args = ["compress", str(model_dir), "--stream", "--ratio", "0.4", *calibration, "-q", "-o"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if "--speed" in calibration:
        request.getfixturevalue("fake_costs")  # the reference: process 0's costs
        env["WELORE_SYNTHETIC_COSTS"] = str(Path(__file__).parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference in this process, with the one thread each of the two has
    try:
        assert main([*args, str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "lagging.py").write_text(LAGGING_CLI)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "lagging.py"),
              *args, str(tmp_path / "two")]
    two = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    # the launcher's own traceback buries the failing process': show that one's lines first
    failing = "\n".join(line for line in two.stderr.splitlines() if "[rank1]" in line or "Error" in line)
    assert two.returncode == 0, failing[-4000:] + "\n...\n" + two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "stream.json").read_text())["processes"] == 2
    for f in ShardReader(tmp_path / "one").files():
        assert (tmp_path / "two" / f.name).read_bytes() == f.read_bytes()
    assert (json.loads((tmp_path / "two" / "welore.json").read_text())["plan"]
            == json.loads((tmp_path / "one" / "welore.json").read_text())["plan"])


def test_plain_transformers_loads_a_streamed_output(tmp_path, model_dir):
    """The sharded output loads with stock from_pretrained (index + modeling_welore.py), no welore."""
    import os
    import subprocess
    import sys

    from test_io import BLOCK_WELORE, _logits

    out = tmp_path / "s"
    compress_streaming(model_dir, out, CompressConfig(ratio=0.4), progress=False)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BLOCK_WELORE, str(out), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(load_compressed(out, device="cpu").model))
