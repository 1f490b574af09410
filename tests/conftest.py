"""Shared fixtures: tiny random models of every supported architecture, a tiny real tokenizer,
and a model with planted exactly-low-rank matrices."""

from __future__ import annotations

import os

# no model hub is reachable here: a name that is not a local path fails at once instead of after a
# minute of retries. Set before transformers is imported: huggingface_hub reads it at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
# the shared data: WELORE_DATA where set (as welore itself reads it), else ../shared/data
DATA = Path(os.environ.setdefault("WELORE_DATA", str(ROOT.parent / "shared" / "data")))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 256
# hidden 32, 2 blocks; small enough for milliseconds, big enough for non-trivial spectra
TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=1024),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=1024),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=1024),
}
ARCHS = list(TINY)
# linear targets per block (the module-type + in-block rule, not names): llama-likes 7, gpt2 4
# (c_attn, c_proj, c_fc, mlp.c_proj), opt 6 (q,k,v,out,fc1,fc2), gpt_neox 4 (qkv, dense, h_to_4h, 4h_to_h)
TARGETS_PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "gpt2": 4, "opt": 6, "gpt_neox": 4}


def make_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, vocab_size=VOCAB, **TINY[arch])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # HF initialises with std 0.02 and zero biases; random biases make the bias paths testable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """Converted GGUF models (welore.models.gguf_cache_dir) go to this session's own directory,
    removed at the end (~540 MB for the default): the first load is cold, the user's cache untouched,
    and subprocesses inherit it."""
    path = tmp_path_factory.mktemp("welore-cache")
    old = os.environ.get("WELORE_CACHE")
    os.environ["WELORE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("WELORE_CACHE", None)
    else:
        os.environ["WELORE_CACHE"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return make_tiny(arch)


@pytest.fixture
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tokenizer():
    """A 256-token byte-level BPE trained on WikiText-2 text: real tokenization, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (DATA / "text" / "wikitext2_test.raw").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    """A Hugging Face model directory (config + safetensors + tokenizer) of a tiny llama."""
    d = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


PLANTED_RANK = 3
PLANTED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture
def planted():
    """Tiny llama where two matrices are exactly rank 3 (the rest are full-rank random)."""
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in PLANTED:
            w = model.get_submodule(name).weight
            m, n = w.shape
            w.copy_(torch.randn(m, PLANTED_RANK, generator=g) @ torch.randn(PLANTED_RANK, n, generator=g) / n)
    return model


@pytest.fixture
def compressed_dir(tmp_path, tokenizer) -> Path:
    """A welore-compressed tiny llama (with tokenizer), as `welore compress` writes it."""
    from welore import apply_plan, plan_model, save_compressed

    model = make_tiny("llama")
    with torch.no_grad():  # a std-0.02 head caps the logits near 0: frozen, it could never learn
        model.get_output_embeddings().weight.mul_(20)
    plan, spectra = plan_model(model, ratio=0.5, min_ratio=0.3, progress=False)
    apply_plan(model, plan, spectra, progress=False)
    return save_compressed(model, tmp_path / "compressed", plan, tokenizer=tokenizer, base_model="tiny")


@pytest.fixture
def outlier_llama():
    """Tiny llama whose embeddings have a few large channels, like the outlier features of real LLMs."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :3] *= 30
    return model


@pytest.fixture
def stats(outlier_llama, tokenizer):
    """Calibration statistics (with loss gradients) of `outlier_llama` on 8 x 64 C4-train tokens."""
    from welore import calibration_batches, collect_stats, find_targets

    return collect_stats(outlier_llama, find_targets(outlier_llama), calibration_batches(tokenizer, 8, 64),
                         gradients=True, progress=False)


def same_output(a: Path, b: Path) -> None:
    """Two compressed directories hold the same plan, the same tensors (bit for bit), the same logits."""
    import json

    from welore import load_compressed
    from welore.shards import ShardReader

    ma, mb = json.loads((a / "welore.json").read_text()), json.loads((b / "welore.json").read_text())
    assert ma["plan"] == mb["plan"]
    ta, tb = ShardReader(a).all(), ShardReader(b).all()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    x = torch.randint(0, 100, (1, 12))
    la, lb = load_compressed(a).model(x).logits, load_compressed(b).model(x).logits
    assert torch.equal(la, lb)


def savers_train_the_same_steps(compressed_dir: Path, tmp_path: Path, base: dict, atol: float,
                                after_run=lambda name: None) -> None:
    """`welore finetune` with `base` settings, without and then with both memory savers (checkpointing,
    --loss-chunk 7): the same losses (rel 1e-5) and weights (rtol 1e-4, `atol`), and the runs trained.
    `after_run(name)` is called after each run ("own", "saved"), for the caller's own checks."""
    from safetensors.torch import load_file

    from welore.finetune_config import FinetuneConfig
    from welore.train import finetune

    runs = {}
    for name, how in (("own", {}), ("saved", dict(activation_checkpointing=True, loss_chunk=7))):
        res = finetune(compressed_dir, tmp_path / name, FinetuneConfig(**base, **how), progress=False)
        runs[name] = ([e["loss"] for e in res.log], load_file(str(tmp_path / name / "model.safetensors")))
        after_run(name)
    assert runs["saved"][0] == pytest.approx(runs["own"][0], rel=1e-5)
    for k, w in runs["own"][1].items():
        torch.testing.assert_close(runs["saved"][1][k], w, rtol=1e-4, atol=atol, msg=k)
    start = load_file(str(compressed_dir / "model.safetensors"))
    assert any(not torch.equal(w, start[k]) for k, w in runs["own"][1].items())  # the runs trained


def synthetic_costs(shapes, multiple: int = 4):
    """A welore.costs.CostModel with no timing: dense m*n; factors k(m+n) plus a fixed 0.3 mn in decoding
    (two small products cost more than their parameters), so a factorisation pays below about
    0.7 mn / (m+n) and the allocation must hold some matrices back."""
    from welore.costs import CostModel, key

    table = {}
    for m, n in {tuple(s) for s in shapes}:
        ranks = list(range(1, min(m, n) + 1))
        table[key(m, n)] = {"ranks": ranks,
                            "decode": {"dense": float(m * n), "factored": [k * (m + n) + 0.3 * m * n for k in ranks]},
                            "prefill": {"dense": float(m * n), "factored": [float(k * (m + n)) for k in ranks]}}
    return CostModel("synthetic", multiple, table)


@pytest.fixture
def fake_costs(monkeypatch):
    """`--speed` without timing: welore.costs.for_shapes answers with synthetic_costs."""
    def for_shapes(shapes, device, dtype, **kwargs):
        return synthetic_costs(shapes)
    monkeypatch.setattr("welore.costs.for_shapes", for_shapes)
    monkeypatch.setattr("welore.stream.for_shapes", for_shapes)
    return for_shapes
