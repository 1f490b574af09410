"""Bigger than memory: streaming compression (`welore compress --stream`) on synthetic checkpoints
with the real shapes of TinyLlama-1.1B and LLaMA-2-7B, and in-memory vs streaming on SmolLM2.

There is no model hub here, so each checkpoint is generated: a LLaMA config of the real shape, bf16
safetensors shards written block by block (the generator never holds more than one block), and
weights with heavy-tailed spectra like trained ones: W = A diag(s) B + noise with Gaussian A, B,
s_i ~ i^-alpha (alpha drawn per matrix in [0.6, 1.4], so the plan is not degenerate) over rank
min(m, n) / 4, and a Gaussian noise floor. Every compression runs in its own process (`welore
compress --stream`), so its peak RSS is its own.

Reported per size: peak RSS of the compressing process (sampled every 50 ms from outside), wall
time, the thin-SVD floor (one `torch.linalg.svd(full_matrices=False)` in fp32 per distinct target
shape, on a Gaussian matrix, measured in this run, times the number of matrices of that shape), the
ratios of the process's wall time and of the compression alone (stream.json) to that floor, and the
output size.

    python benchmarks/scale.py --sizes smollm2 tinyllama-1.1b     # ~20 min on 2 CPU cores
    python benchmarks/scale.py --sizes llama2-7b                   # ~1.5 h, ~40 GB of disk
    python benchmarks/scale.py --sizes mini --work /tmp/scale      # a quick look (seconds)
    python benchmarks/scale.py --sizes smollm2-calibrated          # sequential calibration (~30 min)
    python benchmarks/scale.py --sizes llama2-7b --eval-dense --eval-tokens 2048   # evaluate --stream
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SHAPES = {  # the published configs' shapes, and a small one for a quick look
    "mini": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    # TinyLlama's shapes with 6 blocks: which path `welore compress DIR` takes by itself (--auto)
    "tinyllama-6l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}


def heavy_tailed(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    r = max(1, min(m, n) // 4)
    alpha = 0.6 + 0.8 * torch.rand((), generator=gen).item()
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    a = torch.randn(m, r, generator=gen) / r**0.5
    b = torch.randn(r, n, generator=gen) / n**0.5
    w = (a * s) @ b
    return w + 0.02 * w.std() * torch.randn(m, n, generator=gen)


def synthesize(name: str, out: Path, seed: int = 0) -> Path:
    """A LLaMA checkpoint of `name`'s shape: config, tokenizer, bf16 shards (one per block + the rest)."""
    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(tmp)
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    gen = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    total, weight_map = layers + 1, {}
    for i in range(layers):
        t0 = time.perf_counter()
        block = {f"model.layers.{i}.{k}.weight": heavy_tailed(*s, gen).bfloat16() for k, s in shapes.items()}
        block[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        block[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        file = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(block, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(block, file))
        print(f"  {name}: block {i + 1}/{layers} in {time.perf_counter() - t0:.1f} s", flush=True)
    rest = {"model.embed_tokens.weight": (0.02 * torch.randn(cfg.vocab_size, h, generator=gen)).bfloat16(),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            "lm_head.weight": (0.02 * torch.randn(cfg.vocab_size, h, generator=gen)).bfloat16()}
    file = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(rest, str(tmp / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, file))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def add_tokenizer(out: Path, vocab: int = 4096) -> None:
    """A byte-level BPE trained on WikiText-2 text: synthetic weights, but real text to evaluate on
    (any vocabulary no larger than the model's will do)."""
    if (out / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (DATA / "text" / "wikitext2_test.raw").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


def evaluate_streaming(model: Path, tokens: int) -> dict:
    """Perplexity of `model` block by block (`welore evaluate --stream`): peak RSS and wall time."""
    out = model.with_name(model.name + "-ppl.json")
    wall, rss = run(["evaluate", str(model), "--stream", "--seqlen", "512", "--max-tokens", str(tokens), "-q",
                     "-o", str(out)])
    return {"wall_s": wall, "peak_rss_gib": rss, "tokens": tokens, "ppl": json.loads(out.read_text())["results"][0]["ppl"]}


def svd_floor(config: dict, repeats: int = 1) -> tuple[float, dict, float]:
    """Seconds of one fp32 thin SVD per target matrix: each distinct shape timed here, times its count.
    Also the floor with each matrix taken in its faster orientation (a wide matrix through its
    transpose, as `welore.spectrum.thin_svd` does): the CPU's LAPACK is 2-2.4x slower on wide ones."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    counts: dict[tuple[int, int], int] = {}
    for s in [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]:
        counts[s] = counts.get(s, 0) + layers

    def seconds(shape: tuple[int, int]) -> float:
        w, best = torch.randn(*shape), float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.linalg.svd(w, full_matrices=False)
            best = min(best, time.perf_counter() - t)
        return best

    per_shape = {s: seconds(s) for s in counts}
    for m, n in counts:
        if m < n and (n, m) not in per_shape:
            per_shape[(n, m)] = seconds((n, m))
    floor = sum(per_shape[s] * c for s, c in counts.items())
    fast = sum(min(per_shape[(m, n)], per_shape.get((n, m), float("inf"))) * c for (m, n), c in counts.items())
    return floor, {f"{m}x{n}": t for (m, n), t in per_shape.items()}, fast


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB sampled every 50 ms) of `welore ARGS` in a fresh process."""
    t = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "welore", *args])
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if child.wait() != 0:
        raise SystemExit(f"welore {' '.join(args)} failed")
    return time.perf_counter() - t, peak / 2**30


def auto_path(src: Path, out: Path, ratio: float) -> dict:
    """Peak RSS of `welore compress SRC` with no path flag (it streams a directory, evaluating dense and
    compressed block by block) against the in-memory path without evaluation, one process each."""
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    auto_s, auto_rss = run(["compress", str(src), "-o", str(out), "--ratio", str(ratio), "--eval-tokens", "2048",
                            "--overwrite", "-q"])
    mem_s, mem_rss = run(["compress", str(src), "-o", str(out) + "-memory", "--ratio", str(ratio), "--no-stream",
                          "--no-eval", "--overwrite", "-q"])
    return {"checkpoint_gib": size / 2**30, "auto_peak_rss_gib": auto_rss, "auto_wall_s": auto_s,
            "auto_within_checkpoint_plus_1gib": auto_rss <= size / 2**30 + 1, "memory_peak_rss_gib": mem_rss,
            "memory_wall_s": mem_s, "auto_rows": json.loads((out / "results.json").read_text())["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["smollm2", "tinyllama-1.1b"],
                    choices=["smollm2", "smollm2-calibrated", *SHAPES])
    ap.add_argument("--eval-tokens", type=int, default=16384, help="perplexity tokens (smollm2-calibrated)")
    ap.add_argument("--eval-dense", action="store_true", help="only evaluate the synthetic dense checkpoints "
                    "block by block (welore evaluate --stream), --eval-tokens tokens")
    ap.add_argument("--ratio", type=float, default=0.5, help="effective rank reduction")
    ap.add_argument("--work", default="bench-out/scale", help="where checkpoints and outputs go (large)")
    ap.add_argument("--auto", action="store_true", help="instead: `welore compress DIR` as a user runs it (no "
                    "--stream; it picks the path) against `--no-stream --no-eval`, peak RSS of each")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads((work / "scale.json").read_text()) if (work / "scale.json").is_file() else {}
    for size in a.sizes:
        if size == "smollm2":
            results[size] = smollm2(work, a.ratio)
        elif size == "smollm2-calibrated":
            results[size] = smollm2_calibrated(work, a.eval_tokens)
        else:
            src = synthesize(size, work / f"{size}-synthetic")
            add_tokenizer(src)
            if a.auto:
                results[f"{size}-auto"] = auto_path(src, work / f"{size}-auto", a.ratio)
                print(json.dumps({size: results[f"{size}-auto"]}, indent=1), flush=True)
                (work / "scale.json").write_text(json.dumps(results, indent=1))
                continue
            if a.eval_dense:  # the dense checkpoint evaluated block by block: no compression needed
                results[f"{size}-dense-eval"] = evaluate_streaming(src, a.eval_tokens)
                print(json.dumps({size: results[f"{size}-dense-eval"]}), flush=True)
                (work / "scale.json").write_text(json.dumps(results, indent=1))
                continue
            out = work / f"{size}-compressed"
            wall, rss = run(["compress", str(src), "--stream", "-o", str(out), "--ratio", str(a.ratio), "--overwrite",
                             "-q"])
            stream = json.loads((out / "stream.json").read_text())
            floor, per_shape, fast = svd_floor(json.loads((src / "config.json").read_text()))
            results[size] = {"wall_s": wall, "peak_rss_gib": rss, **stream, "svd_floor_s": floor, "svd_floor_per_shape_s": per_shape,
                             "wall_over_floor": wall / floor, "compress_over_floor": stream["seconds"] / floor,
                             "svd_floor_best_orientation_s": fast, "wall_over_best_floor": wall / fast,
                             "checkpoint_gib": stream["source_bytes"] / 2**30,
                             "eval_stream": evaluate_streaming(out, 2048)}
        print(json.dumps({size: results[size]}, indent=1), flush=True)
        (work / "scale.json").write_text(json.dumps(results, indent=1))  # after each size: partial results survive


def smollm2_dir(work: Path) -> Path:
    """The embedded default as a safetensors directory (what --stream reads)."""
    src = work / "smollm2-dense"
    if not src.is_dir():
        from welore import load_model, save_dense

        loaded = load_model(None)
        save_dense(loaded.model, src, tokenizer=loaded.tokenizer)
    return src


def smollm2(work: Path, ratio: float) -> dict:
    """The embedded default compressed in memory and streamed."""
    src = smollm2_dir(work)
    common = [str(src), "--ratio", str(ratio), "--overwrite", "-q"]
    mem_s, mem_rss = run(["compress", *common, "-o", str(work / "smollm2-mem"), "--no-compare", "--no-eval"])
    stream_s, stream_rss = run(["compress", *common, "-o", str(work / "smollm2-stream"), "--stream"])
    return {"in_memory": {"wall_s": mem_s, "peak_rss_gib": mem_rss},
            "stream": {"wall_s": stream_s, "peak_rss_gib": stream_rss,
                       **json.loads((work / "smollm2-stream" / "stream.json").read_text())}}


def smollm2_calibrated(work: Path, tokens: int) -> dict:
    """The calibrated recipe (loss allocation + whiten-fisher) at 20% and 40% parameter reduction,
    1 and 2 calibration passes, in memory and streamed (sequential calibration): are the outputs the
    same bytes, what do the runs cost, and what WikiText-2 / C4 perplexity do they reach (the
    in-memory output evaluated in memory, the streamed one block by block)?"""
    from welore.shards import ShardReader

    src = smollm2_dir(work)
    corpora = ["wikitext2", "c4"]

    def ppl(model: Path, stream: bool) -> dict:
        out = work / f"{model.name}-ppl{'-stream' if stream else ''}.json"
        wall, rss = run(["evaluate", str(model), "--corpus", *corpora, "--max-tokens", str(tokens), "-q",
                         "-o", str(out), *(["--stream"] if stream else [])])
        return {"wall_s": wall, "peak_rss_gib": rss,
                **{r["corpus"]: r["ppl"] for r in json.loads(out.read_text())["results"]}}

    rows = {"dense": ppl(src, stream=False), "dense_stream": ppl(src, stream=True)}
    for ratio in (0.2, 0.4):
        for passes in (1, 2):
            name = f"smollm2-params{ratio}-passes{passes}"
            common = [str(src), "--param-ratio", str(ratio), "--allocation", "loss", "--method", "whiten-fisher",
                      "--calib-passes", str(passes), "--overwrite", "-q"]
            mem, st = work / f"{name}-mem", work / f"{name}-stream"
            mem_s, mem_rss = run(["compress", *common, "-o", str(mem), "--no-compare", "--no-eval"])
            st_s, st_rss = run(["compress", *common, "-o", str(st), "--stream"])
            a, b = ShardReader(mem).all(), ShardReader(st).all()
            rows[name] = {
                "in_memory": {"wall_s": mem_s, "peak_rss_gib": mem_rss, **ppl(mem, stream=False)},
                "stream": {"wall_s": st_s, "peak_rss_gib": st_rss, **ppl(st, stream=True)},
                "same_plan": json.loads((mem / "welore.json").read_text())["plan"]
                == json.loads((st / "welore.json").read_text())["plan"],
                "tensors": len(a), "bitwise_equal_tensors": sum(k in b and torch.equal(a[k], b[k]) for k in a)}
            print(json.dumps({name: rows[name]}), flush=True)
    return rows


if __name__ == "__main__":
    main()
