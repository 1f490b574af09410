"""lm-evaluation-harness: `welore` is a registered lm-eval model, offline, on a local task YAML."""

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import DATA  # noqa: E402

import welore.lm_eval_model  # noqa: E402,F401  (registers "welore")

TASK = "welore_boolq_local"
YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {DATA / "tasks" / "boolq" / "boolq_dev.jsonl"}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{answer | int}}}}"
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
LIMIT = 24


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("tasks")
    (d / f"{TASK}.yaml").write_text(YAML)
    return TaskManager(include_path=str(d))


@pytest.fixture
def with_eos():
    """lm-eval needs an end-of-text token (the tiny test tokenizer has none): give a directory one."""
    from transformers import AutoTokenizer

    def add(d):
        tok = AutoTokenizer.from_pretrained(d)
        tok.eos_token = tok.convert_ids_to_tokens(0)
        tok.save_pretrained(d)
        return d

    return add


def _acc(model: str, pretrained, task_manager, **extra) -> tuple[float, list]:
    res = lm_eval.simple_evaluate(model=model, model_args={"pretrained": str(pretrained), "device": "cpu", **extra},
                                  tasks=[TASK], task_manager=task_manager, limit=LIMIT, batch_size=1,
                                  log_samples=True, bootstrap_iters=0)
    samples = [s["filtered_resps"] for s in res["samples"][TASK]]
    return res["results"][TASK]["acc,none"], samples


def test_dense_scores_exactly_as_lm_evals_hf_model(model_dir, task_manager, with_eos):
    with_eos(model_dir)
    ours, ours_samples = _acc("welore", model_dir, task_manager)
    theirs, their_samples = _acc("hf", model_dir, task_manager)
    assert ours == theirs
    assert ours_samples == their_samples  # the same log-likelihoods, not just the same accuracy


def test_compressed_dir_scores_as_hf_with_remote_code(compressed_dir, task_manager, tmp_path, monkeypatch,
                                                     with_eos):
    with_eos(compressed_dir)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    ours, ours_samples = _acc("welore", compressed_dir, task_manager)
    theirs, their_samples = _acc("hf", compressed_dir, task_manager, trust_remote_code=True)
    assert 0.0 <= ours <= 1.0
    assert ours_samples == their_samples
