"""welore: WeLore low-rank compression and low-rank-only fine-tuning of causal LMs."""

__version__ = "0.1.0"

from .allocate import MatrixPlan, RankPlan, allocate, normalized_spectrum  # noqa: E402
from .calibrate import calibration_batches, collect_stats  # noqa: E402
from .compress import apply_plan, count_parameters, merge_to_dense, plan_model, set_trainable  # noqa: E402
from .errors import WeloreError  # noqa: E402
from .evaluate import perplexity, task_accuracy  # noqa: E402
from .factorize import analyze_data_aware, attach_loss_tails  # noqa: E402
from .finetune import FinetuneConfig, compare, finetune  # noqa: E402
from .gradients import record_gradients, run_gradients  # noqa: E402
from .io import load_compressed, save_compressed, save_dense  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .models import load_model, pick_device  # noqa: E402
from .pipeline import run_analyze, run_compress  # noqa: E402
from .spectrum import Spectra, analyze  # noqa: E402
from .targets import Target, find_targets  # noqa: E402

__all__ = [
    "MatrixPlan", "RankPlan", "allocate", "normalized_spectrum", "apply_plan", "count_parameters",
    "merge_to_dense", "plan_model", "set_trainable", "WeloreError", "perplexity", "task_accuracy",
    "FinetuneConfig", "compare", "finetune", "record_gradients", "run_gradients", "load_compressed",
    "save_compressed", "save_dense", "LowRankLinear", "load_model", "pick_device", "run_analyze",
    "run_compress", "Spectra", "analyze", "Target", "find_targets", "analyze_data_aware", "attach_loss_tails",
    "calibration_batches", "collect_stats",
]
