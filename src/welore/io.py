"""Self-describing compressed-model directories.

    out/
      config.json             the base architecture's Hugging Face config, plus `welore_lrcs` (the
                              shape of every low-rank layer) and an `auto_map` to modeling_welore.py
      modeling_welore.py      welore's layers.py, and qlinear.py beside it (its one import): with them,
      qlinear.py              plain transformers loads the directory
                              (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`)
      generation_config.json  (when the model has one)
      model.safetensors       all weights; LRCs as `<name>.down.weight` / `<name>.up.weight[/bias]`;
                              quantised matrices (--bits) as `<name>.qweight` / `.scale` / `.zero`
      welore.json             format, versions, base model, settings, rank plan
      tokenizer files         (when a tokenizer is known)

Loading builds the skeleton from config + plan with empty (meta) weights, swaps in LowRankLinear
modules of the planned ranks, then assigns the saved tensors: no base model, no SVD, no random init.
Every directory is written to a temporary sibling and renamed into place, so a failure never leaves
a half-written output.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from . import elastic, layers, qlinear
from ._version import __version__
from .allocate import RankPlan
from .device import pick_device
from .errors import WeloreError
from .files import atomic_dir
from .layers import LowRankLinear, QuantLinear, apply_budget, column_major, swap_in_low_rank, swap_in_quant
from .quantize import bits_report
from .shards import ShardReader

FORMAT = "welore/1"
WEIGHTS = "model.safetensors"
META = "welore.json"
MODELING = "modeling_welore.py"


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel
    tokenizer: object | None
    source: str  # what the user asked for, resolved to a path or hub id
    name: str  # short human name, used for default output names
    meta: dict | None = None  # welore.json of a compressed directory
    extra: dict | None = None  # of an elastic one: {name: (down, up)}, the factors stored beside dense matrices

    @property
    def plan(self) -> RankPlan | None:
        """The rank plan of a welore-compressed model, else None."""
        return RankPlan.from_dict(self.meta["plan"]) if self.meta else None


def versions() -> dict[str, str]:
    return {"welore": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied/shared tensors stored once (safetensors refuses aliased tensors)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def save_compressed(model: nn.Module, out_dir: str | Path, plan: RankPlan, *, tokenizer=None,
                    base_model: str | None = None, settings: dict | None = None, overwrite: bool = False,
                    extra: Callable[[Path], None] | None = None, budgets: dict[str, RankPlan] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` (compressed by `plan`) as a self-describing directory; `extra(tmpdir)` may add files.
    An elastic one (welore.elastic): `budgets` {budget: plan}, the first `plan`'s, and `tensors`, the
    factors stored beside dense matrices."""
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file({**unique_state_dict(model), **(tensors or {})}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "welore": FORMAT})
        write_metadata(model, tmp, plan, tokenizer=tokenizer, base_model=base_model, settings=settings,
                       budgets=budgets)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def write_metadata(model: nn.Module, out: Path, plan: RankPlan, *, tokenizer=None, base_model: str | None = None,
                   settings: dict | None = None, budgets: dict[str, RankPlan] | None = None) -> None:
    """Everything of a compressed directory but its weights: welore.json, config.json + modeling file,
    generation config, tokenizer. `model` may be a meta-device skeleton (streaming compression)."""
    meta = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "versions": versions(),
        "settings": settings or {},
        "plan": plan.to_dict(),
    }
    if quant_specs(model):  # the bits actually stored, per matrix and in all
        meta["quantization"] = bits_report(model)
    if budgets:  # the first is the model stored, and what loads without a budget
        meta["budgets"] = {"default": next(iter(budgets)), "plans": {k: p.to_dict() for k, p in budgets.items()}}
    _save_config_and_modeling(model, out, budgets)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except Exception:  # an invalid generation config of the base model is not ours to fix
            pass
    (out / META).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _save_config_and_modeling(model: nn.Module, out: Path, budgets: dict[str, RankPlan] | None = None) -> None:
    """config.json with the low-rank layers' shapes and an auto_map to a copy of welore's layers.py,
    so that stock transformers (trust_remote_code=True) loads the directory without welore; an
    elastic one's with every budget's ranks (`welore_budgets`) and the budget stored (`welore_budget`)."""
    config = copy.deepcopy(model.config)
    specs, quant = low_rank_specs(model), quant_specs(model)
    if budgets:
        config.welore_budgets, config.welore_budget = elastic.config_entry(budgets), next(iter(budgets))
    else:  # a model loaded from an elastic directory at one budget is saved as that one model
        for k in ("welore_budgets", "welore_budget"):
            config.__dict__.pop(k, None)
    base = next((c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c), None)
    if quant:
        config.welore_quant = quant
    if (specs or quant) and base is not None:
        config.welore_lrcs = specs
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING[:-3]}.WeloreForCausalLM"}
        source = Path(layers.__file__).read_text()
        marker = "\nBASE_CLASS = None\n"
        if marker not in source:
            raise RuntimeError("welore/layers.py lost its BASE_CLASS line")
        (out / MODELING).write_text(source.replace(marker, f"\nBASE_CLASS = {base!r}\n"))
        (out / "qlinear.py").write_text(Path(qlinear.__file__).read_text())  # modeling_welore.py imports it
    elif specs or quant:
        logging.getLogger(__name__).warning("%s is not a transformers class: the output loads with welore only",
                                            type(model).__name__)
    config.save_pretrained(out)


def quant_specs(model: nn.Module) -> dict[str, dict]:
    """The `welore_quant` entry of a quantised model's config.json."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def low_rank_specs(model: nn.Module) -> dict[str, dict]:
    """The `welore_lrcs` entry of a compressed model's config.json: every LowRankLinear's shape."""
    return {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "bias": m.up.bias is not None,
                   "kind": m.kind}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise WeloreError(f"{path} is not a welore model directory (no {META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise WeloreError(f"{path / META} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeloreError(f"{path / META} is not a {FORMAT} file")
    return meta


def is_quantised(settings: dict) -> bool:
    """Recorded compression settings (welore.json's) that store low-bit integers (--bits, --bits-per-weight)."""
    return settings.get("bits") is not None or settings.get("bits_per_weight") is not None


def build_skeleton(config, plan: RankPlan | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The (compressed, with a plan) architecture with empty (meta) parameters; buffers are real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else \
            AutoModelForCausalLM.from_config(config)
        specs = {}
        for mp in plan.lrcs if plan is not None else []:
            try:
                old = model.get_submodule(mp.name)
            except AttributeError:
                raise WeloreError(f"the plan names {mp.name}, which this architecture does not have") from None
            bias = getattr(old, "bias", None) is not None
            if hasattr(old, "up"):  # already low-rank (the class came from modeling_welore.py)
                bias = old.up.bias is not None
            specs[mp.name] = {"in": mp.in_features, "out": mp.out_features, "rank": mp.alloc_rank,
                              "bias": bias, "kind": mp.kind}
        swap_in_low_rank(model, specs)
        swap_in_quant(model, getattr(config, "welore_quant", None) or {})  # after: LRC factors may be quantised
    return model


def load_compressed(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    tokenizer: bool = True, budget: float | None = None) -> LoadedModel:
    """Load a directory written by `save_compressed` (see module docstring), at `budget` when it is an
    elastic one (welore.elastic; default: the budget stored). Returns a LoadedModel."""
    path = Path(path)
    meta = read_meta(path)
    plan = RankPlan.from_dict(meta.get("plan", {}))
    budgets = meta.get("budgets", {}).get("plans", {})
    if budget is not None and elastic.key(budget) not in budgets:
        have = f"it has {', '.join(budgets)}" if budgets else "it is not elastic (compress with --budgets)"
        raise WeloreError(f"{path} has no budget {elastic.key(budget)}: {have}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise WeloreError(f"{path}: cannot read config.json: {e}") from e
    state, extra = elastic.split_extra(ShardReader(path).all())  # one file, or a streaming compression's shards

    model = build_skeleton(config, plan)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise WeloreError(f"{path} does not match its rank plan: unexpected tensor {unexpected[0]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeloreError(f"{path} does not match its rank plan: {k} has shape "
                              f"{tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeloreError(f"{path}: tensor {k} contains NaN or Inf")
    model.load_state_dict(state, strict=False, assign=True)
    column_major(model)  # assign took the row-major tensors as saved
    model.tie_weights()  # tied tensors were stored once
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise WeloreError(f"{path} does not match its rank plan: missing tensor {missing[0]}")
    if budget is not None and elastic.key(budget) != meta["budgets"]["default"]:
        meta = {**meta, "plan": budgets[elastic.key(budget)], "budgets": {**meta["budgets"], "loaded": elastic.key(budget)}}
        apply_budget(model, elastic.ranks(RankPlan.from_dict(meta["plan"])), extra)
        model.config.welore_budget = elastic.key(budget)
    model = model.to(device=pick_device(device), dtype=dtype).eval() if dtype else model.to(pick_device(device)).eval()
    tok = read_tokenizer(path) if tokenizer else None  # none: fine for everything but evaluation
    return LoadedModel(model, tok, str(path), path.name, meta, extra)


def read_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in a model directory, or None when it has none."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None


def save_dense(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face model directory (stock `from_pretrained` loads it)."""
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
