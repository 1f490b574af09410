"""Benchmark one elastic artifact against separate checkpoints, and the speed each budget gets.

On the embedded default (or --model): `--budgets` in one directory (welore.elastic) against one
separate compression per budget, in one run with nothing else on the CPU:
- size: the elastic directory's weights against its largest budget alone and against the sum of
  the separate checkpoints;
- identity: each budget sliced at load against its separate run, tensor by tensor (bit for bit);
- quality: WikiText-2 and C4 perplexity per budget (of the sliced model, which is the separate one);
- speed: greedy batch-1 decode and 512-token prefill tokens/s per budget, against dense and against
  the proportional ideal (parameters dense / parameters compressed), models alternating run by run;
  and against what welore.costs predicts: the dense model's measured time per token, less the
  cost model's time of the dense target matrices, plus its time of the plan's (decode and prefill);
  and the ceiling over the ideal ("ceiling / ideal"): the most any plan with these parameters could
  reach, its target matrices timed exactly in proportion to their parameters and the rest of the
  forward (head, attention, norms, the framework's per-layer work) as the dense model spends it;
- with --speed: every compression allocates with the device's cost model (no factorisation slower
  than its matrix, ranks on the fast multiple), and each budget's plain plan is a row beside it;
  `--target latency` makes the budgets decode-latency reductions of the target matrices (implies --speed);
- with --compile: the speed also with the decoding step compiled (welore.generate.compiled_decoding),
  every model alike, in the same run: columns "compiled ..." against the compiled dense model;
- with --recover N: the recovery recipe on the elastic directory (every budget at once, welore.elastic.Nest)
  against a separate recovery of each budget, each N steps of the same batches.

    python benchmarks/deploy.py                       # ~10 min on 2 CPU cores
    python benchmarks/deploy.py --budgets 0.2,0.5 --eval-tokens 1024 --runs 1   # a quick look
    python benchmarks/deploy.py --recover 500   # + nested recovery against one recovery per budget (~1 h more)
    python benchmarks/deploy.py --budgets 0.1,0.2 --allocation loss --method whiten-fisher --recover 200
    python benchmarks/deploy.py --budgets 0.2,0.5 --speed          # cost-model plans beside plain ones
    python benchmarks/deploy.py --budgets 0.2,0.3 --target latency
    python benchmarks/deploy.py --budgets 0.2,0.5 --speed --compile   # + torch.compile'd decoding
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from welore import CompressConfig, load_compressed
from welore.costs import for_model
from welore.evaluate import perplexity
from welore.generate import generation_speed
from welore.jobs import CompressJob
from welore.models import load_model
from welore.pipeline import run_compress
from welore.report import markdown_table
from welore.targets import count_parameters

PREFILL = 512  # tokens of generation_speed's prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--budgets", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--target", default="params", choices=("params", "rank", "latency"))
    ap.add_argument("--speed", action="store_true", help="allocate with the device's cost model (welore.costs)")
    ap.add_argument("--allocation", default="welore", help="e.g. loss (with --method whiten-fisher: the recipe)")
    ap.add_argument("--method", default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time with the decoding step compiled")
    ap.add_argument("--recover", type=int, default=0, help="also recover: the elastic directory at once (nested) "
                    "against each budget separately, this many steps each")
    ap.add_argument("--nested-steps", type=int, default=0, help="steps of the nested recovery (default: --recover; "
                    "budgets x --recover gives each budget about the tokens of its separate recovery)")
    ap.add_argument("--out", default="bench-out/deploy")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in a.budgets.split(",")]
    speed_on = a.speed or a.target == "latency"

    def compress(path: Path, **cfg) -> float:
        t = time.perf_counter()
        run_compress(a.model, CompressConfig(**{"target": a.target, "allocation": a.allocation, "method": a.method,
                                                "speed": speed_on, **cfg}),
                     CompressJob(output=str(path), eval=False, quiet=True, overwrite=True))
        return time.perf_counter() - t

    elastic = out / "elastic"
    seconds = {"elastic": compress(elastic, budgets=budgets)}
    for b in budgets:
        seconds[f"{b:g}"] = compress(out / f"separate-{b:g}", ratio=b)
    plain = {}  # with the cost model: each budget's plan without it, at the parameters the cost-model plan has
    for b in budgets if speed_on else []:
        reached = load_compressed(out / f"separate-{b:g}").plan.param_reduction
        compress(out / f"plain-{b:g}", ratio=round(reached, 4), target="params", speed=False)
        plain[f"{b:g} plain"] = out / f"plain-{b:g}"
    size = {name: (out / name / "model.safetensors").stat().st_size
            for name in ["elastic", *(f"separate-{b:g}" for b in budgets)]}
    largest = max(size[f"separate-{b:g}"] for b in budgets)
    separate_sum = sum(size[f"separate-{b:g}"] for b in budgets)

    dense = load_model(a.model)
    tok, models = dense.tokenizer, {"dense": dense.model}
    rows = [{"budget": "dense", "params": count_parameters(dense.model)}]
    plans = {}
    for b in budgets:
        loaded = load_compressed(elastic, budget=b)
        sliced, plans[f"{b:g}"] = loaded.model, loaded.plan
        separate = load_compressed(out / f"separate-{b:g}").model.state_dict()
        got = sliced.state_dict()
        same = got.keys() == separate.keys() and all(torch.equal(got[k], separate[k]) for k in separate)
        models[f"{b:g}"] = sliced
        rows.append({"budget": f"{b:g}", "params": count_parameters(sliced), "sliced == separate (bitwise)": same,
                     "separate MB": size[f"separate-{b:g}"] / 1e6, "separate compress s": seconds[f"{b:g}"]})
    for name, path in plain.items():
        loaded = load_compressed(path)
        models[name], plans[name] = loaded.model, loaded.plan
        rows.append({"budget": name, "params": count_parameters(loaded.model)})
    costs = for_model(dense.model, plans[f"{budgets[0]:g}"].matrices, progress=False)
    for r, m in zip(rows, models.values()):
        for corpus in ("wikitext2", "c4"):
            r[f"{corpus} ppl"] = perplexity(m, tok, corpus, max_tokens=a.eval_tokens, progress=False).ppl
    speed = {"": generation_speed(models, tok, new_tokens=a.new_tokens, prefill_tokens=PREFILL, runs=a.runs)}
    if a.compile:
        speed["compiled "] = generation_speed(models, tok, new_tokens=a.new_tokens, prefill_tokens=PREFILL,
                                              runs=a.runs, compile=True)
    for mode, sp in speed.items():
        d = sp["dense"]
        per = {"decode": 1 / d["decode"], "prefill": PREFILL / d["prefill"]}  # the dense model's seconds per forward
        for r in rows:
            ideal, s = rows[0]["params"] / r["params"], sp[r["budget"]]
            r.update({f"{mode}decode tok/s": s["decode"], f"{mode}decode x dense": s["decode"] / d["decode"]})
            if not mode:  # the compiled prefill is the eager one (only the decoding step compiles)
                r.update({"prefill tok/s": s["prefill"], "prefill x dense": s["prefill"] / d["prefill"],
                          "ideal x dense": ideal})
            r[f"{mode}decode / ideal"] = s["decode"] / d["decode"] / ideal
            if not mode:
                r["prefill / ideal"] = s["prefill"] / d["prefill"] / ideal
            if r["budget"] in plans:  # predicted: dense forward - dense targets + planned targets (welore.costs)
                plan = plans[r["budget"]]
                share = plan.params_after / plan.params_before
                for regime in ("decode",) if mode else ("decode", "prefill"):
                    dense_t = costs.dense_seconds(plan, regime)
                    predicted = per[regime] / (per[regime] - dense_t + costs.seconds(plan, regime))
                    r[f"{mode}predicted {regime} x dense"] = predicted
                    r[f"{mode}measured / predicted {regime}"] = r[f"{mode}{regime} x dense"] / predicted
                    # the ceiling of any plan with these parameters: its target matrices taking time exactly in
                    # proportion to their parameters, the rest of the forward (head, attention, norms) as dense
                    r[f"{mode}{regime} ceiling / ideal"] = per[regime] / (per[regime] - dense_t * (1 - share)) / ideal
    d = speed[""]["dense"]
    per = {"decode": 1 / d["decode"]}
    compiled = (f" Compiled decoding: dense {speed['compiled ']['dense']['decode']:.1f} tok/s "
                f"({speed['compiled ']['dense']['decode'] / d['decode']:.2f}x eager)." if a.compile else "")
    header = (f"{a.model or 'SmolLM2-135M-Instruct (embedded)'}, budgets {a.budgets} ({a.target}, {a.allocation} "
              f"allocation, {a.method or 'svd'}), "
              f"{torch.get_num_threads()} threads, {next(dense.model.parameters()).dtype}, "
              f"{'cost-model plans (--speed), ' if speed_on else ''}dense decode "
              f"{d['decode']:.1f} tok/s, prefill {d['prefill']:.0f} tok/s (median of {a.runs}).\n\n"
              f"Elastic artifact {size['elastic'] / 1e6:.1f} MB = {size['elastic'] / largest:.3f}x its largest budget alone "
              f"({largest / 1e6:.1f} MB), {size['elastic'] / separate_sum:.3f}x the {len(budgets)} separate checkpoints "
              f"({separate_sum / 1e6:.1f} MB); compressed in {seconds['elastic']:.0f} s against "
              f"{sum(seconds[f'{b:g}'] for b in budgets):.0f} s for the separate runs. Predictions: {costs.device}, "
              f"target matrices {1e3 * costs.dense_seconds(plans[f'{budgets[0]:g}']):.1f} ms of the dense model's "
              f"{1e3 * per['decode']:.1f} ms per decoded token.{compiled}")
    table = markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    recovery = recover(out, budgets, a.recover, a.nested_steps or a.recover) if a.recover else []
    if recovery:
        table += (f"\n\nRecovery (the recipe, `FinetuneConfig.recovery`): every budget at once from the elastic "
                  f"directory ({a.nested_steps or a.recover} steps, each step one budget) against one separate recovery "
                  f"per budget ({a.recover} steps each), the same batch size and schedule:\n\n" + markdown_table(recovery))
    print(header + "\n\n" + table)
    (out / "deploy.md").write_text(header + "\n\n" + table + "\n")
    (out / "deploy.json").write_text(json.dumps({"args": vars(a), "sizes": size, "seconds": seconds, "rows": rows,
                                                 "speed": speed, "recovery": recovery}, indent=1))


def recover(out: Path, budgets: list[float], steps: int, nested_steps: int) -> list[dict]:
    """Nested recovery of the elastic directory (`nested_steps`) against a separate recovery of each
    budget's own checkpoint (`steps`), same batch size and schedule; held-out C4 and WikiText-2 per budget."""
    import shutil

    from welore.elastic import budget_of_step
    from welore.finetune_config import FinetuneConfig
    from welore.train import recover as run

    shutil.rmtree(out / "elastic-recovered", ignore_errors=True)
    nested = run(out / "elastic", out / "elastic-recovered", nested_steps, progress=False, overwrite=True)
    keys = [f"{b:g}" for b in budgets]
    seed = FinetuneConfig.recovery(nested_steps).seed
    trained = [budget_of_step(keys, seed, i) for i in range(nested_steps)]
    best = nested.evals[[e["step"] for e in nested.evals].index(nested.metrics["returned_step"])]
    rows = []
    for b in budgets:
        k = f"{b:g}"
        alone = run(out / f"separate-{k}", out / f"separate-{k}-recovered", steps, progress=False, overwrite=True)
        mine = alone.evals[[e["step"] for e in alone.evals].index(alone.metrics["returned_step"])]
        start = nested.evals[0]["budgets"][k]
        rows.append({"budget": k, "nested steps of this budget": trained.count(k), "separate steps": steps,
                     "c4 before": start["c4_ppl"], "wikitext2 before": start["wikitext2_ppl"],
                     "c4 nested": best["budgets"][k]["c4_ppl"], "c4 separate": mine["c4_ppl"],
                     "c4 nested / separate": best["budgets"][k]["c4_ppl"] / mine["c4_ppl"],
                     "wikitext2 nested": best["budgets"][k]["wikitext2_ppl"], "wikitext2 separate": mine["wikitext2_ppl"],
                     "wikitext2 nested / separate": best["budgets"][k]["wikitext2_ppl"] / mine["wikitext2_ppl"],
                     "nested s": nested.metrics["train_seconds"], "separate s": alone.metrics["train_seconds"]})
    return rows


if __name__ == "__main__":
    main()
