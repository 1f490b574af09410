"""welore.baselines: each comparison row is compress() with its own config, at the reduction our plan reached."""

from welore import CompressConfig, CompressJob
from welore.baselines import comparison_rows, recipe_config, row_maker, uniform_config
from welore.compress import compress


def test_row_configs_match_what_the_plan_reached(llama, tokenizer):
    done = compress(llama, tokenizer, CompressConfig(ratio=0.4, min_ratio=0.0), progress=False)
    uni = uniform_config(done.config, done.plan)
    assert uni.allocation == "uniform" and uni.target == "rank" and uni.method == "svd"
    assert abs(uni.ratio - done.plan.effective_rank_reduction) < 1e-9
    by_params = uniform_config(CompressConfig(ratio=0.3, target="params"), done.plan)
    assert by_params.target == "params" and abs(by_params.ratio - done.plan.param_reduction) < 1e-9
    rc = recipe_config(done.config, done.plan, samples=3)
    assert (rc.allocation, rc.method, rc.target, rc.calib_samples, rc.min_ratio) == ("loss", "whiten-fisher",
                                                                                   "params", 3, 0.0)


def test_comparison_rows_in_order(tmp_path, tokenizer):
    from conftest import make_tiny

    dense, model = make_tiny("llama"), make_tiny("llama")
    job = CompressJob(eval_tokens=128, seqlen=64, recipe_samples=2, new_tokens=3, quiet=True)
    done = compress(model, tokenizer, CompressConfig(ratio=0.4, min_ratio=0.0, calib_seqlen=32), progress=False)
    row = row_maker(tokenizer, job)
    rows = comparison_rows(dense, tokenizer, done, row("WeLore", done.plan, model, 0.0), job, row)
    assert [r["model"] for r in rows] == ["dense", "uniform", "WeLore", "loss + whiten-fisher (2x32 calib.)"]
    assert all(r["wikitext2 ppl"] > 0 and isinstance(r["continuation"], str) for r in rows)
    assert abs(rows[3]["params"] - rows[2]["params"]) <= 0.05 * rows[2]["params"]  # the recipe at our size
