"""One switch hides every progress bar: welore's and the ones libraries create without a switch."""

import io

from tqdm.auto import tqdm

from welore import progress


def _drawn(make) -> str:
    buf = io.StringIO()
    for _ in make(buf):
        pass
    return buf.getvalue()


def test_switch_hides_library_and_welore_bars_and_restores():
    library_bar = lambda buf: tqdm(range(3), desc="library", file=buf)  # noqa: E731  (as the GGUF loader does)
    ours = lambda buf: progress.bar(range(3), desc="ours", file=buf)  # noqa: E731
    assert "library" in _drawn(library_bar) and "ours" in _drawn(ours)
    with progress.shown(False):
        assert not progress.enabled()
        assert _drawn(library_bar) == "" and _drawn(ours) == ""
    assert progress.enabled()
    assert "library" in _drawn(library_bar) and "ours" in _drawn(ours)


def test_per_call_progress_argument_still_hides_one_bar():
    assert _drawn(lambda buf: progress.bar(range(3), desc="ours", file=buf, progress=False)) == ""


def test_transformers_switch_follows():
    from transformers.utils import logging as hf_logging

    with progress.shown(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
