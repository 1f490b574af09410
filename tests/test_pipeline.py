import json

import pytest

from welore import AnalyzeConfig, CompressConfig, CompressJob, load_compressed, run_analyze, run_compress
from welore.allocate.plan import MatrixPlan, RankPlan
from welore.pipeline import CompressResult


def compress_dir(src, out, job: dict | None = None, **cfg):
    """run_compress on `src` in memory, quietly, with CompressConfig(**cfg) and CompressJob(**job)."""
    return run_compress(src, CompressConfig(**cfg), CompressJob(output=str(out), quiet=True, stream=False,
                                                               **(job or {})))


def test_run_compress_rows_and_self_description(model_dir, tmp_path):
    res = compress_dir(model_dir, tmp_path / "c", dict(eval_tokens=256, seqlen=64, recipe=False), ratio=0.4,
                       min_ratio=0.0)
    assert [r["model"] for r in res.rows] == ["dense", "uniform", "WeLore"]
    meta = json.loads((tmp_path / "c" / "welore.json").read_text())
    assert meta["settings"]["method"] == "svd" and meta["settings"]["calibration"] is None
    assert meta["plan"] == res.plan.to_dict()


@pytest.mark.parametrize("method, refit", [("whiten", False), ("asvd", True), ("svd", True)])
def test_data_aware_compression(model_dir, tmp_path, method, refit):
    out = tmp_path / method
    res = compress_dir(model_dir, out, dict(compare=False, eval_tokens=128, seqlen=64), ratio=0.5, min_ratio=0.0,
                       method=method, refit=refit, calib_samples=4, calib_seqlen=64)
    settings = json.loads((out / "welore.json").read_text())["settings"]
    assert settings["method"] == method and settings["refit"] == refit
    assert settings["calibration"] == {"corpus": "c4-train", "samples": 4, "seqlen": 64, "seed": 0,
                                       "loss_gradients": False, "passes": 1}
    loaded = load_compressed(out)
    assert loaded.plan.to_dict() == res.plan.to_dict()


def test_allocation_on_data_aware_spectra_differs(model_dir, tmp_path):
    kw = dict(ratio=0.5, min_ratio=0.0, method="whiten", calib_samples=4, calib_seqlen=64)
    w = compress_dir(model_dir, tmp_path / "w", dict(eval=False), alloc_spectrum="weight", **kw).plan
    d = compress_dir(model_dir, tmp_path / "d", dict(eval=False), alloc_spectrum="data", **kw).plan
    assert [m.alloc_rank for m in w.matrices] != [m.alloc_rank for m in d.matrices]


@pytest.mark.parametrize("method", ["svd", "whiten-fisher"])
def test_loss_allocation(model_dir, tmp_path, method):
    out = tmp_path / method
    res = compress_dir(model_dir, out, dict(eval_tokens=128, seqlen=64), ratio=0.3, target="params",
                       allocation="loss", min_ratio=0.0, method=method, calib_samples=4, calib_seqlen=64)
    assert [r["model"] for r in res.rows] == ["dense", "uniform", "loss"]
    assert res.plan.allocation == "loss" and abs(res.plan.param_reduction - 0.3) < 0.05
    uniform = float(res.rows[1]["param red. (targets)"].rstrip("%")) / 100  # compared at equal parameters
    assert abs(uniform - res.plan.param_reduction) < 0.05
    meta = json.loads((out / "welore.json").read_text())
    assert meta["settings"]["calibration"]["loss_gradients"] is True
    assert load_compressed(out).plan.to_dict() == res.plan.to_dict()


def test_second_calibration_pass_sees_the_compressed_model(model_dir, tmp_path, monkeypatch):
    """Pass 2 collects statistics on the compressed model (LowRankLinear modules present) and re-plans."""
    import welore.compress as compress_module  # where compression calibrates
    from welore import LowRankLinear

    seen = []
    real = compress_module.collect_stats

    def spy(model, *a, **kw):
        seen.append(sum(isinstance(m, LowRankLinear) for m in model.modules()))
        return real(model, *a, **kw)
    monkeypatch.setattr(compress_module, "collect_stats", spy)
    kw = dict(ratio=0.3, target="params", allocation="loss", method="whiten-fisher", calib_samples=4,
              calib_seqlen=64)
    job = dict(eval_tokens=128, seqlen=64)
    one = compress_dir(model_dir, tmp_path / "one", job, **kw)
    two = compress_dir(model_dir, tmp_path / "two", job, calib_passes=2, **kw)
    # run one: 1 pass on the dense model; run two: the same first pass, then one on one's compressed model
    assert seen == [0, 0, len(one.plan.lrcs)] and seen[2] > 0
    assert [r["model"] for r in two.rows] == ["dense", "uniform (1 pass)", "loss"]
    assert json.loads((tmp_path / "two" / "welore.json").read_text())["settings"]["calibration"]["passes"] == 2
    # the factors differ (refitted to the compressed model's inputs), the uniform row does not
    assert two.rows[1]["wikitext2 ppl"] == pytest.approx(one.rows[1]["wikitext2 ppl"], rel=1e-6)
    assert two.rows[2]["wikitext2 ppl"] != one.rows[2]["wikitext2 ppl"]


def test_run_analyze(model_dir, tmp_path):
    out, spectra, plan = run_analyze(model_dir, AnalyzeConfig(output=str(tmp_path / "a"), quiet=True))
    assert len(spectra.targets) == len(plan.matrices) == 14
    assert "mean reduction" in (out / "summary.md").read_text()


def test_next_steps_suggest_only_what_applies(tmp_path):
    lrc = RankPlan("welore", 0.3, 0.5, None, [MatrixPlan("a", "linear", 64, 64, 64, 8, True)])
    dense = RankPlan("welore", 0.0, 0.5, None, [MatrixPlan("a", "linear", 64, 64, 64, 64, False)])
    plain = CompressResult(tmp_path, lrc, settings={"allocation": "welore", "method": "svd"}).explain()
    assert "--method whiten-fisher" in plain and "--recover 500" in plain
    recipe = CompressResult(tmp_path, lrc, settings={"allocation": "loss", "method": "whiten-fisher"}).explain()
    assert "--method whiten-fisher" not in recipe and "--recover 500" in recipe
    nothing = CompressResult(tmp_path, dense, settings={"allocation": "welore", "method": "svd"}).explain()
    assert "--param-ratio" not in nothing and "finetune" not in nothing and "welore generate" in nothing
    assert "welore finetune" not in CompressResult(tmp_path, lrc, settings={}).explain(recovering=True)
    # quantised factors cannot train (welore.modes refuses them): a --bits run is told to train its scales
    assert "--train scales" in CompressResult(tmp_path, lrc, settings={"bits": 4}).explain()
    assert "--train scales" not in plain


def test_the_recovery_hint_is_the_recovery_recipe(tmp_path):
    """The command the main job suggests runs exactly FinetuneConfig.recovery(500), `--recover 500` (a
    quantised model's: FinetuneConfig.recovery(300, quantised=True), `--recover 300`)."""
    from welore.cli import build_parser
    from welore.config import from_namespace
    from welore.finetune_config import FinetuneConfig

    lrc = RankPlan("welore", 0.3, 0.5, None, [MatrixPlan("a", "linear", 64, 64, 64, 8, True)])
    for settings, recipe in (({}, FinetuneConfig.recovery(500)),
                             ({"bits_per_weight": 2.5}, FinetuneConfig.recovery(300, quantised=True))):
        hint = next(line for line in CompressResult(tmp_path, lrc, settings=settings).explain().splitlines()
                    if "welore finetune" in line)
        argv = hint.split("welore finetune ", 1)[1].split()
        assert from_namespace(FinetuneConfig, build_parser().parse_args(["finetune", *argv])) == recipe


def test_next_steps_fit_the_model_that_ran(tmp_path):
    """Times come from this run's measured evaluation speed, the reading hint uses the job's own prompt
    (a code model's user passes --prompt), and nothing is said of the 135M default."""
    lrc = RankPlan("welore", 0.3, 0.5, None, [MatrixPlan("a", "linear", 64, 64, 64, 8, True)])
    settings = {"eval": {"corpus": "wikitext2", "tokens": 4096, "prompt": "def fib(n):", "new_tokens": 12}}
    timed = CompressResult(tmp_path, lrc, settings=settings, per_token=0.001).explain()
    assert "min here, from this run's evaluation speed" in timed and "135M" not in timed
    assert 'welore generate ' in timed and '"def fib(n):" --raw' in timed and "Paris" not in timed
    assert "min here" not in CompressResult(tmp_path, lrc, settings=settings).explain()
