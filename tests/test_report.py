from welore import allocate, analyze
from welore.report import markdown_table, plot_reduction_heatmap, plot_spectra, text_table


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plots_are_written(llama, tmp_path):
    spectra = analyze(llama, progress=False)
    plan = allocate(spectra, ratio=0.5)
    assert _is_png(plot_spectra(spectra, tmp_path / "s.png"))
    assert _is_png(plot_reduction_heatmap(plan, spectra, tmp_path / "h.png"))


def test_tables():
    rows = [{"model": "dense", "ppl": 30.123, "params": 1234567}, {"model": "welore", "ppl": 2.5e7, "params": 5}]
    md = markdown_table(rows)
    assert md.splitlines()[0] == "| model | ppl | params |"
    assert "| dense | 30.12 | 1,234,567 |" in md and "2.5e+07" in md
    txt = text_table(rows)
    assert len({len(line) for line in txt.splitlines()}) == 1  # aligned columns
