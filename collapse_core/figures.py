"""Plotly figure builders for the dashboard (and notebooks): DataFrames in, figures out.

Every function takes frames shaped by :mod:`collapse_core.views` / :mod:`collapse_core.embeddings`
and returns a ``plotly.graph_objects.Figure``; no Streamlit, no database access, no maths beyond
layout. Colours: categorical series (checkpoints, runs, probe sets) use one qualitative palette
in selection order; ordered series (stages, layers) use a sequential scale so that "later" reads
as "darker".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from .errors import CollapseError

PALETTE: list[str] = list(qualitative.Plotly) + list(qualitative.D3[1:]) + list(qualitative.T10)
SEQUENTIAL = "Viridis"
HEIGHT = 420
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


MODEBAR_PX = 44  # right margin kept free for plotly's upright toolbar
LEGEND_ROW_PX = 22
LEGEND_ROW_CHARS = 70  # legend text that fits one row of a half-width chart (~520 px)


def _legend_rows(fig: go.Figure) -> int:
    """Rows the legend below the plot will take (0 when plotly shows none): the entries' text
    wrapped at about :data:`LEGEND_ROW_CHARS` characters a row."""
    if fig.layout.showlegend is False:
        return 0
    names = [str(t.name) for t in fig.data if t.showlegend is not False and t.name]
    if len(names) < 2 and not any(t.showlegend for t in fig.data):
        return 0  # plotly draws no legend for a single trace unless told to
    chars, rows = 0, 1
    for name in names:
        width = len(name) + 6  # the symbol and the gap before the next entry
        if chars and chars + width > LEGEND_ROW_CHARS:
            rows, chars = rows + 1, 0
        chars += width
    return rows if names else 0


def _layout(fig: go.Figure, title: str | None = None, height: int = HEIGHT, **kw) -> go.Figure:
    """The one place figures are styled: white template, title at the top left, the legend
    below the plot (anchored to the figure's bottom edge, so it never covers data or axis
    titles; the figure grows by its rows), the toolbar upright in a right margin of its own (so
    it covers neither the title nor the data)."""
    rows = _legend_rows(fig)
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.01, "xanchor": "left"} if title else None,
        height=height + LEGEND_ROW_PX * rows,
        margin={"l": 60, "r": MODEBAR_PX, "t": 50 if title else 30, "b": 50},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom",
                "x": 0, "xanchor": "left", "font": {"size": 11}},
        modebar={"orientation": "v"},
        hoverlabel={"namelength": -1},
        **kw,
    )  # fmt: skip
    return fig


def log_ticks(values: Sequence[float] | pd.Series, max_ticks: int = 10) -> dict:
    """Axis settings for a log axis with few, readable ticks: 1-2-5 × 10^k over the data's
    positive range written as plain numbers (1, 2, 5, 10, 20, …, 0.5), thinned to powers of
    ten when that would exceed ``max_ticks``. Plotly's own log ticks label every digit in a
    short range (1 2 3 … 9 10 2 3) and read as clutter."""
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return {}
    lo, hi = float(v.min()), float(v.max())
    k0, k1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    for mantissas in ((1, 2, 5), (1,)):
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mantissas]
        ticks = [t for t in ticks if lo / 1.01 <= t <= hi * 1.01]
        if len(ticks) <= max_ticks:
            break
    if len(ticks) > max_ticks:  # many decades: every n-th power of ten
        ticks = ticks[:: int(np.ceil(len(ticks) / max_ticks))]
    if len(ticks) < 2:  # a range narrower than one 1-2-5 step: let plotly choose
        return {}
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def colors(n: int) -> list[str]:
    """``n`` distinct categorical colours (cycled)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def sequential(n: int, scale: str = SEQUENTIAL) -> list[str]:
    """``n`` colours along a sequential scale (light→dark avoided at the pale end)."""
    if n <= 1:
        return sample_colorscale(scale, [0.35])
    return sample_colorscale(scale, list(np.linspace(0.0, 0.9, n)))


def empty_figure(message: str, height: int = 240) -> go.Figure:
    """A blank figure with a centred note (used when a selection has no data)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#666"})  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=height)


# -- layers and checkpoints ----------------------------------------------------------------
def _rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` or ``rgb(r, g, b)`` → ``rgba(r, g, b, alpha)``."""
    from plotly.colors import hex_to_rgb, unlabel_rgb

    r, g, b = hex_to_rgb(color) if color.startswith("#") else unlabel_rgb(color)
    return f"rgba({int(r)}, {int(g)}, {int(b)}, {alpha})"


def _ci_band(d: pd.DataFrame, x: str, color: str, group: str) -> go.Scatter | None:
    """A filled band between ``lo`` and ``hi`` of ``d`` (sorted by ``x``), or None without CIs."""
    if "lo" not in d or "hi" not in d:
        return None
    d = d[d["lo"].notna() & d["hi"].notna()]
    if len(d) < 2:
        return None
    xs = list(d[x]) + list(d[x])[::-1]
    ys = list(d["hi"]) + list(d["lo"])[::-1]
    return go.Scatter(x=xs, y=ys, fill="toself", fillcolor=_rgba(color, 0.15), mode="lines",
                      line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=group)  # fmt: skip


def layer_curves_figure(
    curves: pd.DataFrame, y_title: str, title: str | None = None, height: int = HEIGHT
) -> go.Figure:
    """One line per ``label`` of value vs layer (frame: label, layer, value; optional lo, hi
    drawn as a shaded 95 % CI band)."""
    if curves.empty:
        return empty_figure("no values for this selection")
    fig = go.Figure()
    labels = list(dict.fromkeys(curves["label"]))
    for label, color in zip(labels, colors(len(labels)), strict=True):
        d = curves[curves["label"] == label].sort_values("layer")
        band = _ci_band(d, "layer", color, str(label))
        if band is not None:
            fig.add_trace(band)
        fig.add_trace(go.Scatter(
            x=d["layer"], y=d["value"], name=str(label), mode="lines+markers", legendgroup=str(label),
            line={"color": color, "width": 2}, marker={"size": 5},
            hovertemplate=f"{label}<br>layer %{{x}}<br>{y_title} %{{y:.4g}}<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(title="layer (0 = embeddings)", dtick=_layer_dtick(curves["layer"]))
    fig.update_yaxes(title=y_title)
    return _layout(fig, title, height)


def _layer_dtick(layers: pd.Series) -> int:
    n = int(layers.max()) + 1 if len(layers) else 1
    return 1 if n <= 16 else (2 if n <= 32 else 4)


def spectra_figure(
    spec: pd.DataFrame, fit_lines: pd.DataFrame, fits: pd.DataFrame, layer: int,
    height: int = 460,
) -> go.Figure:  # fmt: skip
    """Log-log covariance spectra (eigenvalue vs index), one line per checkpoint, with the
    α-ReQ fit as a dashed line over its fitted index range (legend shows α and R²)."""
    if spec.empty:
        return empty_figure("no spectra stored for this selection")
    fig = go.Figure()
    labels = list(dict.fromkeys(spec["label"]))
    fit_by = fits.set_index("label") if not fits.empty else pd.DataFrame()
    for label, color in zip(labels, colors(len(labels)), strict=True):
        d = spec[(spec["label"] == label) & (spec["eigenvalue"] > 0)]
        name = str(label)
        if label in fit_by.index and np.isfinite(fit_by.loc[label, "alpha"]):
            name += f" (α={fit_by.loc[label, 'alpha']:.2f})"
        fig.add_trace(go.Scatter(
            x=d["idx"], y=d["eigenvalue"], name=name, mode="lines", legendgroup=str(label),
            line={"color": color, "width": 2},
            hovertemplate=f"{label}<br>i=%{{x}}<br>λ=%{{y:.3e}}<extra></extra>",
        ))  # fmt: skip
        f = fit_lines[fit_lines["label"] == label]
        if not f.empty:
            row = fit_by.loc[label]
            fig.add_trace(go.Scatter(
                x=f["idx"], y=f["eigenvalue"], mode="lines", legendgroup=str(label),
                showlegend=False, line={"color": color, "width": 1.5, "dash": "dash"},
                hovertemplate=(f"{label} fit: α={row['alpha']:.3f}, R²={row['r2']:.3f}"
                               f"<br>indices 1–{int(row['stop'])}<extra></extra>"),
            ))  # fmt: skip
    # ticks at 1, 2, 5 × 10^k on the index and at powers of ten only on the eigenvalues
    fig.update_xaxes(type="log", title="eigenvalue index i", **log_ticks(spec["idx"]))
    fig.update_yaxes(type="log", title="covariance eigenvalue λᵢ", exponentformat="power",
                     dtick=1)  # fmt: skip
    return _layout(fig, f"Spectrum, layer {layer} (dashed: α-ReQ fit)", height)


def heatmap_figure(
    matrix: pd.DataFrame,
    title: str | None = None,
    colorbar: str = "",
    x_title: str = "",
    y_title: str = "",
    colorscale: str = SEQUENTIAL,
    zmin: float | None = None,
    zmax: float | None = None,
    fmt: str = ".3g",
    height: int | None = None,
    top_down: bool = False,
) -> go.Figure:
    """A labelled heatmap of a DataFrame (index → y, columns → x); values shown in cells when
    the matrix is small enough to read. ``top_down`` puts the first row at the top."""
    if matrix.empty:
        return empty_figure("no values for this selection")
    z = matrix.to_numpy(dtype=float)
    small = z.size <= 150
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index],
        colorscale=colorscale, zmin=zmin, zmax=zmax,
        # the colour bar inside the figure's own width, left of the toolbar's margin
        # (right edge = the plot area's: ~80 px fit the last 22 % of a half-width chart)
        colorbar={"title": {"text": colorbar, "side": "right"}, "x": 1.0, "xanchor": "right",
                  "thickness": 12},
        text=np.vectorize(lambda v: "" if not np.isfinite(v) else format(v, fmt))(z)
        if small else None,
        texttemplate="%{text}" if small else None,
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{colorbar} %{{z:{fmt}}}"
        "<extra></extra>",
        xgap=1, ygap=1,
    ))  # fmt: skip
    fig.update_xaxes(title=x_title, type="category", domain=[0.0, 0.78])
    fig.update_yaxes(title=y_title, type="category", autorange="reversed" if top_down else True)
    rows = len(matrix.index)
    return _layout(fig, title, height or max(260, min(900, 60 + 22 * rows)))


def spectra_ratio_figure(ratios: pd.DataFrame, reference: str, layer: int,
                         height: int = 420) -> go.Figure:  # fmt: skip
    """λᵢ / λᵢ(reference) vs index i (log-log), one line per checkpoint; 1 = unchanged."""
    if ratios.empty:
        return empty_figure("no spectra to compare for this selection")
    fig = go.Figure()
    labels = list(dict.fromkeys(ratios["label"]))
    for label, color in zip(labels, colors(len(labels)), strict=True):
        d = ratios[ratios["label"] == label]
        fig.add_trace(go.Scatter(
            x=d["idx"], y=d["ratio"], name=str(label), mode="lines", line={"color": color},
            hovertemplate=f"{label}<br>i=%{{x}}<br>ratio %{{y:.3g}}<extra></extra>",
        ))  # fmt: skip
    fig.add_hline(y=1.0, line={"color": "#888", "dash": "dot"})
    fig.update_xaxes(type="log", title="eigenvalue index i", **log_ticks(ratios["idx"]))
    fig.update_yaxes(type="log", title=f"λᵢ / λᵢ({reference})", **log_ticks(ratios["ratio"]))
    return _layout(fig, f"Spectrum ratio to {reference}, layer {layer}", height)


# -- stages --------------------------------------------------------------------------------
def _stage_ticks(df: pd.DataFrame) -> tuple[list[int], list[str]]:
    ticks = df.groupby("stage_index")["stage_label"].agg(lambda s: " / ".join(dict.fromkeys(s)))
    return [int(i) for i in ticks.index], list(ticks.values)


def _stage_noise_style(d: pd.DataFrame) -> dict:
    """Error bars from lo/hi and markers filled only where the change from the previous stage
    exceeds the prompt-sampling noise (``exceeds_noise``); empty when the frame has no CIs."""
    if "lo" not in d or d["lo"].isna().all():
        return {}
    flagged = d["exceeds_noise"].fillna(False).astype(bool) if "exceeds_noise" in d else None
    style: dict = {"error_y": {"type": "data", "symmetric": False, "thickness": 1,
                               "array": (d["hi"] - d["value"]).to_numpy(),
                               "arrayminus": (d["value"] - d["lo"]).to_numpy()}}  # fmt: skip
    if flagged is not None:
        style["marker"] = {"size": 8, "symbol": ["circle" if f else "circle-open" for f in flagged]}
    return style


def stage_curves_figure(
    curves: pd.DataFrame, y_title: str, side_by_side: bool = True, height: int = HEIGHT
) -> go.Figure:
    """A metric across stages: one line per layer/layer group (colour by depth). With several
    runs: one panel per run (``side_by_side``) or overlaid with one dash style per run. With
    lo/hi columns: 95 % CI error bars, and a filled marker only where the change from the
    previous stage exceeds that noise (``exceeds_noise``; hollow = within noise)."""
    if curves.empty:
        return empty_figure("no stage results for this selection")
    runs = list(dict.fromkeys(curves["run_label"]))
    lines = curves.drop_duplicates("line").sort_values("line_order")["line"].tolist()
    line_color = dict(zip(lines, sequential(len(lines)), strict=True))
    panels = runs if side_by_side and len(runs) > 1 else [None]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[str(p) for p in panels] if panels[0] else None,
                        horizontal_spacing=0.03)  # fmt: skip
    for col, panel in enumerate(panels, start=1):
        for r_i, run in enumerate(runs):
            if panel is not None and run != panel:
                continue
            for line in lines:
                d = curves[(curves["run_label"] == run) & (curves["line"] == line)]
                if d.empty:
                    continue
                name = line if (panel is not None or len(runs) == 1) else f"{line} · {run}"
                fig.add_trace(go.Scatter(
                    x=d["stage_index"], y=d["value"], mode="lines+markers", name=name,
                    legendgroup=line, showlegend=(col == 1), **_stage_noise_style(d),
                    line={"color": line_color[line], "width": 2,
                          "dash": DASHES[r_i % len(DASHES)] if panel is None else "solid"},
                    customdata=d["stage_label"],
                    hovertemplate=f"{run} · {line}<br>%{{customdata}}<br>{y_title} %{{y:.4g}}"
                    "<extra></extra>",
                ), row=1, col=col)  # fmt: skip
        sub = curves if panel is None else curves[curves["run_label"] == panel]
        vals, text = _stage_ticks(sub)
        fig.update_xaxes(tickvals=vals, ticktext=text, title="stage", row=1, col=col)
    fig.update_yaxes(title=y_title, row=1, col=1)
    return _layout(fig, None, height)


def depth_curves_figure(
    curves: pd.DataFrame, y_title: str, side_by_side: bool = True, height: int = HEIGHT
) -> go.Figure:
    """A metric across layers: one line per stage, coloured along the chain (later = darker);
    several runs side by side or overlaid (dash per run)."""
    if curves.empty:
        return empty_figure("no stage results for this selection")
    runs = list(dict.fromkeys(curves["run_label"]))
    stages = sorted(curves["stage_index"].unique())
    stage_color = dict(zip(stages, sequential(len(stages)), strict=True))
    panels = runs if side_by_side and len(runs) > 1 else [None]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[str(p) for p in panels] if panels[0] else None,
                        horizontal_spacing=0.03)  # fmt: skip
    for col, panel in enumerate(panels, start=1):
        for r_i, run in enumerate(runs):
            if panel is not None and run != panel:
                continue
            d_run = curves[curves["run_label"] == run]
            for stage_index, d in d_run.groupby("stage_index", sort=True):
                label = str(d["stage_label"].iloc[0])
                band = _ci_band(d.sort_values("layer"), "layer", stage_color[stage_index], label)
                if band is not None:
                    fig.add_trace(band, row=1, col=col)
                name = label if (panel is not None or len(runs) == 1) else f"{label} · {run}"
                fig.add_trace(go.Scatter(
                    x=d["layer"], y=d["value"], mode="lines+markers", name=name,
                    legendgroup=label, showlegend=(col == 1 or panel is None),
                    line={"color": stage_color[stage_index], "width": 2,
                          "dash": DASHES[r_i % len(DASHES)] if panel is None else "solid"},
                    marker={"size": 4},
                    hovertemplate=f"{run} · {label}<br>layer %{{x}}<br>{y_title} %{{y:.4g}}"
                    "<extra></extra>",
                ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title="layer", dtick=_layer_dtick(curves["layer"]), row=1, col=col)
    fig.update_yaxes(title=y_title, row=1, col=1)
    return _layout(fig, None, height)


def timeline_figure(timeline: pd.DataFrame, height: int | None = None) -> go.Figure:
    """Gantt chart of stages per run (frame of :func:`views.stage_timeline`); bars shorter
    than 1.5 % of the whole span (e.g. the untrained stage 0) are widened to stay visible."""
    if timeline.empty:
        return empty_figure("no stages finished yet")
    fig = go.Figure()
    start = pd.to_datetime(timeline["start"])
    finish = pd.to_datetime(timeline["finish"])
    span = max((finish.max() - start.min()).total_seconds(), 60.0)
    stages = list(dict.fromkeys(timeline.sort_values("stage_index")["stage"]))
    stage_color = dict(zip(stages, colors(len(stages)), strict=True))
    for stage in stages:
        mask = timeline["stage"] == stage
        d = timeline[mask]
        seconds = (finish[mask] - start[mask]).dt.total_seconds().clip(lower=0.015 * span)
        fig.add_trace(go.Bar(
            y=d["run_label"], x=seconds * 1000.0, base=finish[mask] - pd.to_timedelta(seconds, "s"),
            orientation="h", name=str(stage), marker={"color": stage_color[stage]},
            text=d["stage_label"], textposition="inside", insidetextanchor="middle",
            showlegend=False,
            customdata=np.stack([d["stage_label"], d["steps"].fillna(0), d["seconds"].fillna(0),
                                 finish[mask].dt.strftime("%Y-%m-%d %H:%M")], axis=-1),
            hovertemplate="%{y}<br>%{customdata[0]}: %{customdata[1]} steps, "
            "%{customdata[2]:.0f} s (train + probe + evals)<br>finished %{customdata[3]}"
            "<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(type="date", title=None)
    fig.update_yaxes(type="category", autorange="reversed", title=None)
    n = timeline["run_label"].nunique()
    return _layout(fig, None, height or max(160, 80 + 36 * n), barmode="overlay")


# -- calibration ---------------------------------------------------------------------------
def reliability_figure(bins: pd.DataFrame, height: int = 460) -> go.Figure:
    """Reliability diagram: accuracy vs mean confidence per bin (marker area ∝ bin count),
    one line per checkpoint, and the diagonal of perfect calibration."""
    if bins.empty:
        return empty_figure("no reliability bins stored for this selection")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "#999", "dash": "dot"}, hoverinfo="skip"))  # fmt: skip
    labels = list(dict.fromkeys(bins["label"]))
    cmax = max(float(bins["count"].max()), 1.0)
    for label, color in zip(labels, colors(len(labels)), strict=True):
        d = bins[bins["label"] == label]
        fig.add_trace(go.Scatter(
            x=d["mean_confidence"], y=d["accuracy"], mode="lines+markers", name=str(label),
            line={"color": color, "width": 2},
            marker={"size": 5 + 9 * np.sqrt(d["count"] / cmax), "color": color,
                    "line": {"width": 1, "color": "white"}},
            customdata=np.stack([d["lower"], d["upper"], d["count"]], axis=-1),
            hovertemplate=f"{label}<br>bin %{{customdata[0]:.2f}}–%{{customdata[1]:.2f}}"
            "<br>confidence %{x:.3f}, accuracy %{y:.3f}<br>n=%{customdata[2]}<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(range=[0, 1], title="mean confidence in bin")
    fig.update_yaxes(range=[0, 1.02], title="accuracy in bin")
    return _layout(fig, None, height)


def outcomes_figure(long: pd.DataFrame, titles: dict[str, str], height: int = 360) -> go.Figure:
    """Outcomes across stages: one panel per outcome, one line per run (frame of
    :func:`views.outcome_across_stages`), with 95 % error bars where ``lo``/``hi`` are stored."""
    if long.empty:
        return empty_figure("no evaluation results for this selection")
    outcomes = list(dict.fromkeys(long["outcome"]))
    fig = make_subplots(rows=1, cols=len(outcomes),
                        subplot_titles=[titles.get(o, o) for o in outcomes],
                        horizontal_spacing=0.08)  # fmt: skip
    runs = list(dict.fromkeys(long["run_label"]))
    run_color = dict(zip(runs, colors(len(runs)), strict=True))
    for col, outcome in enumerate(outcomes, start=1):
        for run in runs:
            d = long[(long["outcome"] == outcome) & (long["run_label"] == run)]
            if d.empty:
                continue
            lo = d["lo"] if "lo" in d else pd.Series(np.nan, index=d.index)
            hi = d["hi"] if "hi" in d else pd.Series(np.nan, index=d.index)
            has_ci = bool((lo.notna() & hi.notna()).any())
            ci_text = [f" [{a:.3g}, {b:.3g}]" if a == a and b == b else ""
                       for a, b in zip(lo, hi, strict=True)]  # fmt: skip
            fig.add_trace(go.Scatter(
                x=d["stage_index"], y=d["value"], mode="lines+markers", name=str(run),
                legendgroup=str(run), showlegend=(col == 1), line={"color": run_color[run]},
                customdata=np.stack([d["stage_label"].astype(str), ci_text], axis=1),
                hovertemplate=f"{run}<br>%{{customdata[0]}}<br>{titles.get(outcome, outcome)} "
                "%{y:.4g}%{customdata[1]}<extra></extra>",
                error_y={"type": "data", "symmetric": False, "array": (hi - d["value"]).clip(lower=0),
                         "arrayminus": (d["value"] - lo).clip(lower=0), "thickness": 1,
                         "width": 3} if has_ci else None,
            ), row=1, col=col)  # fmt: skip
        vals, text = _stage_ticks(long[long["outcome"] == outcome])
        fig.update_xaxes(tickvals=vals, ticktext=text, title="stage", row=1, col=col)
    return _layout(fig, None, height)


# -- LoRA ----------------------------------------------------------------------------------
def lora_summary_figure(summary: pd.DataFrame, metrics: Sequence[str],
                        titles: dict[str, str] | None = None, height: int = 320) -> go.Figure:  # fmt: skip
    """Per stage bars of module-averaged LoRA update metrics, one panel per metric."""
    metrics = [m for m in metrics if m in summary]
    if summary.empty or not metrics:
        return empty_figure("no LoRA-update metrics for this run")
    titles = titles or {}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[titles.get(m, m)
                                                                   for m in metrics])  # fmt: skip
    stage_colors = colors(len(summary))
    for col, metric in enumerate(metrics, start=1):
        fig.add_trace(go.Bar(
            x=summary["stage"], y=summary[metric], marker={"color": stage_colors},
            showlegend=False, hovertemplate="%{x}<br>%{y:.4g}<extra></extra>",
        ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(type="category", row=1, col=col)
        values = pd.to_numeric(summary[metric], errors="coerce").fillna(0.0)
        if (values == 0).all():  # an empty-looking panel says why
            axis = "" if col == 1 else str(col)
            fig.add_annotation(text="0 in every stage", showarrow=False, x=0.5, y=0.5,
                               xref=f"x{axis} domain", yref=f"y{axis} domain",
                               font={"color": "#666"})  # fmt: skip
    return _layout(fig, None, height)


# -- hypothesis ----------------------------------------------------------------------------
def scatter_figure(
    table: pd.DataFrame, x: str, y: str, x_title: str, y_title: str, title: str | None = None,
    height: int = 480,
) -> go.Figure:  # fmt: skip
    """Checkpoints as points (colour per run), connected in stage order so each run's path
    through the chain is visible; hover names run and stage."""
    d = table.dropna(subset=[x, y]) if not table.empty and x in table and y in table else None
    if d is None or d.empty:
        return empty_figure("no checkpoints have both values")
    fig = go.Figure()
    runs = list(dict.fromkeys(d["run_label"]))
    for run, color in zip(runs, colors(len(runs)), strict=True):
        r = d[d["run_label"] == run].sort_values("stage_index")
        fig.add_trace(go.Scatter(
            x=r[x], y=r[y], mode="lines+markers+text", name=str(run),
            text=r["stage_label"], textposition="top center", textfont={"size": 10},
            line={"color": color, "width": 1, "dash": "dot"},
            marker={"size": 11, "color": color, "line": {"width": 1, "color": "white"}},
            hovertemplate=f"{run} · %{{text}}<br>{x_title} %{{x:.4g}}<br>{y_title} %{{y:.4g}}"
            "<extra></extra>",
        ))  # fmt: skip
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title)
    return _layout(fig, title, height)


def correlation_heatmap(
    corr: pd.DataFrame,
    outcome_titles: dict[str, str],
    metric_order: Sequence[str] = (),
    metric_titles: dict[str, str] | None = None,
) -> go.Figure:
    """Spearman ρ of collapse metrics (rows: metric @ layer position, in ``metric_order``) ×
    outcomes (columns), on a diverging −1..1 scale."""
    if corr.empty:
        return empty_figure("no correlations (need ≥ 3 checkpoints with outcomes)")
    titles = metric_titles or {}
    positions = {"mid": 0, "last": 1, "mean": 2}
    order = {m: i for i, m in enumerate(metric_order)}
    d = corr.assign(
        row=corr["collapse_metric"].map(lambda m: titles.get(m, m)) + " @ " + corr["layer"],
        _m=corr["collapse_metric"].map(lambda m: order.get(m, len(order))),
        _p=corr["layer"].map(lambda p: positions.get(p, 3)),
    ).sort_values(["_m", "collapse_metric", "_p"])
    mat = d.pivot_table(index="row", columns="outcome", values="spearman", aggfunc="first")
    mat = mat.loc[list(dict.fromkeys(d["row"])), [c for c in outcome_titles if c in mat.columns]]
    mat.columns = [outcome_titles.get(c, c) for c in mat.columns]
    return heatmap_figure(mat, None, "Spearman ρ", "", "", colorscale="RdBu_r", zmin=-1, zmax=1,
                          fmt=".2f", top_down=True)  # fmt: skip


# -- token embeddings ----------------------------------------------------------------------
def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _hover_frame(emb: pd.DataFrame) -> np.ndarray:
    token = emb["token"].map(lambda t: repr(str(t)))
    prompt = emb["prompt"].map(_short)
    return np.stack([token, prompt, emb["slice"].astype(str), emb["domain"].astype(str),
                     emb["probe_set"].astype(str)], axis=-1)  # fmt: skip


_HOVER = ("token %{customdata[0]} · %{customdata[2]}<br>%{customdata[4]} / %{customdata[3]}"
          "<br>%{customdata[1]}<extra></extra>")  # fmt: skip


def embedding_paths_figure(
    emb: pd.DataFrame, color_by: str = "domain", max_paths: int = 150, height: int = 620
) -> go.Figure:
    """All slices in one aligned map: each token's path through the slices as a thin line
    (up to ``max_paths`` tokens, fixed sample), points coloured by ``color_by`` with marker
    shape marking the first and last slice. Hover shows token, slice, probe set, prompt."""
    if emb.empty:
        return empty_figure("no embedding")
    fig = go.Figure()
    groups = list(dict.fromkeys(emb[color_by].astype(str)))
    group_color = dict(zip(groups, colors(len(groups)), strict=True))
    tokens = emb["token_id"].unique()
    rng = np.random.default_rng(0)
    shown = set(rng.choice(tokens, size=min(max_paths, len(tokens)), replace=False))
    paths = emb[emb["token_id"].isin(shown)].sort_values(["token_id", "slice_index"])
    n_slices = emb["slice_index"].nunique()
    if n_slices > 1:
        for group in groups:
            p = paths[paths[color_by].astype(str) == group]
            xs: list[float | None] = []
            ys: list[float | None] = []
            for _, t in p.groupby("token_id", sort=False):
                xs += list(t["x"]) + [None]
                ys += list(t["y"]) + [None]
            fig.add_trace(go.Scattergl(
                x=xs, y=ys, mode="lines", line={"color": group_color[group], "width": 0.7},
                opacity=0.35, hoverinfo="skip", legendgroup=group, showlegend=False,
            ))  # fmt: skip
    last = emb["slice_index"].max()
    first = emb["slice_index"].min()
    for group in groups:
        # last slice first, so the legend shows its filled marker
        d = emb[emb[color_by].astype(str) == group].sort_values("slice_index", ascending=False)
        symbols = np.where(d["slice_index"] == last, "circle",
                           np.where(d["slice_index"] == first, "circle-open", "circle"))  # fmt: skip
        sizes = np.where(d["slice_index"] == last, 7, 4)
        fig.add_trace(go.Scattergl(
            x=d["x"], y=d["y"], mode="markers", name=group, legendgroup=group,
            marker={"color": group_color[group], "size": sizes, "symbol": symbols,
                    "opacity": 0.8},
            customdata=_hover_frame(d), hovertemplate=_HOVER,
        ))  # fmt: skip
    fig.update_xaxes(showticklabels=False, title=None, zeroline=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, title=None, zeroline=False, showgrid=False,
                     scaleanchor="x")  # fmt: skip
    fig = _layout(fig, None, height)
    fig.update_layout(legend={"itemsizing": "constant"})
    return fig


def embedding_facets_figure(
    emb: pd.DataFrame, color_by: str = "domain", height: int | None = None, max_cols: int = 4
) -> go.Figure:
    """One small panel per slice (same aligned coordinates, shared axes), points coloured by
    ``color_by``."""
    if emb.empty:
        return empty_figure("no embedding")
    slices = emb.drop_duplicates("slice_index").sort_values("slice_index")["slice"].tolist()
    cols = min(max_cols, len(slices))
    rows = int(np.ceil(len(slices) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=slices, shared_xaxes="all",
                        shared_yaxes="all", horizontal_spacing=0.02,
                        vertical_spacing=0.08)  # fmt: skip
    groups = list(dict.fromkeys(emb[color_by].astype(str)))
    group_color = dict(zip(groups, colors(len(groups)), strict=True))
    for i, sl in enumerate(slices):
        r, c = i // cols + 1, i % cols + 1
        for group in groups:
            d = emb[(emb["slice"] == sl) & (emb[color_by].astype(str) == group)]
            fig.add_trace(go.Scattergl(
                x=d["x"], y=d["y"], mode="markers", name=group, legendgroup=group,
                showlegend=(i == 0), marker={"color": group_color[group], "size": 4,
                                             "opacity": 0.75},
                customdata=_hover_frame(d), hovertemplate=_HOVER,
            ), row=r, col=c)  # fmt: skip
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig = _layout(fig, None, height or 300 * rows + 40)
    fig.update_layout(legend={"itemsizing": "constant"})
    return fig


# -- static export (SVG / PDF) -------------------------------------------------------------
#: format → (MIME type, the bytes every valid file of it starts with)
EXPORT_FORMATS: dict[str, tuple[str, bytes]] = {
    "svg": ("image/svg+xml", b"<svg"),
    "pdf": ("application/pdf", b"%PDF-"),
}
EXPORT_TIMEOUT_S = 60.0
EXPORT_STARTUP_S = 30.0  # on top of the render timeout: Python + Chromium start-up under load
EXPORT_MAX_BYTES = 64 * 2**20

# The child renders with kaleido (plotly's static export; v1 drives the installed Chromium
# headless) and MathJax off: no CDN is reachable, and no figure here uses LaTeX.
_EXPORT_CHILD = """
import json, sys
import kaleido
fig = json.loads(sys.stdin.buffer.read())
out = kaleido.calc_fig_sync(
    fig, opts={"format": sys.argv[1]}, kopts={"timeout": float(sys.argv[2]), "mathjax": False}
)
sys.stdout.buffer.write(out)
"""


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; Chromium starts in a session of its own,
    so killing the child's process group alone would leave the browser running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def static_image(fig: go.Figure, fmt: str = "svg", timeout_s: float = EXPORT_TIMEOUT_S) -> bytes:
    """``fig`` as an SVG or PDF file (``fmt``), rendered by kaleido (plotly's static image
    export, https://github.com/plotly/Kaleido) in a child process.

    The figure carries names and text from the database (uploaded checkpoints, prompts), so the
    render is bounded: kaleido's own per-render timeout, and the child with its browser is
    killed ``timeout_s`` + :data:`EXPORT_STARTUP_S` after it started. The bytes are checked to be
    a file of ``fmt`` (leading bytes) and at most :data:`EXPORT_MAX_BYTES`. Failures are one-line
    :class:`CollapseError`\\ s."""
    if fmt not in EXPORT_FORMATS:
        raise CollapseError(f"cannot export a figure as {fmt!r}; choose one of "
                            f"{', '.join(EXPORT_FORMATS)}")  # fmt: skip
    too_long = f"the {fmt.upper()} export took longer than {timeout_s:g} s and was stopped"
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXPORT_CHILD, fmt, str(float(timeout_s))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(fig.to_json().encode(), timeout=timeout_s + EXPORT_STARTUP_S)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.communicate()
        raise CollapseError(too_long) from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"]
        if "TimeoutError" in lines[-1]:  # kaleido's own bound
            raise CollapseError(too_long)
        if "ChromeNotFoundError" in lines[-1]:
            raise CollapseError(f"the {fmt.upper()} export needs Chromium on the server (Debian: "
                                "apt-get install chromium); the toolbar's camera saves an SVG "
                                "without it")  # fmt: skip
        raise CollapseError(f"the {fmt.upper()} export failed: {lines[-1][:300]}")
    magic = EXPORT_FORMATS[fmt][1]
    if not out.lstrip()[: len(magic)] == magic or len(out) > EXPORT_MAX_BYTES:
        raise CollapseError(f"the {fmt.upper()} export did not produce a valid file")
    return out
