"""One switch for every progress bar: welore's own and the libraries' (transformers, datasets, the
GGUF de-quantiser, huggingface_hub).

    welore.progress.set_enabled(False)      # what `welore -q` does

Libraries create bars in three ways, and each is turned off where it is made: transformers and
huggingface_hub have their own switches; datasets has its own; transformers' GGUF loader calls
`tqdm` directly with no switch at all, so the default of `tqdm.std.tqdm.__init__` (the class behind
`tqdm.auto` and `tqdm.tqdm`) is set to disabled. welore's bars use `bar()`, which honours both the
switch and the per-call `progress` argument of the library API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partialmethod

from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from tqdm import std
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

_ORIGINAL_INIT = std.tqdm.__init__
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar in this process."""
    global _enabled
    _enabled = bool(enabled)
    std.tqdm.__init__ = _ORIGINAL_INIT if enabled else partialmethod(_ORIGINAL_INIT, disable=True)
    (enable_progress_bars if enabled else disable_progress_bars)()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        import datasets
    except ImportError:  # datasets is only needed to read local corpus files
        return
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()


def enabled() -> bool:
    return _enabled


@contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """Bars on or off inside the block, then back as they were (the CLI's -q)."""
    before = _enabled
    set_enabled(enabled)
    try:
        yield
    finally:
        set_enabled(before)


def bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, shown only if both `progress` and the global switch say so."""
    return tqdm(iterable, disable=not (progress and _enabled), **kwargs)
