"""A causal LM run one transformer block at a time: for models larger than memory.

llm-compressor calls this sequential onloading. The model is a meta-device skeleton; only the
non-block modules (embeddings, final norm, head) are real. A batch of sequences flows through it
as a sweep: capture what enters block 0, then for each block materialise its weights, run every
sequence through it, and drop it again. So memory holds one block and the activations, whatever
the depth, and each block is read once per sweep.

    bw = Blockwise(skeleton, non_block_tensors)
    x, extras = bw.capture(ids)                            # inputs of block 0 (+ masks, positions)
    for i in range(bw.depth):
        with bw.block(i, tensors_of_block_i) as block:
            x = [bw.run(block, h, extras[i][s]) for s, h in enumerate(x)]
    logits = bw.head(x[s], ids[s]).logits                  # final norm + head, the model's own code

Nothing here knows an architecture's attribute names: the blocks are the model's largest
`nn.ModuleList`, and the keyword arguments each block gets (attention masks, rotary embeddings,
which may differ per block) are recorded from the model's own forward, with stand-in blocks.
`perplexity_streaming` evaluates a model directory this way (`welore evaluate --stream`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from .allocate import RankPlan
from .data import corpus_info
from .device import pick_device
from .errors import WeloreError, one_line
from .evaluate import Perplexity, perplexity_windows, window_nll
from .io import build_skeleton, read_meta, read_tokenizer
from .layers import column_major
from .progress import bar
from .shards import ShardReader


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the transformer blocks: the ModuleList holding the most parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise WeloreError("the model has no list of repeated blocks to run one at a time")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block i during `capture`: records its arguments, passes its input on."""

    def __init__(self, i: int, calls: list, last: bool):
        super().__init__()
        self.i, self.calls, self.last = i, calls, last

    def forward(self, hidden, *args, **kwargs):
        self.calls.append((self.i, hidden, args, kwargs))
        if self.last:
            raise _Stop  # every block's arguments are known: the rest of the forward is not needed
        return hidden


class _Replay(nn.Module):
    """Stands in for a block during `head`: the last one returns the given final hidden states."""

    def __init__(self, out: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple

    def forward(self, hidden, *args, **kwargs):
        out = hidden if self.out is None else self.out
        return (out,) if self.as_tuple else out


class Blockwise:
    """`skeleton` (meta parameters, real buffers) with the non-block weights of `tensors` (a
    ShardReader or a dict; block weights in it are left for `block`) assigned."""

    def __init__(self, skeleton: nn.Module, tensors: ShardReader | dict[str, torch.Tensor], device=None):
        self.model, self.device = skeleton.eval(), pick_device(device)
        self.prefix, self.blocks = find_blocks(skeleton)
        self.templates = list(self.blocks)
        self.as_tuple = False  # whether blocks return tuples (older transformers): learnt on the first run
        for k in tensors.keys():
            if not k.startswith(self.prefix + "."):
                _assign(self.model, k, tensors.get(k).to(self.device))
        skeleton.tie_weights()  # tied heads were stored once
        missing = [n for n, p in skeleton.named_parameters() if p.is_meta and not n.startswith(self.prefix + ".")]
        if missing:
            raise WeloreError(f"the checkpoint has no tensor {missing[0]}")
        _buffers_to(skeleton, self.device)

    @property
    def depth(self) -> int:
        return len(self.templates)

    def block_prefix(self, i: int) -> str:
        """What the names of block i's modules and tensors start with."""
        return f"{self.prefix}.{i}."

    def block_tensors(self, tensors: ShardReader | dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors in `tensors`, named relative to the block."""
        p = self.block_prefix(i)
        return {k[len(p):]: tensors.get(k) for k in tensors.keys() if k.startswith(p)}

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """For each sequence of `ids` (n x seqlen): the hidden states entering block 0, and per block
        the other arguments it is called with. Equal arguments are stored once."""
        calls: list = []
        for i in range(self.depth):
            self.blocks[i] = _Recorder(i, calls, i == self.depth - 1)
        hidden, extras, seen = [], [[] for _ in range(self.depth)], []
        try:
            for seq in ids:
                calls.clear()
                try:
                    self.model(input_ids=seq[None].to(self.device), use_cache=False)
                except _Stop:
                    pass
                for i, h, args, kwargs in calls:
                    if i == 0:
                        hidden.append(h)
                    extra = (args, kwargs)
                    extras[i].append(next((e for e in seen if _same(e, extra)), None) or _keep(seen, extra))
        finally:
            self._restore()
        return hidden, extras

    @contextmanager
    def block(self, i: int, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
        """Block i with `tensors` (its names relative to the block) for the duration of the context."""
        block = copy.deepcopy(self.templates[i])
        for k, v in tensors.items():
            _assign(block, k, v.to(self.device))
        missing = [n for n, p in block.named_parameters() if p.is_meta]
        if missing:
            raise WeloreError(f"the checkpoint has no tensor {self.prefix}.{i}.{missing[0]}")
        column_major(block)
        _buffers_to(block, self.device)
        self.blocks[i] = block
        try:
            yield block
        finally:
            self.blocks[i] = self.templates[i]

    def run(self, block: nn.Module, hidden: torch.Tensor, extra: tuple) -> torch.Tensor:
        args, kwargs = extra
        out = block(hidden, *args, **kwargs)
        self.as_tuple = isinstance(out, tuple)
        return out[0] if self.as_tuple else out

    def head(self, hidden: torch.Tensor, ids: torch.Tensor, labels: bool = False):
        """The model's output (logits, and the LM loss with `labels`) for final hidden states `hidden`
        of the sequence `ids` (1D): the model's own final norm, head and loss, blocks replayed."""
        for i in range(self.depth):
            self.blocks[i] = _Replay(hidden if i == self.depth - 1 else None, self.as_tuple)
        try:
            ids = ids[None].to(self.device)
            return self.model(input_ids=ids, labels=ids if labels else None, use_cache=False)
        finally:
            self._restore()

    def _restore(self) -> None:
        for i, t in enumerate(self.templates):
            self.blocks[i] = t


def _assign(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` itself (its dtype, no copy) in place of the parameter or buffer `key`."""
    owner, _, name = key.rpartition(".")
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        module = None
    if module is not None and name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif module is not None and name in module._buffers:
        module._buffers[name] = value
    else:
        raise WeloreError(f"the checkpoint has a tensor {key} that the model does not")


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) in (int, float, bool, str, type(None)) and type(a) is type(b) and a == b)


def _keep(seen: list, extra):
    seen.append(extra)
    return extra


@torch.no_grad()
def perplexity_streaming(path: str | Path, tokenizer=None, corpus: str = "wikitext2", *, seqlen: int = 512,
                         max_tokens: int | None = None, text_field: str = "text", device=None,
                         progress: bool = True) -> Perplexity:
    """`welore.perplexity` of the model directory `path` (dense or welore-compressed, safetensors),
    one block at a time: memory holds one block, the embeddings and head, and the windows' hidden
    states. Same windows, same NLL as the in-memory evaluation. `tokenizer`: the directory's own
    when None."""
    path = Path(path)
    if not path.is_dir():
        raise WeloreError(f"--stream evaluates a model directory; {path} is not one")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise WeloreError(f"{path}: cannot read config.json: {one_line(e)}") from e
    plan = RankPlan.from_dict(read_meta(path)["plan"]) if (path / "welore.json").is_file() else None
    reader = ShardReader(path)  # a damaged checkpoint is refused before the text is read
    windows = perplexity_windows(tokenizer if tokenizer is not None else read_tokenizer(path), corpus, seqlen,
                                 max_tokens, text_field)
    skeleton = build_skeleton(config, plan)
    reader.name_as(skeleton)
    start = time.perf_counter()
    bw = Blockwise(skeleton, reader, device)
    hidden, extras = bw.capture(windows)
    for i in bar(range(bw.depth), desc=f"Perplexity on {corpus}, block by block", unit="block", progress=progress):
        with bw.block(i, bw.block_tensors(reader, i)) as block:
            hidden = [bw.run(block, h, extras[i][s]) for s, h in enumerate(hidden)]
    nll = sum(window_nll(bw.head(h, w).logits, w[None].to(bw.device)) for h, w in zip(hidden, windows))
    nll /= windows.shape[0] * (seqlen - 1)
    return Perplexity(corpus, math.exp(nll) if nll < 700 else float("inf"), nll, windows.numel(), seqlen,
                      time.perf_counter() - start, corpus_info(corpus, text_field)["sha256"])
