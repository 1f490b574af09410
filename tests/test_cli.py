"""The CLI in-process: every command on a tiny model, and every bad input gives one line + exit 2."""

import json
import shlex

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file

from welore.cli import main


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze(capsys, model_dir, tmp_path):
    out = tmp_path / "an"
    code, stdout, _ = run(capsys, "analyze", str(model_dir), "-o", str(out), "-q")
    assert code == 0 and "self_attn.q_proj" in stdout
    assert {"spectra.safetensors", "plan.json", "spectra.png", "reduction.png", "summary.md"} <= {
        p.name for p in out.iterdir()}


def test_compress_evaluate_merge(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(out), "--ratio", "0.4", "--no-stream",
                            "--min-ratio", "0", "--eval-tokens", "256", "--seqlen", "64", "-q")
    assert code == 0, err
    assert all(word in stdout for word in ("dense", "uniform", "WeLore", "wikitext2 ppl"))
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows][:3] == ["dense", "uniform", "WeLore"]
    assert (out / "report.md").is_file() and "Memory: peak_rss_gib" in (out / "report.md").read_text()
    memory = json.loads((out / "results.json").read_text())["memory"]
    assert memory["peak_rss_gib"] > 0 and memory["model_bytes"] == (out / "model.safetensors").stat().st_size
    # the calibrated recipe at the WeLore row's parameter count, and every row's continuation
    assert rows[3]["model"].startswith("loss + whiten-fisher")
    assert abs(rows[3]["params"] - rows[2]["params"]) <= 0.02 * rows[2]["params"]
    assert all(isinstance(r["continuation"], str) for r in rows)
    assert "Next:" in stdout and "welore finetune" in stdout and "--method whiten-fisher" in stdout
    hint = next(line for line in stdout.splitlines() if "read what it writes:" in line).split(": ", 1)[1]
    code, _, err = run(capsys, *shlex.split(hint)[1:])  # the hint runs as printed
    assert code == 0, err

    code, stdout, _ = run(capsys, "evaluate", str(out), "--corpus", "wikitext2", "c4", "--max-tokens", "256",
                          "--seqlen", "64", "-q")
    assert code == 0 and "c4" in stdout
    # the evaluated perplexity of the saved model is the one the compress table reported
    ppl = float(stdout.splitlines()[2].split()[2].replace(",", ""))
    assert abs(ppl - rows[2]["wikitext2 ppl"]) < 0.01 * ppl

    code, _, err = run(capsys, "merge", str(out), str(tmp_path / "dense"))
    assert code == 0, err
    assert (tmp_path / "dense" / "config.json").is_file()


def test_compress_by_parameter_ratio_and_threshold(capsys, model_dir, tmp_path):
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "p"), "--param-ratio", "0.3",
                            "--no-eval", "-q")
    assert code == 0, err
    plan = json.loads((tmp_path / "p" / "welore.json").read_text())["plan"]
    assert plan["target"] == {"kind": "params", "ratio": 0.3}
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "t"), "--threshold", "0.2",
                       "--no-eval", "-q")
    assert code == 0, err


def test_cached_spectra_are_reused_and_checked(capsys, model_dir, tmp_path):
    run(capsys, "analyze", str(model_dir), "-o", str(tmp_path / "an"), "-q")
    spectra = tmp_path / "an" / "spectra.safetensors"
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "c"), "--spectra", str(spectra),
                       "--no-eval", "-q")
    assert code == 0, err
    # weights changed after the cache was written: refused as stale
    w = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in w if "q_proj" in k)
    w[key] = w[key] * 1.01
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "c2"), "--spectra", str(spectra),
                       "--no-eval", "-q")
    assert code == 2 and "stale" in err and not (tmp_path / "c2").exists()


def _assert_clean_error(code, err, needle):
    assert code == 2
    assert err.startswith("welore: error:") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["compress", "/no/such/model", "--no-eval"], "no such file or directory"),
    (["evaluate", "./missing-dir"], "no such file or directory"),
    (["compress", "MODEL", "--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["compress", "MODEL", "--ratio", "0"], "ratio must be in (0, 1)"),
    (["compress", "MODEL", "--param-ratio", "-0.2"], "ratio must be in (0, 1)"),
    (["compress", "MODEL", "--threshold", "1.2"], "threshold must be in [0, 1]"),
    (["compress", "MODEL", "--threshold", "-0.1"], "threshold must be in [0, 1]"),
    (["compress", "MODEL", "--ratio", "0.3", "--param-ratio", "0.2"], "give one of --ratio, --param-ratio"),
    (["compress", "MODEL", "--calib-seqlen", "0", "--method", "whiten"], "calib seqlen must be > 0"),
    (["compress", "MODEL", "--min-ratio", "2"], "min_ratio"),
    (["compress", "MODEL", "--targets", "nothing-matches", "--no-eval"], "no linear target"),
    (["analyze", "MODEL", "--targets", "("], "bad targets regex"),
    (["compress", "MODEL", "--eval-tokens", "100", "--seqlen", "512"], "at least seqlen"),
    (["compress", "MODEL", "--method", "whiten", "--calib-samples", "0"], "needs calibration data"),
    (["compress", "MODEL", "--method", "asvd", "--calib-samples", "100000"], "too few calibration tokens"),
    (["compress", "MODEL", "--allocation", "loss", "--calib-samples", "0"], "loss allocation needs calibration"),
    (["compress", "MODEL", "--allocation", "loss", "--threshold", "0.2"], "welore allocation only"),
    (["compress", "MODEL", "--calib-passes", "2"], "needs a calibrated method"),
    (["compress", "MODEL", "--method", "whiten", "--calib-passes", "0"], "positive integer"),
    (["merge", "/no/such/dir", "OUT"], "no such directory"),
    (["merge", "MODEL", "OUT"], "not a welore model directory"),
])
def test_bad_input_one_line_no_output(capsys, model_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    args = [str(model_dir) if a == "MODEL" else str(out) if a == "OUT" else a for a in args]
    if args[0] in ("compress", "analyze"):
        args += ["-o", str(out)]
    code, _, err = run(capsys, *args, *(["-q"] if args[0] != "merge" else []))
    _assert_clean_error(code, err, needle)
    assert not out.exists()


def test_evaluate_a_local_file_records_its_sha256(capsys, model_dir, tmp_path):
    import hashlib

    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": "The quick brown fox jumps over the lazy dog. " * 8})
                                for _ in range(6)))
    code, stdout, err = run(capsys, "evaluate", str(model_dir), "--corpus", str(corpus), "wikitext2",
                            "--text-field", "body", "--seqlen", "64", "--max-tokens", "128", "-o",
                            str(tmp_path / "r.json"), "-q")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["corpus"] for r in res] == [str(corpus), "wikitext2"]
    assert res[0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert res[0]["sha256"][:12] in stdout and res[0]["ppl"] > 1


@pytest.mark.parametrize("name, content, needle", [
    ("missing.txt", None, "no such corpus file"),
    ("empty.txt", "", "is empty"),
    ("bin.txt", b"\x00\x01\x02", "binary"),
    ("a.jsonl", '{"body": "x"}\n', "no field 'text'"),
    ("short.txt", "a few words", "fewer than one window"),
])
def test_evaluate_bad_files(capsys, model_dir, tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    code, _, err = run(capsys, "evaluate", str(model_dir), "--corpus", str(path), "--seqlen", "64", "-q",
                       "-o", str(tmp_path / "r.json"))
    _assert_clean_error(code, err, needle)
    assert not (tmp_path / "r.json").exists()


def test_generate_streams_from_dense_and_compressed(capsys, model_dir, compressed_dir):
    for model in (model_dir, compressed_dir):
        code, stdout, err = run(capsys, "generate", str(model), "The cat", "--max-new-tokens", "5", "-q")
        assert code == 0, err
        assert stdout.strip()


@pytest.mark.parametrize("args, needle", [
    (["MODEL", "   "], "prompt is empty"),
    (["/no/such/model", "hi"], "no such file or directory"),
    (["NOTES", "hi"], "is not a model"),
    (["MODEL", "hi", "--temperature", "-1"], "temperature"),
])
def test_generate_bad_input(capsys, model_dir, tmp_path, args, needle):
    (tmp_path / "notes.txt").write_text("x")
    args = [str(model_dir) if a == "MODEL" else str(tmp_path / "notes.txt") if a == "NOTES" else a for a in args]
    code, _, err = run(capsys, "generate", *args, "-q")
    _assert_clean_error(code, err, needle)


def test_disk_full_during_compress_is_one_line_and_leaves_nothing(capsys, model_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import welore.io as io

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", full)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(out), "--no-eval", "--no-stream", "-q")
    _assert_clean_error(code, err, "No space left on device")
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_disk_full_during_streaming_is_one_line_and_resumes(capsys, model_dir, tmp_path, monkeypatch):
    """The disk fills after a few files: one line, no output, the finished blocks kept; with space
    again, --resume gives the bytes of an uninterrupted run."""
    from safetensors import SafetensorError

    import welore.shards as shards

    args = [str(model_dir), "--stream", "--ratio", "0.4", "-q", "-o"]
    assert run(capsys, "compress", *args, str(tmp_path / "whole"))[0] == 0
    real, count = shards.save_file, [0]

    def fills(*a, **k):
        count[0] += 1
        if count[0] == 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*a, **k)

    monkeypatch.setattr(shards, "save_file", fills)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", *args, str(out))
    _assert_clean_error(code, err, "No space left on device")
    assert not out.exists() and not list((tmp_path / ".out.partial").rglob("*.tmp"))
    monkeypatch.setattr(shards, "save_file", real)
    assert run(capsys, "compress", *args, str(out), "--resume")[0] == 0
    for f in (tmp_path / "whole").glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_not_a_model_file(capsys, tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "analyze", str(f), "-o", str(tmp_path / "o"), "-q")
    _assert_clean_error(code, err, "cannot load GGUF")
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(capsys, "evaluate", str(tmp_path / "notes.txt"))
    _assert_clean_error(code, err, "is not a model")


def test_nan_weights(capsys, model_dir, tmp_path):
    w = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in w if "up_proj" in k)
    w[key][3, 3] = float("nan")
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--no-eval", "-q")
    _assert_clean_error(code, err, "NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_corrupt_compressed_weights(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    assert run(capsys, "compress", str(model_dir), "-o", str(out), "--no-eval", "--no-stream", "-q")[0] == 0
    (out / "model.safetensors").write_bytes(b"junk")
    code, _, err = run(capsys, "evaluate", str(out), "--max-tokens", "128", "--seqlen", "64", "-q")
    _assert_clean_error(code, err, "corrupt")
    code, _, err = run(capsys, "merge", str(out), str(tmp_path / "m"))
    _assert_clean_error(code, err, "corrupt")
    assert not (tmp_path / "m").exists()


def test_existing_output_is_not_clobbered(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(out), "--no-eval", "-q")
    _assert_clean_error(code, err, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_compressing_a_compressed_model_is_refused(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    assert run(capsys, "compress", str(model_dir), "-o", str(out), "--no-eval", "-q")[0] == 0
    code, _, err = run(capsys, "compress", str(out), "-o", str(tmp_path / "c2"), "--no-eval", "-q")
    _assert_clean_error(code, err, "already compressed")


def test_dtype_is_kept(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    assert run(capsys, "compress", str(model_dir), "-o", str(out), "--dtype", "bfloat16", "--no-eval", "-q")[0] == 0
    from welore import load_compressed

    assert next(load_compressed(out).model.parameters()).dtype == torch.bfloat16


def test_compress_stream(capsys, model_dir, tmp_path):
    code, stdout, err = run(capsys, "compress", str(model_dir), "--stream", "-o", str(tmp_path / "s"), "--ratio", "0.4",
                            "-q")
    assert code == 0, err
    assert "2 blocks" in stdout and "3 shards" in stdout and (tmp_path / "s" / "model.safetensors.index.json").is_file()
    code, _, err = run(capsys, "compress", str(model_dir), "--resume", "-o", str(tmp_path / "r"), "-q")
    _assert_clean_error(code, err, "nothing to resume")  # --resume streams
    code, _, err = run(capsys, "compress", str(model_dir), "--resume", "--no-stream", "-o", str(tmp_path / "r"), "-q")
    _assert_clean_error(code, err, "drop --no-stream")
    code, _, err = run(capsys, "compress", "--stream", "-o", str(tmp_path / "r"), "-q")
    _assert_clean_error(code, err, "name one")


def test_compress_picks_streaming_by_itself(capsys, model_dir, tmp_path):
    """A directory streams unless the job needs the model in memory (evaluation, here) or --no-stream."""
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "s"), "--no-eval", "-q")
    assert code == 0, err
    assert stdout.startswith("welore: streamed block by block (a directory of safetensors weights")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "m"), "--no-eval", "--no-stream",
                            "-q")
    assert code == 0 and stdout.startswith("welore: in memory (as asked)")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "d"), "--dtype", "bfloat16",
                            "--no-eval", "-q")
    assert code == 0 and stdout.startswith("welore: in memory (needs the model in memory for --dtype)")
    # evaluated, the dense and compressed models are scored block by block: the in-memory figures
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "e"), "--ratio", "0.4",
                            "--eval-tokens", "128", "--seqlen", "64", "-q")
    assert code == 0, err
    assert stdout.startswith("welore: streamed block by block (a directory of safetensors weights; uniform and "
                             "recipe rows and continuations: --no-stream)")
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["dense", "WeLore"]
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "f"), "--ratio", "0.4", "--no-stream",
                       "--no-compare", "--eval-tokens", "128", "--seqlen", "64", "-q")
    assert code == 0, err
    in_memory = json.loads((tmp_path / "f" / "results.json").read_text())["rows"]
    assert in_memory[0]["wikitext2 ppl"] == pytest.approx(rows[1]["wikitext2 ppl"], rel=1e-5)


def _broken_checkpoint(src, how: str) -> None:
    """Damage the sharded checkpoint `src` as a user's download might be damaged."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    if how == "file gone":
        (src / files[-1]).unlink()
    elif how == "truncated":
        data = (src / files[0]).read_bytes()
        (src / files[0]).write_bytes(data[: len(data) - 100])
    elif how == "tensor not in its shard":
        key = next(k for k, f in index["weight_map"].items() if f == files[0])
        index["weight_map"][key] = files[-1]
    elif how == "shard left out of the index":
        index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != files[-1]}
    if how in ("tensor not in its shard", "shard left out of the index"):
        (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how, needle", [("file gone", "missing or corrupt"), ("truncated", "missing or corrupt"),
                                         ("tensor not in its shard", "which does not hold it"),
                                         ("shard left out of the index", "has no tensor")])
@pytest.mark.parametrize("command", ["compress", "evaluate"])
def test_a_damaged_sharded_checkpoint_is_one_error_before_any_work(capsys, tmp_path, tokenizer, how, needle,
                                                                      command):
    src = tmp_path / "src"
    make_tiny("llama").save_pretrained(src, max_shard_size="100KB")
    tokenizer.save_pretrained(src)
    _broken_checkpoint(src, how)
    out = tmp_path / "o"
    args = ["-o", str(out), "-q"] + (["--ratio", "0.4"] if command == "compress" else ["--max-tokens", "256", "--seqlen", "64"])
    code, _, err = run(capsys, command, str(src), "--stream", *args)
    _assert_clean_error(code, err, needle)
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_compress_then_recover_in_one_command(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(out), "--ratio", "0.5", "--min-ratio", "0.3",
                            "--no-eval", "--recover", "2", "-q")
    assert code == 0, err
    rec = json.loads((out / "recovered" / "finetune.json").read_text())
    assert rec["config"] == {**rec["config"], "mode": "lrc", "data": "c4", "teacher": None, "steps": 2, "lr": 3e-4}
    assert [p.name for p in out.iterdir() if p.name.startswith("recovered")] == ["recovered"]  # no checkpoints left
    assert "the recovered model" in stdout and "welore finetune" not in stdout
    from welore import load_compressed

    assert load_compressed(out / "recovered").plan.lrcs == load_compressed(out).plan.lrcs


def test_a_quantised_model_recovers_its_scales_in_one_command(capsys, model_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "compress", str(model_dir), "-o", str(out), "--ratio", "0.3", "--min-ratio", "0",
                            "--bits", "3", "--group-size", "32", "--no-eval", "--recover", "2", "-q")
    assert code == 0, err
    rec = json.loads((out / "recovered" / "finetune.json").read_text())
    assert rec["config"] == {**rec["config"], "mode": "scales", "steps": 2, "lr": 4e-4}
    assert "training the quantisation scales" in stdout
    from welore import load_compressed
    from welore.quantize import bits_report

    assert bits_report(load_compressed(out / "recovered").model) == bits_report(load_compressed(out).model)


def test_recover_with_a_teacher_caches_its_answers_and_removes_them(compressed_dir, model_dir, tmp_path):
    from welore import recover

    out = tmp_path / "out"
    res = recover(compressed_dir, out / "r", steps=2, teacher=str(model_dir), eval_tokens=256, progress=False)
    assert res.metrics["teacher"] == str(model_dir) and res.metrics["teacher_cache_build_s"] > 0
    assert [p.name for p in out.iterdir()] == ["r"]  # the cache and the checkpoints are gone


def test_recover_bad_input(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), "--recover", "0", "-q")
    _assert_clean_error(code, err, "must be a positive integer")
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "compress", str(model_dir), "--stream", "-o", str(tmp_path / "o"), "--recover", "5", "-q")
    _assert_clean_error(code, err, "--recover trains in memory")
    assert not (tmp_path / "o").exists()
    # a bad recovery text fails at once, before minutes of compression, and writes nothing
    for args, needle in ([("--recover", "5", "--recover-data", str(tmp_path / "nope.txt")), "no such corpus file"],
                         [("--recover-data", str(tmp_path / "nope.txt")), "--recover-data needs --recover"]):
        code, _, err = run(capsys, "compress", str(model_dir), "-o", str(tmp_path / "o"), *args, "-q")
        _assert_clean_error(code, err, needle)
        assert not (tmp_path / "o").exists()


def test_finetune_on_a_text_file(capsys, compressed_dir, tmp_path):
    text = tmp_path / "notes.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Note {i}: the meeting moved to room {i % 5}."}) for i in range(300)))
    fast = ["--steps", "2", "--seqlen", "32", "--batch-size", "2", "--eval-tokens", "128", "-q"]
    code, stdout, err = run(capsys, "finetune", str(compressed_dir), "-o", str(tmp_path / "ft"), "--data", str(text), *fast)
    assert code == 0, err
    rec = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert rec["config"]["data"] == str(text) and "heldout_ppl" in rec["evals"][-1]
    assert rec["metrics"]["passes"] < 1 and "go 1." not in stdout and "note:" not in stdout
    # a run that draws more sequences than the text holds says so, and records how many times over
    short = tmp_path / "short.txt"
    short.write_text("The meeting moved to room five, then back to room two. " * 12)
    code, stdout, err = run(capsys, "finetune", str(compressed_dir), "-o", str(tmp_path / "rep"), "--data", str(short),
                            "--steps", "20", "--seqlen", "32", "--batch-size", "2", "--eval-tokens", "64", "-q")
    assert code == 0, err
    passes = json.loads((tmp_path / "rep" / "finetune.json").read_text())["metrics"]["passes"]
    assert passes > 1 and f"go {passes:.1f} times over the" in stdout and "held-out loss can rise" in stdout
    code, _, err = run(capsys, "finetune", str(compressed_dir), "-o", str(tmp_path / "bad"), "--data", "nope.csv", *fast)
    _assert_clean_error(code, err, "unknown task 'nope.csv'")
    assert not (tmp_path / "bad").exists()


def test_finetune_and_compare(capsys, compressed_dir, tmp_path):
    fast = ["--steps", "3", "--seqlen", "32", "--batch-size", "2", "--eval-tokens", "64", "-q"]
    code, stdout, err = run(capsys, "finetune", str(compressed_dir), "-o", str(tmp_path / "ft"), *fast)
    assert code == 0, err
    assert "trainable" in stdout and (tmp_path / "ft" / "finetune.json").is_file()
    code, stdout, err = run(capsys, "compare", str(compressed_dir), "-o", str(tmp_path / "cmp"),
                            "--modes", "lrc", "lora", "--lr", "2e-4", "--mode-lr", "lora=5e-4",
                            "--gradient-checkpointing", "--loss-chunk", "16", *fast)
    assert code == 0, err
    rec = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [(r["mode"], r["lr"]) for r in rec["rows"]] == [("lrc", 2e-4), ("lora", 5e-4)]
    assert rec["lrs"] == {"lrc": 2e-4, "lora": 5e-4} and rec["config"]["lr"] == 2e-4
    # each run really trained at its rate, and the table says so
    assert [json.loads((tmp_path / "cmp" / m / "finetune.json").read_text())["config"]["lr"] for m in ("lrc", "lora")] \
        == [2e-4, 5e-4]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "lr 0.0002 (lora 0.0005)" in md and "(savers: activation checkpointing, the loss in chunks of 16)" in md
    for m in ("lrc", "lora"):  # the memory savers reached every mode's run
        run_cfg = json.loads((tmp_path / "cmp" / m / "finetune.json").read_text())["config"]
        assert run_cfg["activation_checkpointing"] is True and run_cfg["loss_chunk"] == 16
    assert {"compare.md", "compare.png", "lrc", "lora"} <= {p.name for p in (tmp_path / "cmp").iterdir()}


@pytest.mark.parametrize("value", ["full", "full=fast"])
def test_compare_mode_lr_needs_mode_equals_rate(capsys, compressed_dir, tmp_path, value):
    code, _, err = run(capsys, "compare", str(compressed_dir), "-o", str(tmp_path / "o"), "-q", "--mode-lr", value)
    _assert_clean_error(code, err, "expected MODE=LR, e.g. full=5e-5")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--mode-lr", "nope=1e-4"], "unknown training mode 'nope'"),
    (["--modes", "lrc", "full", "--mode-lr", "full=0"], "learning rate must be > 0"),
    (["--modes", "lrc", "--mode-lr", "full=1e-4"], "not among the modes run"),
    (["--modes", "lrc", "full", "--mode-lr", "full=1e-4", "full=5e-5"], "names a mode twice"),
])
def test_compare_bad_mode_lr(capsys, compressed_dir, tmp_path, args, needle):
    code, _, err = run(capsys, "compare", str(compressed_dir), "-o", str(tmp_path / "o"), "-q", *args)
    _assert_clean_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["--data", "mmlu"], "unknown task"),
    (["--lr", "0"], "learning rate must be > 0"),
    (["--steps", "-1"], "steps must be > 0"),
    (["--resume"], "nothing to resume"),
    (["--train", "lora", "--lora-targets", "(down"], "not a valid regex"),
    (["--train", "lora", "--lora-targets", "nothing"], "no linear layer in the blocks matches"),
])
def test_finetune_bad_input(capsys, compressed_dir, tmp_path, args, needle):
    code, _, err = run(capsys, "finetune", str(compressed_dir), "-o", str(tmp_path / "o"), "-q", *args)
    _assert_clean_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_an_uncompressed_model(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "finetune", str(model_dir), "-o", str(tmp_path / "o"), "-q")
    _assert_clean_error(code, err, "not a welore model directory")


def test_gradients_command(capsys, model_dir, tmp_path):
    out = tmp_path / "g"
    code, stdout, err = run(capsys, "gradients", str(model_dir), "-o", str(out), "--steps", "2", "--every", "1",
                            "--seqlen", "16", "--batch-size", "1", "-q")
    assert code == 0, err
    assert "Spearman" in stdout and (out / "grad_vs_reduction.png").is_file()
    code, _, err = run(capsys, "gradients", str(model_dir), "-o", str(tmp_path / "p"), "--preset", "llama-tiny",
                       "--steps", "2", "--every", "2", "--seqlen", "16", "--batch-size", "1", "-q")
    assert code == 0, err


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "steps must be > 0"),
    (["--steps", "2", "--every", "5"], "sampling interval"),
    (["--preset", "llama-huge"], "unknown preset"),
    (["--targets", "nothing"], "no linear target"),
])
def test_gradients_bad_input(capsys, model_dir, tmp_path, args, needle):
    code, _, err = run(capsys, "gradients", str(model_dir), "-o", str(tmp_path / "o"), "-q", "--seqlen", "16", *args)
    _assert_clean_error(code, err, needle)
    assert not (tmp_path / "o").exists()
