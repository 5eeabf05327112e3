"""Issue 16: every dashboard figure downloads as SVG and PDF (kaleido driving headless Chromium,
time-limited), legends sit below the plot, log axes carry few readable ticks."""

from __future__ import annotations

import io
import shutil
import time

import pandas as pd
import pytest

from collapse_core import figures
from collapse_core.errors import CollapseError

needs_chromium = pytest.mark.skipif(
    not shutil.which("chromium"), reason="kaleido needs Debian's chromium (installed by .ci/run)"
)
TITLE = "Effective rank of <b>my</b> checkpoints"


def _figure() -> figures.go.Figure:
    curves = pd.DataFrame({"label": ["base", "base", "sft", "sft"], "layer": [0, 1, 0, 1],
                           "value": [3.0, 2.5, 2.0, 1.5]})  # fmt: skip
    return figures.layer_curves_figure(curves, "effective rank", TITLE)


@needs_chromium
def test_svg_and_pdf_are_real_files_with_the_title():
    from pypdf import PdfReader

    fig = _figure()
    svg = figures.static_image(fig, "svg")
    assert svg.startswith(b"<svg") and svg.rstrip().endswith(b"</svg>")
    text = svg.decode()
    assert "Effective rank of" in text and "sft" in text  # title and legend drawn as text
    pdf = figures.static_image(fig, "pdf")
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    page_text = PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    assert "Effective rank of" in page_text and "layer (0 = embeddings)" in page_text


def test_export_is_bounded_and_errors_are_one_line(monkeypatch):
    figures_child = figures._EXPORT_CHILD
    with pytest.raises(CollapseError, match="choose one of svg, pdf"):
        figures.static_image(_figure(), "png")
    # a render that never finishes is killed (with what it started) after the bound
    monkeypatch.setattr(figures, "_EXPORT_CHILD", "import time\ntime.sleep(600)")
    monkeypatch.setattr(figures, "EXPORT_STARTUP_S", 0.0)
    start = time.monotonic()
    with pytest.raises(CollapseError, match="took longer than 2 s and was stopped"):
        figures.static_image(_figure(), "svg", timeout_s=2.0)
    assert time.monotonic() - start < 15
    # a child that writes something else than the format asked for is refused
    monkeypatch.setattr(figures, "_EXPORT_CHILD", "import sys\nsys.stdout.write('<html>')")
    with pytest.raises(CollapseError, match="did not produce a valid file"):
        figures.static_image(_figure(), "svg")
    monkeypatch.setattr(figures, "_EXPORT_CHILD", "raise RuntimeError('bad figure')")
    with pytest.raises(CollapseError, match="export failed: RuntimeError: bad figure"):
        figures.static_image(_figure(), "pdf")
    # no browser on the server: kaleido's real error, said as what to install
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(figures, "_EXPORT_CHILD", figures_child)
    with pytest.raises(CollapseError, match="needs Chromium on the server"):
        figures.static_image(_figure(), "pdf")


def test_legend_below_the_plot_and_room_made_for_it():
    one_row = _figure()
    legend = one_row.layout.legend
    assert (legend.orientation, legend.yref, legend.y, legend.yanchor) == ("h", "container", 0,
                                                                          "bottom")  # fmt: skip
    assert one_row.layout.margin.r >= figures.MODEBAR_PX  # the upright toolbar's own margin
    many = pd.DataFrame({"label": [f"run-{i} · stage {i}:long-stage-name" for i in range(8)],
                         "layer": [0] * 8, "value": range(8)})  # fmt: skip
    tall = figures.layer_curves_figure(many, "x")
    assert tall.layout.height >= figures.HEIGHT + 3 * figures.LEGEND_ROW_PX
    assert one_row.layout.height == figures.HEIGHT + figures.LEGEND_ROW_PX
    single = figures.layer_curves_figure(many.head(1), "x")  # one trace: plotly shows no legend
    assert single.layout.height == figures.HEIGHT


def test_log_ticks_are_few_and_plain():
    assert figures.log_ticks(range(1, 65))["ticktext"] == ["1", "2", "5", "10", "20", "50"]
    assert figures.log_ticks([0.4, 11])["ticktext"] == ["0.5", "1", "2", "5", "10"]
    wide = figures.log_ticks([1e-9, 1e3])
    assert len(wide["tickvals"]) <= 10 and "1e-09" in wide["ticktext"]
    assert figures.log_ticks([3.0, 4.0]) == {}  # narrower than one step: plotly's own ticks
    assert figures.log_ticks([]) == {} and figures.log_ticks([0, -1]) == {}
