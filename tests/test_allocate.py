import json

import numpy as np
import pytest
import torch
from conftest import PLANTED, PLANTED_RANK

from welore import RankPlan, Spectra, WeloreError, allocate, analyze, normalized_spectrum
from welore.targets import Target


def synthetic_spectra(n_mats=12, seed=0, shapes=None) -> Spectra:
    """Heavy-tailed random spectra of varied shapes (no model needed)."""
    rng = np.random.default_rng(seed)
    targets, values = [], {}
    for i in range(n_mats):
        if shapes:
            m, n = shapes[i % len(shapes)]
        else:
            m, n = rng.choice([48, 64, 96, 160]), rng.choice([48, 64, 128])
        k = min(m, n)
        s = np.sort(rng.pareto(rng.uniform(0.5, 3.0), k) + rng.uniform(0, 0.1, k))[::-1].copy()
        t = Target(f"layers.{i}.proj", "linear", int(m), int(n))
        targets.append(t)
        values[t.name] = torch.tensor(s, dtype=torch.float32)
    return Spectra(targets, values, {t.name: "x" for t in targets})


def test_normalised_spectrum():
    s = normalized_spectrum([4.0, 2.0, 1.0])
    assert np.allclose(s, [1.0, 1 / 3, 0.0])
    assert np.allclose(normalized_spectrum([2.0, 2.0]), [1.0, 1.0])  # flat: nothing is low


def test_planted_low_rank_matrices_are_found(planted):
    spectra = analyze(planted, progress=False)
    plan = allocate(spectra, threshold=1e-3, min_ratio=0.5)
    for m in plan.matrices:
        if m.name in PLANTED:
            assert m.alloc_rank == PLANTED_RANK and m.lrc
        else:  # random full-rank matrices: only their very smallest values fall under 1e-3
            assert m.alloc_rank >= m.full_rank - 2 and not m.lrc
    # and a searched target equal to exactly the planted null spaces picks the same plan
    dropped = sum(m.full_rank - PLANTED_RANK for m in plan.matrices if m.name in PLANTED)
    total = sum(m.full_rank for m in plan.matrices)
    searched = allocate(spectra, ratio=dropped / total, min_ratio=0.5)
    assert [m.name for m in searched.lrcs] == list(PLANTED)
    assert all(m.alloc_rank == PLANTED_RANK for m in searched.lrcs)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7, 0.9])
def test_bisection_hits_rank_target_within_one_rank_per_matrix(ratio):
    # tall matrices: every truncation saves parameters, so the LRC rule never holds a matrix back
    spectra = synthetic_spectra(shapes=[(4096, 32), (2048, 48), (3000, 40)])
    plan = allocate(spectra, ratio=ratio, min_ratio=0.0)
    total = sum(m.full_rank for m in plan.matrices)
    dropped = sum(m.full_rank - m.kept_rank for m in plan.matrices)
    assert abs(dropped - ratio * total) <= len(plan.matrices)
    assert plan.target == {"kind": "rank", "ratio": ratio}


@pytest.mark.parametrize("min_ratio", [0.0, 0.5])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_bisection_finds_the_closest_achievable_reduction(ratio, min_ratio):
    # with the LRC rule (min_ratio, parameter saving) a matrix joins in jumps; the search must still
    # land on the best threshold there is: compare with trying every candidate threshold
    spectra = synthetic_spectra()
    plan = allocate(spectra, ratio=ratio, min_ratio=min_ratio)
    every = np.unique(np.concatenate([normalized_spectrum(v.numpy()) for v in spectra.values.values()]))
    best = min(abs(allocate(spectra, threshold=float(t), min_ratio=min_ratio).effective_rank_reduction - ratio)
               for t in every)
    assert abs(plan.effective_rank_reduction - ratio) <= best + 1e-12


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_bisection_hits_parameter_target(ratio):
    spectra = synthetic_spectra()
    plan = allocate(spectra, ratio=ratio, target="params", min_ratio=0.0)
    # one rank step of the largest matrix is the finest resolution the parameter count has
    step = max(m.out_features + m.in_features for m in plan.matrices) / plan.params_before
    assert abs(plan.param_reduction - ratio) <= step * len(plan.matrices)


def test_uniform_gives_every_matrix_the_same_ratio():
    spectra = synthetic_spectra()
    plan = allocate(spectra, ratio=0.6, allocation="uniform")
    ratios = [m.reduction for m in plan.matrices]
    assert max(ratios) - min(ratios) <= 1 / min(m.full_rank for m in plan.matrices) + 1e-9
    assert abs(plan.effective_rank_reduction - 0.6) < 0.05


def test_uniform_search_finds_the_closest_achievable_reduction():
    spectra = synthetic_spectra()
    plan = allocate(spectra, ratio=0.45, allocation="uniform")
    best = min(abs(allocate(spectra, ratio=float(r), allocation="uniform").effective_rank_reduction - 0.45)
               for r in np.linspace(0.01, 0.99, 491))
    assert abs(plan.effective_rank_reduction - 0.45) <= best + 1e-12


def test_welore_is_non_uniform_and_monotone_in_threshold():
    spectra = synthetic_spectra()
    plan = allocate(spectra, threshold=0.05, min_ratio=0.0)
    assert len({round(m.reduction, 2) for m in plan.matrices}) > 3
    reductions = [allocate(spectra, threshold=t, min_ratio=0.0).effective_rank_reduction
                  for t in np.linspace(0, 1, 21)]
    assert all(a <= b for a, b in zip(reductions, reductions[1:]))


def test_lrc_rule(llama):
    spectra = analyze(llama, progress=False)
    for min_ratio in (0.0, 0.5):
        plan = allocate(spectra, ratio=0.5, min_ratio=min_ratio)
        for m in plan.matrices:
            saves = m.alloc_rank * (m.out_features + m.in_features) < m.out_features * m.in_features
            assert m.lrc == (saves and m.reduction > min_ratio)
            assert m.kept_rank == (m.alloc_rank if m.lrc else m.full_rank)
        assert plan.params_after < plan.params_before


def test_json_round_trip(tmp_path):
    plan = allocate(synthetic_spectra(), ratio=0.4)
    plan.save(tmp_path / "plan.json")
    back = RankPlan.load(tmp_path / "plan.json")
    assert back.to_dict() == plan.to_dict()
    json.dumps(plan.to_dict())  # serialisable


def test_corrupt_plan_is_refused(tmp_path):
    d = allocate(synthetic_spectra(), ratio=0.4).to_dict()
    d["matrices"][0]["alloc_rank"] = d["matrices"][0]["full_rank"] + 5
    with pytest.raises(WeloreError, match="impossible ranks"):
        RankPlan.from_dict(d)
    with pytest.raises(WeloreError, match="invalid rank plan"):
        RankPlan.from_dict({"format": "welore-plan/1"})
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(WeloreError, match="cannot read rank plan"):
        RankPlan.load(tmp_path / "p.json")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=0.0), "ratio must be in"),
    (dict(ratio=1.0), "ratio must be in"),
    (dict(ratio=float("nan")), "ratio must be in"),
    (dict(threshold=1.5), "threshold must be in"),
    (dict(threshold=-0.1), "threshold must be in"),
    (dict(min_ratio=1.0), "min_ratio"),
    (dict(target="flops"), "unknown target"),
    (dict(allocation="magic"), "unknown allocation"),
    (dict(allocation="uniform", threshold=0.3), "welore allocation only"),
    (dict(allocation="loss"), "needs loss estimates"),  # spectra without calibrated tails
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(WeloreError, match=message):
        allocate(synthetic_spectra(), **kwargs)


def _with_tails(spectra: Spectra, weights: dict[str, float]) -> Spectra:
    """Loss tails = weight x (sum of the dropped squared singular values), as for whitened factors."""
    for t in spectra.targets:
        s2 = spectra.values[t.name].double().numpy() ** 2
        kept = np.concatenate([[0.0], np.cumsum(s2)])
        spectra.tails[t.name] = (s2.sum() - kept)[: min(t.shape) // 2 + 1] * weights.get(t.name, 1.0)
    return spectra


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_loss_allocation_hits_parameter_target(ratio):
    plan = allocate(_with_tails(synthetic_spectra(20), {}), ratio=ratio, target="params", allocation="loss",
                    min_ratio=0.0)
    assert plan.allocation == "loss" and abs(plan.param_reduction - ratio) < 0.03
    assert len({1 - m.kept_rank / m.full_rank for m in plan.lrcs}) > 3  # non-uniform


def test_loss_allocation_spares_the_sensitive_matrices():
    """Identical spectra, but half the matrices are 1000x more sensitive: the budget is taken from the others."""
    spectra = synthetic_spectra(8, shapes=[(64, 64)])
    for t in spectra.targets:
        spectra.values[t.name] = spectra.values[spectra.targets[0].name]
    sensitive = {t.name: 1000.0 for t in spectra.targets[::2]}
    plan = allocate(_with_tails(spectra, sensitive), ratio=0.2, target="params", allocation="loss", min_ratio=0.0)
    cut = [m.full_rank - m.kept_rank for m in plan.matrices]
    assert all(c == 0 for c in cut[::2]) and all(c > 0 for c in cut[1::2])


def test_loss_allocation_is_monotone_in_price():
    rule_spectra = _with_tails(synthetic_spectra(12), {})
    plans = [allocate(rule_spectra, ratio=r, target="params", allocation="loss", min_ratio=0.0)
             for r in (0.1, 0.2, 0.4)]
    assert plans[0].level <= plans[1].level <= plans[2].level
    for a, b in zip(plans, plans[1:]):
        assert all(mb.kept_rank <= ma.kept_rank for ma, mb in zip(a.matrices, b.matrices))


def test_a_registered_rule_runs_through_welore_compress(model_dir, tmp_path, capsys):
    import json

    import numpy as np

    from welore.allocate import RULES, Rule, register
    from welore.cli import main

    class FirstHalfOnly(Rule):
        """Toy rule: only the first half of the targets lose rank, all by the same fraction."""

        label = "first-half"

        def __init__(self, spectra):
            super().__init__(spectra)
            self.candidates = np.linspace(0, 1, 101)

        def kept(self, level):
            half = np.arange(len(self.full)) < len(self.full) // 2
            return np.maximum(self.full - np.where(half, np.floor(level * self.full), 0).astype(int), 1)

    register("first-half", FirstHalfOnly)
    try:
        out = tmp_path / "fh"
        assert main(["compress", str(model_dir), "--allocation", "first-half", "--ratio", "0.3", "--min-ratio",
                     "0", "-o", str(out), "--no-eval", "-q"]) == 0
        plan = RankPlan.from_dict(json.loads((out / "welore.json").read_text())["plan"])
        half = len(plan.matrices) // 2
        assert plan.allocation == "first-half" and plan.lrcs
        assert all(not m.lrc for m in plan.matrices[half:])  # the rule, not another, decided
        assert "level" in plan.summary()
    finally:
        RULES.pop("first-half")
