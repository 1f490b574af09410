"""Text from a model: the greedy continuation shown in the compress table, and `welore generate`.

A compressed model's perplexity of 254,713 means little until one reads what it writes; the same
prompt, greedily continued by every row of the comparison, gives the number a face.
"""

from __future__ import annotations

import torch
from transformers import TextStreamer

from .errors import WeloreError

PROMPT = "The capital of France is"


def _encode(tokenizer, prompt: str, chat: bool, device) -> dict[str, torch.Tensor]:
    if chat:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def compiled_decoding(device: torch.device) -> dict:
    """`generate` keyword arguments that compile the one-token decoding step (transformers' own
    route: a static KV cache and a CompileConfig; the prefill stays eager, its shapes vary).

    Batch-1 decoding is dominated by per-op overhead as much as by weights: on 2 CPU cores the
    default model's step spends ~24 of 43 ms outside its target matrices, which is also why a
    compressed model is slower than its size promises. Inductor fuses that away: measured 1.3x per
    token dense, 1.4x at half the target parameters, after a one-off ~30 s compile (cached on disk
    by inductor, and again per new cache length). transformers compiles only on accelerators unless
    told to; CUDA keeps its default mode (CUDA graphs), other devices take inductor's default."""
    from transformers import CompileConfig

    config = CompileConfig() if device.type == "cuda" else CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling on CPU
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def generate(model, tokenizer, prompt: str = PROMPT, *, max_new_tokens: int = 64, chat: bool = False,
             temperature: float = 0.0, seed: int = 0, stream: bool = False, compile: bool = False) -> str:
    """The model's continuation of `prompt` (greedy unless temperature > 0), as text.

    chat: wrap the prompt in the tokenizer's chat template as a user turn (instruct models answer
    instead of continuing). stream: print tokens to stdout as they are produced. compile: compile
    the decoding step (`compiled_decoding`), for long generations.
    """
    if tokenizer is None:
        raise WeloreError("generation needs a tokenizer, and this model has none")
    if not prompt or not prompt.strip():
        raise WeloreError("the prompt is empty")
    if max_new_tokens <= 0:
        raise WeloreError(f"max new tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise WeloreError(f"temperature must be >= 0, got {temperature}")
    if chat and not has_chat_template(tokenizer):
        raise WeloreError("this tokenizer has no chat template (use --raw)")
    device = next(model.parameters()).device
    enc = _encode(tokenizer, prompt, chat, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer, **sampling,
                             **(compiled_decoding(device) if compile else {}))
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def continuation(model, tokenizer, prompt: str = PROMPT, max_new_tokens: int = 12) -> str:
    """Greedy raw continuation on one line (newlines shown as a visible mark), for tables."""
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens).replace("\n", " ⏎ ").strip()


@torch.no_grad()
def generation_speed(models: dict[str, torch.nn.Module], tokenizer, *, new_tokens: int = 64, prefill_tokens: int = 512,
                     runs: int = 3, compile: bool = False) -> dict[str, dict[str, float]]:
    """{name: {"decode": tokens/s, "prefill": tokens/s}} of greedy batch-1 `generate`, the median of
    `runs`, the models alternating run by run so that drift of the machine hits each alike (eager). Decode
    excludes the prefill (time of `new_tokens` less time of one); prefill: one forward of
    `prefill_tokens` random ids, the first token included. compile: decode compiled
    (`compiled_decoding`; the warm-up compiles, at the length timed), one model at a time (below);
    the prefill stays eager."""
    import statistics
    import time

    device = next(next(iter(models.values())).parameters()).device
    short = {"input_ids": tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)}
    long = {"input_ids": torch.randint(0, len(tokenizer), (1, prefill_tokens),
                                       generator=torch.Generator().manual_seed(0)).to(device)}

    extra = compiled_decoding(device) if compile else {}

    def timed(m, ids, new: int, **kw) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=tokenizer.eos_token_id, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # Compiled, every model of a class shares one compiled frame, each model a recompile of it: past
    # dynamo's limit (8) the rest would run eager, unnoticed, and each call checks the guards of
    # every other model's entry first (measured: a dense model compiled beside four quantised ones
    # ran at its eager speed; the cause not isolated further). So compiled, each model is timed
    # alone, from a fresh dynamo cache, its runs back to back. The prefill stays eager (as in
    # compiled generation) and runs without the static cache, whose length would otherwise grow to
    # the prefill's for every later decode (transformers keeps the longest one).
    raw: dict[str, dict[str, list]] = {name: {"decode": [], "prefill": []} for name in models}
    for m in models.values():
        m.eval()  # inference: no dropout, and modules swapped in later (training by default) agree

    def measure(names: list[str]) -> None:
        for name in names:  # warm-up: allocator, kernels, caches; compiling: at the length timed
            timed(models[name], short, new_tokens if compile else 4, **extra)
            timed(models[name], long, 1)
        for _ in range(runs):
            for name in names:
                m = models[name]
                raw[name]["decode"].append((new_tokens - 1) / (timed(m, short, new_tokens, **extra)
                                                               - timed(m, short, 1, **extra)))
                raw[name]["prefill"].append(prefill_tokens / timed(m, long, 1))

    if compile:
        for name in models:
            torch._dynamo.reset()
            measure([name])
    else:
        measure(list(models))
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in raw.items()}
