"""welore: WeLore low-rank compression and low-rank-only fine-tuning of causal LMs."""

import importlib
import logging

from ._version import __version__
from .allocate import MatrixPlan, RankPlan, allocate, normalized_spectrum
from .calibrate import calibration_batches, collect_stats
from .compress import Compressed, apply_plan, merge_to_dense, plan_model
from .config import CompressConfig
from .errors import WeloreError
from .evaluate import perplexity, task_accuracy
from .factorize import analyze_data_aware, attach_loss_tails
from .finetune_config import FinetuneConfig
from .io import load_compressed, save_compressed, save_dense
from .jobs import AnalyzeConfig, CompressJob, GradientsConfig
from .layers import LowRankLinear
from .models import load_model, pick_device
from .modes import set_trainable
from .pipeline import run_analyze, run_compress
from .spectrum import Spectra, analyze
from .targets import Target, count_parameters, find_targets

# peft (imported by transformers.Trainer) imports bitsandbytes, which logs a notice about its CPU
# kernels at import; welore never uses bitsandbytes, so in a welore run that notice is noise
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__all__ = [
    "__version__", "CompressConfig", "Compressed",
    "MatrixPlan", "RankPlan", "allocate", "normalized_spectrum", "apply_plan", "count_parameters",
    "merge_to_dense", "plan_model", "set_trainable", "WeloreError", "perplexity", "task_accuracy",
    "FinetuneConfig", "compare", "finetune", "recover", "record_gradients", "run_gradients", "load_compressed",
    "save_compressed", "save_dense", "LowRankLinear", "load_model", "pick_device", "run_analyze",
    "run_compress", "Spectra", "analyze", "Target", "find_targets", "analyze_data_aware", "attach_loss_tails",
    "calibration_batches", "collect_stats", "AnalyzeConfig", "CompressJob", "GradientsConfig",
]

# The training stack (transformers.Trainer, PEFT) costs ~1.3 s to import; load it on first use only.
_LAZY = {"compare": "compare_modes", "finetune": "train", "recover": "train", "record_gradients": "gradients", "run_gradients": "gradients"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'welore' has no attribute {name!r}")
