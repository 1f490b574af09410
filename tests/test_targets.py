import pytest
import torch
from conftest import TARGETS_PER_BLOCK, make_tiny

from welore import WeloreError, find_targets
from welore.targets import weight_matrix


def test_every_architecture_has_its_block_linears(arch, tiny):
    targets = find_targets(tiny)
    assert len(targets) == 2 * TARGETS_PER_BLOCK[arch]
    assert {t.layer for t in targets} == {0, 1}
    for t in targets:
        assert weight_matrix(tiny.get_submodule(t.name)).shape == t.shape


def test_head_and_embeddings_excluded(arch, tiny):
    names = [t.name for t in find_targets(tiny)]
    head = tiny.get_output_embeddings()
    head_names = [n for n, m in tiny.named_modules() if m is head]
    assert not set(names) & set(head_names)
    assert not any("embed" in n or n.endswith("wte") for n in names)


def test_gpt2_conv1d_is_read_transposed():
    model = make_tiny("gpt2")
    t = next(t for t in find_targets(model) if t.name.endswith("attn.c_attn"))
    assert t.kind == "conv1d"
    assert t.shape == (96, 32)  # (out = 3 * hidden, in = hidden); Conv1D stores (in, out)
    m = model.get_submodule(t.name)
    x = torch.randn(5, 32)
    assert torch.allclose(m(x), x @ weight_matrix(m).T + m.bias, atol=1e-6)


def test_regex_targets_and_ignore(llama):
    only_attn = find_targets(llama, targets=[r"self_attn\.(q|k|v)_proj"])
    assert len(only_attn) == 6
    no_mlp = find_targets(llama, ignore=[r"\.mlp\."])
    assert len(no_mlp) == 8 and all(".mlp." not in t.name for t in no_mlp)
    # an explicit regex can reach outside the blocks, e.g. the head
    assert [t.name for t in find_targets(llama, targets=[r"^lm_head$"])] == ["lm_head"]


def test_type_and_layer(llama):
    t = find_targets(llama)[0]
    assert (t.layer, t.type) == (0, "self_attn.q_proj")


def test_no_targets_is_a_clear_error(llama):
    with pytest.raises(WeloreError, match="no linear target"):
        find_targets(llama, targets=["does-not-exist"])
    with pytest.raises(WeloreError, match="no linear target"):
        find_targets(torch.nn.Sequential(torch.nn.ReLU()))


def test_bad_regex(llama):
    with pytest.raises(WeloreError, match="bad targets regex"):
        find_targets(llama, targets=["("])
