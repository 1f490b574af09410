"""Measured matmul costs: how long a dense matrix and its two factors take on the device at hand, in
batch-1 decoding (1 token) and prefill (512 tokens). `--speed` and `--target latency` allocate with it.

Fewer parameters is not faster by itself. Measured on 2 CPU cores in fp32: a 192 x 576 matrix's
factors decode slower than the matrix at every rank (two small GEMMs cost more than one), and a
576 x 576 one's from rank ~180, where the parameters break even at 288. So the allocation asks this
model, not the parameter count, whether a factorisation pays (`CostModel.pays`), and rounds ranks to
the multiple the device runs fastest (`CostModel.round`; 1 where no multiple measurably pays).

What is timed is what runs: `nn.Linear` against welore's `LowRankLinear` (its column-major call
path), on the device and in the dtype the model has, and in decoding with weights that are not in
cache, as in a model, where each matrix is read once per token: the calls rotate over copies of
the weights filling COLD_BYTES. (Timing one matrix again and again measures the cache instead:
on this CPU a 576 x 576 matrix decodes in 32 us hot and 145 us cold, and its factors break even
at rank ~190 hot but ~256 cold; the linears are then ~70% of the model's decode time, not 15%.) Timings are cached per device (its name, the
threads, torch's version, the dtype) under cache_dir()/costs, so a device is measured once and the
same command plans the same model on it again; the plan records the model's device and predictions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import WeloreError
from .files import atomic_file, cache_dir
from .layers import LowRankLinear
from .progress import bar

REGIMES = {"decode": 1, "prefill": 512}  # tokens per forward
MULTIPLES = (64, 32, 16, 8, 4, 2)  # rank multiples tried, largest first
GRID = 16  # ranks timed per shape (interpolated between)
PASSES = 3  # sweeps over them
COLD_BYTES = 128 << 20  # weights a decode timing rotates over: past the last-level caches of CPUs and GPUs
FORMAT = "welore-costs/2"


def key(m: int, n: int) -> str:
    return f"{m}x{n}"


@dataclass
class CostModel:
    """Seconds per forward of a dense m x n matrix and of its factors at rank k, per regime."""

    device: str  # what was measured: device name, threads, torch version, dtype
    multiple: int  # ranks are rounded to multiples of this (1: no multiple pays on this device)
    shapes: dict[str, dict] = field(default_factory=dict)  # "mxn" -> {"ranks": [..], regime: {"dense", "factored"}}

    def dense(self, m: int, n: int, regime: str = "decode") -> float:
        return self._shape(m, n)[regime]["dense"]

    def factored(self, m: int, n: int, k: int, regime: str = "decode") -> float:
        """Interpolated between the timed ranks (non-decreasing in k by construction)."""
        s = self._shape(m, n)
        return float(np.interp(k, s["ranks"], s[regime]["factored"]))

    def pays(self, m: int, n: int, k: int) -> bool:
        """The factors at rank k are faster than the dense matrix in every regime."""
        return all(self.factored(m, n, k, r) < self.dense(m, n, r) for r in REGIMES)

    def round(self, k: int, full: int) -> int:
        """k to the nearest multiple of the device's fast multiple (at least one multiple); `full` when
        that reaches it. Non-decreasing in k, so rules stay monotone and budgets still nest."""
        if self.multiple <= 1 or k >= full:
            return int(k)
        r = max(self.multiple, self.multiple * round(k / self.multiple))
        return int(full if r >= full else r)

    def seconds(self, plan, regime: str = "decode") -> float:
        """Predicted seconds of one forward through every target matrix of `plan` (a RankPlan)."""
        return sum(self.factored(p.out_features, p.in_features, p.alloc_rank, regime) if p.lrc
                   else self.dense(p.out_features, p.in_features, regime) for p in plan.matrices)

    def dense_seconds(self, plan, regime: str = "decode") -> float:
        return sum(self.dense(p.out_features, p.in_features, regime) for p in plan.matrices)

    def latency_reduction(self, plan) -> float:
        """1 - predicted decode time of `plan`'s matrices over their dense time."""
        return 1.0 - self.seconds(plan) / self.dense_seconds(plan)

    def predict(self, plan) -> dict:
        """What the plan records: the device, the multiple, and per regime the dense and planned seconds."""
        return {"device": self.device, "multiple": self.multiple,
                **{r: {"dense_s": self.dense_seconds(plan, r), "plan_s": self.seconds(plan, r)} for r in REGIMES}}

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
        return cls(d["device"], int(d["multiple"]), d["shapes"])

    def _shape(self, m: int, n: int) -> dict:
        try:
            return self.shapes[key(m, n)]
        except KeyError:
            raise WeloreError(f"the cost model has no {m} x {n} matrix (measure it: welore.costs.for_shapes)") from None


def device_name(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{device.type}: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}"


def for_model(model: nn.Module, targets, progress: bool = True) -> CostModel:
    """The cost model of `targets`' shapes (welore.targets.Target or MatrixPlan) on `model`'s device and dtype."""
    p = next(model.parameters())
    return for_shapes([(t.out_features, t.in_features) for t in targets], p.device, p.dtype, progress=progress)


_MEMO: dict[str, CostModel] = {}  # this process's models, so a cache turned off does not mean timing twice


def for_shapes(shapes, device: torch.device, dtype: torch.dtype, *, cache: bool = True,
               progress: bool = True) -> CostModel:
    """The cost model of `shapes` ((m, n) pairs) on `device` in `dtype`: read from the cache, and the
    shapes it lacks measured now and added to it."""
    device = torch.device(device)
    name = device_name(device, dtype)
    where = cache_dir() if cache else None
    path = None if where is None else where / "costs" / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
    model = _MEMO.get(name) or _read(path, name)
    todo = sorted({(int(m), int(n)) for m, n in shapes} - {tuple(map(int, k.split("x"))) for k in model.shapes})
    _MEMO[name] = model
    if not todo:
        return model
    with torch.inference_mode():
        if not model.multiple:  # first: the grid of timed ranks is on its multiples
            model.multiple = _fast_multiple(*max(todo, key=lambda s: s[0] * s[1]), device, dtype)
        for m, n in bar(todo, desc="Timing matrix products", unit="shape", progress=progress):
            model.shapes[key(m, n)] = _measure_shape(m, n, model.multiple, device, dtype)
    if path is not None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(model.to_dict(), indent=1))
    return model


def _read(path: Path | None, name: str) -> CostModel:
    if path is None or not path.exists():
        return CostModel(name, 0)
    try:
        model = CostModel.from_dict(json.loads(path.read_text()))
        if model.device == name:
            return model
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged or older cache is measured again, not an error
    return CostModel(name, 0)


def _measure_shape(m: int, n: int, multiple: int, device: torch.device, dtype: torch.dtype) -> dict:
    top = max(1, min(min(m, n), -(-m * n // (m + n))))  # beyond the break-even rank a matrix is never an LRC
    ranks = sorted({1, top} | {int(r) for r in (np.linspace(1, top, GRID) / multiple).round() * multiple if r > 0})
    out = {"ranks": ranks}
    for regime, tokens in REGIMES.items():
        dense = _copies(nn.Linear(n, m, bias=False, device=device, dtype=dtype), tokens)
        x = torch.randn(1, tokens, n, device=device, dtype=dtype)
        # each rank against the dense matrix timed right after it, over PASSES sweeps: a slow moment of
        # the machine (measured: +40% for seconds on this shared CPU) moves both, not the ratio
        ratios: list[list[float]] = [[] for _ in ranks]
        dense_s = []
        for _ in range(PASSES):
            for i, r in enumerate(ranks):  # built one rank at a time: the copies of all would not fit
                t = _time(_copies(LowRankLinear(n, m, r, bias=False, device=device, dtype=dtype), tokens), x)
                dense_s.append(_time(dense, x))
                ratios[i].append(t / dense_s[-1])
        d = statistics.median(dense_s)
        # the closest non-decreasing fit: a dip at a higher rank is noise (or alignment, which rounding
        # handles), never a reason to prefer more parameters, and a monotone cost keeps rules monotone
        out[regime] = {"dense": d, "factored": monotone([d * statistics.median(r) for r in ratios])}
    return out


def monotone(y) -> list[float]:
    """The least-squares non-decreasing fit of `y` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in map(float, y):
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


def _fast_multiple(m: int, n: int, device: torch.device, dtype: torch.dtype) -> int:
    """The largest multiple M whose ranks prefill no slower than the ranks M/2 below them (which are
    multiples of M/2): rounding to M then costs nothing a smaller rank would save. 1 where none.
    Measured on 2 CPU cores (fp32, 1536 x 576): 4 (rank 4j beats 4j - 2; 8j loses ~5% to 8j - 4)."""
    x = torch.randn(1, REGIMES["prefill"], n, device=device, dtype=dtype)

    def t(r: int) -> float:
        return _time([LowRankLinear(n, m, r, bias=False, device=device, dtype=dtype)], x)

    for mult in MULTIPLES:
        ranks = [mult * j for j in range(2, 7) if mult * j <= min(m, n) // 2]
        if len(ranks) >= 3 and statistics.median(t(r - mult // 2) / t(r) for r in ranks) >= 1.0:
            return mult
    return 1


def _copies(module: nn.Module, tokens: int) -> list[nn.Module]:
    """`module` and, for decoding, copies of it up to COLD_BYTES of weights (at most 512 in all)."""
    if tokens > 1:  # a prefill reuses each weight across its tokens: the cache does not decide its time
        return [module]
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return [module, *(copy.deepcopy(module) for _ in range(min(511, COLD_BYTES // max(size, 1))))]


def _time(modules: list[nn.Module], x: torch.Tensor, repeats: int = 5, least: float = 5e-3) -> float:
    """Seconds per call, the calls going round `modules`: the best of `repeats` means, each over
    enough calls to last `least` seconds."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def sweep(times: int) -> float:
        t = time.perf_counter()
        for _ in range(times):
            for f in modules:
                f(x)
        sync()
        return (time.perf_counter() - t) / (times * len(modules))

    sweep(1)
    times = 1
    while (per := sweep(times)) * times * len(modules) < least:
        times *= 2
    return min([per] + [sweep(times) for _ in range(repeats - 1)])
