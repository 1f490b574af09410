"""Singular values of every target matrix: the data-free signal WeLore allocates ranks from.

One matrix at a time, in fp32 on the model's device, so extra memory is one matrix plus its SVD.
`analyze(..., keep_factors=True)` also keeps the singular vectors a compressed matrix could use, so
compression never decomposes a matrix a second time. Only the leading `max_useful_rank` vectors are
kept: a rank-k factorisation saves parameters only when k(m+n) < mn, so no LRC can ever need more,
and the kept factors are never larger than the weights themselves.

Spectra are saved as safetensors (one 1-D tensor per matrix) with the shapes and a fingerprint of
every weight in the metadata, so a cache computed from other weights is detected, not silently used.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import WeloreError
from .progress import bar
from .targets import Target, find_targets, weight_matrix

SPECTRA_FORMAT = "welore-spectra/1"


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest k with k*(m+n) < m*n: beyond it, two factors cost more than the dense matrix."""
    m, n = out_features, in_features
    return max(0, (m * n - 1) // (m + n))


def fingerprint(w: torch.Tensor) -> str:
    """Short content hash of a weight tensor (dtype, shape and bytes)."""
    t = w.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Spectra:
    """Singular values (descending, fp32, CPU) of each target matrix, with what they came from."""

    targets: list[Target]
    values: dict[str, torch.Tensor]
    fingerprints: dict[str, str]
    # name -> (U[:, :r], S[:r], Vh[:r]) with r = max_useful_rank; absent unless keep_factors
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    seconds: float = 0.0
    # name -> estimated loss increase of keeping k = 0..r triplets (welore.factorize.attach_loss_tails)
    tails: dict = field(default_factory=dict, repr=False)
    # name -> storage choices (rank, bits, bytes, error) of the `bits` allocation (welore.quantize.attach_choices)
    choices: dict = field(default_factory=dict, repr=False)
    # name -> {bits: QuantLinear}: dense fits made for `choices` by the quantiser that stores the model, reused
    fits: dict = field(default_factory=dict, repr=False)
    # name -> how the factorisation went (e.g. which square root whitening took; the eigh fallback is worth knowing)
    how: dict = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> None:
        """Write singular values + metadata as safetensors (factors are not saved), atomically."""
        path = Path(path)
        meta = {
            "format": SPECTRA_FORMAT,
            "targets": json.dumps([[t.name, t.kind, t.out_features, t.in_features] for t in self.targets]),
            "fingerprints": json.dumps(self.fingerprints),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.values.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Spectra:
        path = Path(path)
        if not path.is_file():
            raise WeloreError(f"no such spectra file: {path}")
        try:
            values = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != SPECTRA_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {SPECTRA_FORMAT!r}")
            targets = [Target(n, k, int(o), int(i)) for n, k, o, i in json.loads(meta["targets"])]
            fps = json.loads(meta["fingerprints"])
        except (SafetensorError, ValueError, KeyError, TypeError, OSError) as e:
            raise WeloreError(f"{path} is not a valid welore spectra file: {e}") from e
        names = [t.name for t in targets]
        if set(names) != set(values) or set(names) != set(fps):
            raise WeloreError(f"{path} is corrupt: tensors and metadata name different matrices")
        for t in targets:
            if values[t.name].shape != (min(t.shape),):
                raise WeloreError(f"{path} is corrupt: {t.name} has {values[t.name].numel()} values for shape {t.shape}")
        return cls(targets, values, fps)

    def check_matches(self, model: nn.Module) -> None:
        """Raise if these spectra were not computed from `model`'s current weights."""
        for t in self.targets:
            try:
                module = model.get_submodule(t.name)
            except AttributeError:
                raise WeloreError(f"spectra are stale: the model has no module {t.name}") from None
            w = module.weight
            if tuple(weight_matrix(module).shape) != t.shape or fingerprint(w) != self.fingerprints[t.name]:
                raise WeloreError(f"spectra are stale: weights of {t.name} changed since they were computed")


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.linalg.svd(a, full_matrices=False)` (batched too), taken on a^T when `a` is wide: the
    CPU's LAPACK is 2-2.4x slower on a wide matrix than on its transpose (576 x 1536: 0.206 vs 0.106 s,
    2048 x 5632: 15.6 vs 6.6 s, one thread), and a transformer's down projections and GQA key/value
    projections are wide. The same factorisation up to rounding and the signs of singular vectors."""
    if a.shape[-2] >= a.shape[-1]:
        return torch.linalg.svd(a, full_matrices=False)
    U, S, Vh = torch.linalg.svd(a.mT, full_matrices=False)
    return Vh.mT.contiguous(), S, U.mT.contiguous()


def svd_for(w: torch.Tensor, rank: int, stored: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The singular triplets an LRC of `w` at `rank` is built from: `stored` (those `analyze` kept, or a
    data-aware factorisation's) when they reach `rank`, else a thin SVD of `w` now; on `w`'s device."""
    if stored is not None and stored[1].numel() >= rank:
        return tuple(f.to(w.device) for f in stored)
    return thin_svd(w.float())


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """`torch.linalg.svdvals`, on a^T when `a` is wide (2-4x faster there, as `thin_svd`)."""
    return torch.linalg.svdvals(a if a.shape[-2] >= a.shape[-1] else a.mT)


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:, :rank], all singular values, Vh[:rank]) of w in float32: fp32 whatever the storage
    dtype, since half-precision SVD is inaccurate or unsupported."""
    U, S, Vh = thin_svd(w.float())
    return U[:, :rank], S, Vh[:rank]


def truncated_svds(ws: list[torch.Tensor], ranks: list[int], device=None) -> list[tuple[torch.Tensor, ...]]:
    """truncated_svd of each of `ws` (results on the CPU). On CUDA, the matrices of one shape go through
    one batched `torch.linalg.svd` on the GPU (a block's q/o or gate/up projections share a shape);
    elsewhere each has its own SVD, the same call as the in-memory path, so the bits match it."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return [truncated_svd(w, r) for w, r in zip(ws, ranks)]
    return batched_svds(ws, ranks, device)


def batched_svds(ws: list[torch.Tensor], ranks: list[int], device) -> list[tuple[torch.Tensor, ...]]:
    """truncated_svds with one batched SVD per shape on `device` (any device: tested on the CPU)."""
    out: list = [None] * len(ws)
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for idx in by_shape.values():
        U, S, Vh = thin_svd(torch.stack([ws[i].to(device).float() for i in idx]))
        for j, i in enumerate(idx):
            r = ranks[i]
            out[i] = (U[j, :, :r].cpu(), S[j].cpu(), Vh[j, :r].cpu())
    return out


def analyze(model: nn.Module, targets: list[Target] | None = None, *, keep_factors: bool = False,
            progress: bool = True) -> Spectra:
    """Singular values of every target of `model` (see module docstring)."""
    targets = targets if targets is not None else find_targets(model)
    values, fps, factors = {}, {}, {}
    start = time.perf_counter()
    for t in bar(targets, desc="SVD of target matrices", unit="matrix", progress=progress):
        module = model.get_submodule(t.name)
        w = weight_matrix(module).detach()
        wf = w.float()  # fp32 whatever the storage dtype: half-precision SVD is inaccurate or unsupported
        if not torch.isfinite(wf).all():
            raise WeloreError(f"weights of {t.name} contain NaN or Inf")
        if keep_factors:
            U, S, Vh = truncated_svd(wf, max_useful_rank(*t.shape))
            factors[t.name] = (U.cpu(), S[: U.shape[1]].cpu(), Vh.cpu())
        else:
            S = singular_values(wf)
        values[t.name] = S.cpu()
        fps[t.name] = fingerprint(module.weight)
        del wf
    return Spectra(list(targets), values, fps, factors, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# measures of any matrix (the gradient view uses them on gradients)


def stable_rank(g: torch.Tensor, top: float | None = None) -> float:
    """||G||_F^2 / ||G||_2^2: 1 for a rank-1 matrix, min(m, n) for an orthogonal one."""
    fro2 = g.double().pow(2).sum().item()
    if top is None:
        top = torch.linalg.matrix_norm(g.double(), ord=2).item()
    return fro2 / top**2 if top > 0 else 0.0


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spans of orthonormal `a`, `b`:
    ||a^T b||_F^2 / r. 1 for the same subspace, 0 for orthogonal ones."""
    r = min(a.shape[1], b.shape[1])
    return (a.double().T @ b.double()).pow(2).sum().item() / r if r else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    d = a.norm() * b.norm()
    return (a @ b).item() / d.item() if d > 0 else 0.0


def top_svd(g: torch.Tensor, k: int, exact: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading k singular triplets: randomized (4 oversampling columns, 2 power iterations) or exact."""
    g = g.float()
    k = min(k, *g.shape)
    if exact or k + 4 >= min(g.shape):
        U, S, Vh = thin_svd(g)
        return U[:, :k], S[:k], Vh[:k].T
    torch.manual_seed(seed)  # svd_lowrank draws a random test matrix
    U, S, V = torch.svd_lowrank(g, q=k + 4, niter=2)
    return U[:, :k], S[:k], V[:, :k]
