"""welore.costs: the measured cost model, and the allocation that uses it (no LRC slower than its
dense matrix, ranks on the device's fast multiple, a latency target)."""

import json

import numpy as np
import pytest
import torch
from conftest import synthetic_costs
from test_allocate import synthetic_spectra

from welore import CompressConfig, RankPlan, WeloreError, allocate, load_compressed
from welore import costs as costs_mod
from welore.cli import main
from welore.costs import CostModel, for_shapes, monotone
from welore.jobs import CompressJob
from welore.pipeline import run_compress

SHAPES = [(96, 64), (64, 64), (160, 48)]


def test_monotone_is_the_closest_non_decreasing_fit():
    assert monotone([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert monotone([5, 1, 1, 1]) == [2, 2, 2, 2]
    assert monotone([1, 2, 3]) == [1, 2, 3]


def test_rounding_is_monotone_and_on_the_multiple():
    c = CostModel("x", 8, {})
    got = [c.round(k, 100) for k in range(1, 101)]
    assert got == sorted(got)  # rules stay monotone, budgets still nest
    assert all(r % 8 == 0 or r == 100 for r in got) and got[0] == 8 and got[-1] == 100
    assert c.round(101, 102) == 102  # rounded up past the full rank: no reduction left
    assert [CostModel("x", 1, {}).round(k, 50) for k in (1, 7, 50)] == [1, 7, 50]


def test_allocation_never_makes_a_slower_factorisation():
    spectra = synthetic_spectra(shapes=SHAPES)
    costs = synthetic_costs(SHAPES)
    plain = allocate(spectra, ratio=0.3, target="params", min_ratio=0.0)
    fast = allocate(spectra, ratio=0.3, target="params", min_ratio=0.0, costs=costs)
    slow = [m for m in plain.lrcs if not costs.pays(m.out_features, m.in_features, m.alloc_rank)]
    assert slow  # without the cost model some LRCs are slower than their matrices; with it, none
    assert all(costs.pays(m.out_features, m.in_features, m.alloc_rank) for m in fast.lrcs)
    assert all(m.alloc_rank % 4 == 0 for m in fast.lrcs)
    assert abs(fast.param_reduction - 0.3) < 0.05  # and the target is still hit
    assert fast.speed["decode"]["plan_s"] < fast.speed["decode"]["dense_s"]
    assert RankPlan.from_dict(json.loads(json.dumps(fast.to_dict()))).speed == fast.speed
    assert "predicted decode / prefill time" in fast.summary()


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_latency_target_is_hit(ratio):
    spectra = synthetic_spectra(shapes=SHAPES)
    costs = synthetic_costs(SHAPES)
    plan = allocate(spectra, ratio=ratio, target="latency", min_ratio=0.0, costs=costs)
    assert abs(costs.latency_reduction(plan) - ratio) < 0.03
    assert plan.target == {"kind": "latency", "ratio": ratio}
    levels = [allocate(spectra, ratio=r, target="latency", min_ratio=0.0, costs=costs).level for r in (0.1, 0.2, 0.3)]
    assert levels == sorted(levels)


def test_bad_latency_targets_say_why():
    spectra = synthetic_spectra(shapes=SHAPES)
    with pytest.raises(WeloreError, match="beyond this device: at most"):
        allocate(spectra, ratio=0.9, target="latency", min_ratio=0.0, costs=synthetic_costs(SHAPES))
    with pytest.raises(WeloreError, match="needs a cost model"):
        allocate(spectra, ratio=0.2, target="latency")
    with pytest.raises(WeloreError, match="does not apply with --bits"):
        CompressConfig(target="latency", ratio=0.2, bits_per_weight=3.0)


def test_measured_once_per_device_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WELORE_CACHE", str(tmp_path))
    monkeypatch.setattr(costs_mod, "_MEMO", {})
    c = for_shapes([(48, 32)], torch.device("cpu"), torch.float32, progress=False)
    s = c.shapes["48x32"]
    assert c.multiple in (1, *costs_mod.MULTIPLES) and "threads" in c.device
    for regime in costs_mod.REGIMES:
        assert s[regime]["dense"] > 0 and np.all(np.diff(s[regime]["factored"]) >= 0)
    assert s["ranks"][-1] == -(-48 * 32 // 80)  # up to the parameter break-even rank, no further
    monkeypatch.setattr(costs_mod, "_MEMO", {})
    monkeypatch.setattr(costs_mod, "_measure_shape", lambda *a: pytest.fail("measured again"))
    assert for_shapes([(48, 32)], torch.device("cpu"), torch.float32, progress=False) == c
    with pytest.raises(WeloreError, match="no 7 x 7 matrix"):
        c.dense(7, 7)


def test_speed_through_compress_load_and_elastic(model_dir, tmp_path, fake_costs):
    job = dict(eval=False, quiet=True)
    run_compress(str(model_dir), CompressConfig(ratio=0.3, target="latency", min_ratio=0.0),
                 CompressJob(output=str(tmp_path / "l30"), **job))
    meta = json.loads((tmp_path / "l30" / "welore.json").read_text())
    speed = meta["plan"]["speed"]
    assert meta["settings"]["speed"] and meta["plan"]["target"]["kind"] == "latency"
    assert meta["settings"]["stream"]  # a safetensors directory streams: the cost model reaches that path too
    assert not (tmp_path / "l30" / "costs.json").exists()  # the processes' handoff is not left in the output
    assert abs(1 - speed["decode"]["plan_s"] / speed["decode"]["dense_s"] - 0.3) < 0.05
    assert load_compressed(tmp_path / "l30", device="cpu").plan.speed == speed
    # budgets nest under the cost model too: each sliced budget is its separate run
    run_compress(str(model_dir), CompressConfig(budgets=["0.2", "0.4"], target="params", speed=True),
                 CompressJob(output=str(tmp_path / "elastic"), **job))
    for b in (0.2, 0.4):
        run_compress(str(model_dir), CompressConfig(ratio=b, target="params", speed=True),
                     CompressJob(output=str(tmp_path / f"p{b}"), **job))
        sliced = load_compressed(tmp_path / "elastic", device="cpu", budget=b)
        assert sliced.plan.lrcs and sliced.plan.speed
        got = sliced.model.state_dict()
        want = load_compressed(tmp_path / f"p{b}", device="cpu").model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_unreachable_latency_is_one_line_and_writes_nothing(model_dir, tmp_path, fake_costs, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(model_dir), "-o", str(out), "--target", "latency", "--ratio", "0.95",
                 "--no-eval", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "beyond this device" in err and len(err.splitlines()) == 1 and not out.exists()
