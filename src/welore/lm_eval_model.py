"""welore models in lm-evaluation-harness: importing this module registers the lm-eval model `welore`.

    import lm_eval, welore.lm_eval_model
    lm_eval.simple_evaluate(model="welore", model_args={"pretrained": "compressed/X"}, tasks=["boolq"])

From the shell, with lm-eval's own flags (this module's main registers `welore`, then runs lm-eval):

    python -m welore.lm_eval_model run --model welore --model_args pretrained=compressed/X --tasks boolq

`pretrained` is anything `welore.load_model` reads: a welore-compressed directory, a Hugging Face
directory, a .gguf file, or nothing for the embedded default. The loaded model is handed to lm-eval's
own `HFLM`, so scoring (log-likelihoods, generation, batching) is lm-eval's, unchanged: a dense model
scores exactly as lm-eval's `hf` model does.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import WeloreError
from .models import load_model


@register_model("welore")
class WeloreLM(HFLM):
    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = "auto",
                 **kwargs) -> None:
        loaded = load_model(pretrained, device=device, dtype=dtype)
        if loaded.tokenizer is None:
            raise WeloreError(f"{loaded.source} has no tokenizer, which lm-eval needs")
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
