"""Sequential (block-by-block) calibration: streaming gives the in-memory result, bit for bit."""

import multiprocessing

import pytest
import torch
from conftest import make_tiny, same_output

from welore import CompressConfig, CompressJob, WeloreError, run_compress
from welore.stream import compress_streaming

CALIBRATED = {
    # loss gradients (backward sweep), the loss rule's tails, whitening
    "whiten-fisher-loss": dict(method="whiten-fisher", allocation="loss", ratio=0.4),
    # the second pass flows through the blocks compressed by the first plan, each up factor refitted
    "asvd-refit-2pass": dict(method="asvd", refit=True, calib_passes=2, ratio=0.4, min_ratio=0.0),
    # plain SVD factors, calibrated rule and refit; the whitened data spectrum read by the welore rule
    "svd-loss-refit": dict(method="svd", allocation="loss", refit=True, ratio=0.4),
    "whiten-data-spectrum": dict(method="whiten", alloc_spectrum="data", ratio=0.4, min_ratio=0.0),
}


def _source(tmp_path, tokenizer, arch="llama", dtype=torch.float32):
    src = tmp_path / "src"
    make_tiny(arch).to(dtype).save_pretrained(src, max_shard_size="100KB")
    tokenizer.save_pretrained(src)
    return src


@pytest.mark.parametrize("name", list(CALIBRATED))
def test_sequential_calibration_equals_in_memory(name, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer)
    cfg = CompressConfig(calib_samples=4, calib_seqlen=32, **CALIBRATED[name])
    run_compress(src, cfg, CompressJob(output=str(tmp_path / "mem"), eval=False, stream=False, quiet=True))
    res = compress_streaming(src, tmp_path / "stream", cfg, progress=False)
    assert res.plan.lrcs
    same_output(tmp_path / "mem", tmp_path / "stream")
    assert not (tmp_path / ".stream.partial").exists()


@pytest.mark.parametrize(("arch", "dtype"), [("gpt2", torch.float32), ("opt", torch.float32),
                                             ("gpt_neox", torch.float32), ("llama", torch.bfloat16)])
def test_sequential_calibration_on_other_architectures_and_dtypes(arch, dtype, tmp_path, tokenizer):
    src = _source(tmp_path, tokenizer, arch, dtype)
    cfg = CompressConfig(method="whiten-fisher", allocation="loss", refit=True, calib_passes=2, ratio=0.3,
                         calib_samples=3, calib_seqlen=24)
    run_compress(src, cfg, CompressJob(output=str(tmp_path / "mem"), eval=False, stream=False, quiet=True))
    compress_streaming(src, tmp_path / "stream", cfg, progress=False)
    same_output(tmp_path / "mem", tmp_path / "stream")


def _killed_run(src, out, cfg, after):
    """A run that dies (os._exit, as under SIGKILL) after writing its `after`-th calibration file."""
    import os

    import welore.sequential as sequential

    real, count = sequential.write_shard, [0]

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        count[0] += 1
        if count[0] == after:
            os._exit(9)

    sequential.write_shard = write_then_die
    compress_streaming(src, out, cfg, progress=False)


@pytest.mark.parametrize(("method", "after"), [("whiten-fisher", 5), ("whiten-fisher", 11), ("asvd", 3)])
def test_a_killed_calibrated_run_resumes_to_the_same_bytes(method, after, tmp_path, tokenizer):
    """Killed in pass 1's backward sweep, in pass 2's forward sweep, in a forward-only sweep."""
    src = _source(tmp_path, tokenizer)
    cfg = CompressConfig(method=method, allocation="loss" if method == "whiten-fisher" else "welore",
                         calib_passes=2, ratio=0.4, calib_samples=3, calib_seqlen=24)
    compress_streaming(src, tmp_path / "whole", cfg, progress=False)
    child = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(src, tmp_path / "cut", cfg, after))
    child.start()
    child.join()
    assert child.exitcode == 9 and not (tmp_path / "cut").exists()
    assert (tmp_path / ".cut.partial" / f"pass{1 if after < 8 else 2}").is_dir()
    if method == "asvd":  # block 0 was finished (its spill, then its outputs): a resume skips it
        assert (tmp_path / ".cut.partial" / "pass1" / "spill" / "0.safetensors").is_file()
    compress_streaming(src, tmp_path / "cut", cfg, resume=True, progress=False)
    same_output(tmp_path / "whole", tmp_path / "cut")


def test_calibrated_streaming_refuses_what_it_cannot_do(tmp_path, tokenizer):
    src = tmp_path / "src"
    make_tiny("llama").save_pretrained(src)  # no tokenizer
    with pytest.raises(WeloreError, match="tokenizer"):
        compress_streaming(src, tmp_path / "o", CompressConfig(method="whiten"), progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
