"""The factorisation registry: a new method is one class plus one registration, and the CLI takes it."""

import json

import pytest
import torch

from welore import load_compressed
from welore.cli import main
from welore.factorize import METHODS, Factorizer, analyze_data_aware, get_method, register


class RowNormWeighted(Factorizer):
    """A toy data-free method: weight each output row by its norm before the SVD (D = row norms)."""

    needs_stats = False

    def output_weights(self, st):
        return self.norms

    def decompose(self, w, st, rank):
        self.norms = w.double().norm(dim=1).clamp_min(1e-12)
        return super().decompose(w, st, rank)


@pytest.fixture
def toy():
    register("toy", RowNormWeighted())
    yield "toy"
    METHODS.pop("toy")


def test_a_registered_method_runs_through_welore_compress(toy, model_dir, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["compress", str(model_dir), "--method", toy, "--param-ratio", "0.3", "--min-ratio", "0",
                 "-o", str(out), "--no-eval", "-q"]) == 0
    meta = json.loads((out / "welore.json").read_text())
    assert meta["settings"]["method"] == "toy" and meta["plan"]["totals"]["lrc_count"] > 0
    loaded = load_compressed(out)
    assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]])).logits).all()


def test_the_toy_factors_are_its_own_and_exact_at_full_rank(toy, llama):
    from welore import find_targets
    from welore.targets import weight_matrix

    t = find_targets(llama)[0]
    sp = analyze_data_aware(llama, [t], {}, toy, progress=False)
    plain = analyze_data_aware(llama, [t], {}, "svd", progress=False)
    assert not torch.allclose(sp.values[t.name], plain.values[t.name])  # a different spectrum
    w = weight_matrix(llama.get_submodule(t.name)).detach().double()
    U, s, Vh, _ = get_method(toy).decompose(w, None, min(w.shape))
    assert torch.allclose((U * s) @ Vh, w, atol=1e-10)


def test_unknown_method_is_a_clean_error(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit):  # argparse's choices come from the registry
        main(["compress", str(model_dir), "--method", "toy", "-o", str(tmp_path / "x")])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_registry_refuses_what_is_not_a_factorizer():
    with pytest.raises(TypeError):
        register("bad", object())
