import pytest
import torch
from conftest import ARCHS, make_tiny

from welore import CompressConfig, CompressJob, WeloreError, run_compress
from welore.blockwise import Blockwise, find_blocks, perplexity_streaming
from welore.evaluate import perplexity
from welore.io import build_skeleton, load_compressed
from welore.shards import ShardReader


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_logits_equal_the_whole_model(arch, tmp_path):
    model = make_tiny(arch)
    model.save_pretrained(tmp_path)
    skeleton = build_skeleton(model.config)
    reader = ShardReader(tmp_path).name_as(skeleton)
    bw = Blockwise(skeleton, reader)
    ids = torch.randint(0, 200, (3, 9))
    hidden, extras = bw.capture(ids)
    assert len(hidden) == 3 and all(len(e) == 3 for e in extras) and len(extras) == bw.depth
    for i in range(bw.depth):
        with bw.block(i, bw.block_tensors(reader, i)) as block:
            hidden = [bw.run(block, h, extras[i][s]) for s, h in enumerate(hidden)]
    assert all(p.is_meta for p in find_blocks(bw.model)[1].parameters())  # every block dropped again
    with torch.no_grad():
        for s in range(3):
            want = model(ids[s][None], labels=ids[s][None])
            got = bw.head(hidden[s], ids[s], labels=True)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_streaming_perplexity_of_a_compressed_directory(tmp_path, model_dir, tokenizer):
    out = tmp_path / "c"
    run_compress(model_dir, CompressConfig(ratio=0.4, min_ratio=0.0),
                 CompressJob(output=str(out), eval=False, stream=False, quiet=True))
    want = perplexity(load_compressed(out).model, tokenizer, seqlen=32, max_tokens=256, progress=False)
    got = perplexity_streaming(out, tokenizer, seqlen=32, max_tokens=256, progress=False)
    assert got.tokens == want.tokens == 256 and got.sha256 == want.sha256
    assert got.nll == pytest.approx(want.nll, rel=1e-5)


def test_a_missing_block_tensor_is_one_error(tmp_path):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path)
    reader = ShardReader(tmp_path)
    bw = Blockwise(build_skeleton(model.config), reader)
    tensors = bw.block_tensors(reader, 0)
    tensors.pop("mlp.up_proj.weight")
    with pytest.raises(WeloreError, match="no tensor model.layers.0.mlp.up_proj.weight"):
        with bw.block(0, tensors):
            pass
